# CAFF-DINO, Swin-L (384, ImageNet-22k) backbones, 5 feature levels: the reference's DINO_5scale_swin.py.

_base_ = ['DINO_4scale.py']

backbone = 'swin_L_384_22k'
use_checkpoint = True  # gradient checkpointing: two Swin-L backbones do not fit otherwise
batch_size = 1
return_interm_indices = [0, 1, 2, 3]  # all four Swin stages, plus one stride-2 level
num_feature_levels = 5
