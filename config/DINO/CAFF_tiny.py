# A tiny CAFF-DINO for CPU: tests and the demo, trained from scratch on the synthetic paired dataset
# (no pretrained weights). Same architecture as DINO_4scale.py at a fraction of the width and depth; only the
# values that differ from DINO_4scale.py are stated.

_base_ = ['DINO_4scale.py']

dataset_file = 'synthetic'
coco_path = 'data/synthetic_llvip'
output_dir = 'outputs/caff_tiny'
device = 'cpu'
num_workers = 0

data_aug_scales = [224, 240, 256]
data_aug_max_size = 400
data_aug_scales2_resize = [200, 224, 240]
data_aug_scales2_crop = [160, 224]
strong_aug = False
eval_size = 256
eval_max_size = 400

batch_size = 4
lr_drop = 10
lr = 2e-4
lr_backbone = 2e-4  # the backbones train too

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
