# A tiny CAFF-DINO for CPU: tests and the demo, trained from scratch on the synthetic paired dataset
# (no pretrained weights). Same architecture as DINO_4scale.py at a fraction of the width and depth; only the
# values that differ from DINO_4scale.py are stated.

_base_ = ['DINO_4scale.py']

dataset_file = 'synthetic'
coco_path = 'data/synthetic_llvip'
output_dir = 'outputs/caff_tiny'
device = 'cpu'
num_workers = 0

# Half the synthetic frames' 320x256, sized for `python main.py --demo` (CAFF_demo.py: this config with the EMA
# weights, NMS and two evaluations; 200 training pairs, 10 epochs) on 2 CPU cores: its time and AP50 per thread count
# are in README.md (the trajectory depends on the thread count and the machine).
data_aug_scales = [112, 128, 144]
data_aug_max_size = 192
data_aug_scales2_resize = [256]  # the crop branch crops the full frame, then resizes like the other branch
data_aug_scales2_crop = [192, 256]
strong_aug = False
# Evaluate at the largest training scale, as DINO does (coco_transformer.py: 800 = max(data_aug_scales)). The
# crop branch zooms in, so training sees objects at 0.44-0.75x. Against 128 px (0.5x), the demo's final EMA
# weights gain about 20 points of AP at 144 px; AP50 gains 3.2 with 2 threads and loses 2.4 with 1
# (docs/benchmarks/demo.md).
eval_size = 144
eval_max_size = 192

batch_size = 4
epochs = 10
lr_drop = 8
lr = 4e-4  # from scratch and tiny: 2e-4 learns about half as fast in the first epochs
lr_backbone = 4e-4  # the backbones train too
save_checkpoint_interval = 0  # only checkpoint.pth and checkpoint_best_regular.pth (each ~370 MB with AdamW state)

num_classes = 3
backbone = 'resnet18'
freeze_backbones = False  # no pretrained weights to keep

hidden_dim = 64  # a multiple of 32: redim_corr and input_proj use GroupNorm(32, hidden_dim)
nheads = 4
enc_layers = 2
dec_layers = 2
dim_feedforward = 128
num_queries = 50
num_select = 50

dn_number = 10
dn_labelbook_size = 3
