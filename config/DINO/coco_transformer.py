# Augmentation keys (read by datasets/): DETR's multi-scale training schedule, applied with one set of random
# parameters to both images of a pair. Values as in DINO's config/DINO/coco_transformer.py.

data_aug_scales = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]  # short side, drawn per image
data_aug_max_size = 1333  # cap on the long side after a resize
data_aug_scales2_resize = [400, 500, 600]  # second branch: resize to one of these ...
data_aug_scales2_crop = [384, 600]  # ... random crop with sides in [min, max] ...
# ... then resize to data_aug_scales again.
strong_aug = True  # one photometric op per pair (channel perm / brightness / contrast); CAFF's default, False in DINO
eval_size = 800  # short side at evaluation; LLVIP 1280x1024 and FLIR 640x512 become 1000x800
eval_max_size = 1333  # cap on the long side at evaluation

# Missing modality (not in the reference; the defaults are its behaviour). A missing image is the zero tensor after
# normalisation, i.e. a frame at the normalisation mean (datasets/transforms.py::missing_image).
modality_dropout = 0.0  # training: probability that a pair has one image (RGB or IR, equal chance) missing
eval_missing_modality = 'none'  # evaluation: 'none', or 'rgb' / 'ir' to blank that image of every pair
