# CAFF-DINO, ResNet-50 backbones, 4 feature levels: every model and training key with the reference value.
# This file and its base define the set of known keys (util/config.py); other configs override a subset.
# Keys of the reference SLConfig that no code read (param_dict_type, query_dim, two_stage_type, matcher_type,
# decoder_sa_type, batch_norm_type, legacy dabdetr/pdetr keys, ...) are dropped.

_base_ = ['coco_transformer.py']

# Data
dataset_file = 'llvip_fusion'  # 'llvip_fusion', 'flir_fusion', 'synthetic' or 'kaist_fusion' (scored by MR^-2 too)
coco_path = ''  # dataset root, usually given with --coco_path
skip_bad_pairs = False  # leave unusable training pairs out (counted, named) instead of stopping; never for val
# Images wider than 8 bits (16-bit PNG/TIFF 'I;16', 32-bit 'I', float 'F': raw thermal frames) -> 0..255. Not in
# the reference, whose PIL .convert('RGB') clips them (a 16-bit frame turns white). 8-bit images are unchanged.
high_bit_depth_rule = 'percentile'  # 'percentile': per image, the two limit percentiles -> 0 and 255; 'range':
# the two limits are raw values -> 0 and 255 for every image (one grey level per raw value, e.g. a temperature)
high_bit_depth_limits = [1.0, 99.0]  # [low, high]: percentiles for 'percentile', raw values for 'range'

# Run
output_dir = 'outputs/caff_dino'
device = 'auto'  # 'cuda' when available, else 'cpu'; or any torch device string
seed = 42  # plus the rank in each process
num_workers = 2  # data-loader workers per process; 10 in DINO
amp = False  # mixed precision: the forward under autocast
amp_dtype = 'auto'  # with amp: 'float16' (+ GradScaler), 'bfloat16', or 'auto' (float16 on CUDA, else bfloat16)
print_freq = 10  # iterations between progress lines
save_checkpoint_interval = 1  # epochs between numbered checkpoints (checkpoint.pth is written every epoch)
eval_interval = 1  # epochs between evaluations (and best-checkpoint choices); the last epoch is always evaluated
# CPU: subnormal floats (|x| < 1.2e-38) read and computed as 0, in every torch thread. x86 cores take 10-100x
# longer on them, and a trained model's gradients hold many: from the demo's 10-epoch checkpoint a training step
# takes 1.28 s without this and 0.50 s with it (2 threads, docs/benchmarks/demo.md). Not in the reference.
flush_denormal = True
tensorboard = False  # also log losses, lr and AP to OUTPUT_DIR/tensorboard/ (needs the package); reference: none

# Optimisation: AdamW, StepLR
batch_size = 2  # per process; images per GPU
epochs = 12
lr_drop = 11  # epoch at which StepLR divides the learning rate by 10
lr = 1e-4
lr_backbone = 1e-5  # for backbone parameters; they receive no update while freeze_backbones is True
weight_decay = 1e-4
clip_max_norm = 0.1  # gradient-norm clipping; 0 disables it
use_ema = False  # exponential moving average of the weights (not used by the released CAFF models)
ema_decay = 0.9997
ema_epoch = 0  # first epoch that updates the EMA weights

# Backbones (one per modality)
num_classes = 91  # the COCO head of DINO's checkpoint; LLVIP and FLIR labels are category ids < 91
# backbone: resnet18/34/50/101, swin_T_224_1k, swin_B_224_22k, swin_B_384_22k, swin_L_224_22k or swin_L_384_22k
backbone = 'resnet50'
backbone_ir = None  # backbone of the second branch; None = the same as backbone
use_checkpoint = False  # gradient checkpointing in Swin blocks (memory for time)
dilation = False  # dilated last ResNet stage (DC5)
return_interm_indices = [1, 2, 3]  # backbone stages fed to the transformer; a 4th level is made by a stride-2 conv
freeze_backbones = True  # both backbones frozen while CAFF and the transformer train (the reference's choice)
pe_temperatureH = 20  # sine position-embedding temperatures; 10000 in DETR
pe_temperatureW = 20

# Deformable transformer (DINO: two-stage, mixed query selection, look forward twice)
num_feature_levels = 4
hidden_dim = 256
nheads = 8
enc_layers = 6
dec_layers = 6
dim_feedforward = 2048
dropout = 0.0  # 0.1 in DETR and Deformable DETR
transformer_activation = 'relu'
num_queries = 900
enc_n_points = 4  # sampling points per head and level in the encoder's deformable attention
dec_n_points = 4  # the same in the decoder's cross-attention
two_stage_default_hw = 0.05  # width and height of the encoder proposals at the first level
two_stage_bbox_embed_share = False  # encoder-output box head shared with the decoder's
two_stage_class_embed_share = False  # encoder-output class head shared with the decoder's
dec_pred_bbox_embed_share = True  # one box head for every decoder layer
dec_pred_class_embed_share = True  # one class head for every decoder layer
embed_init_tgt = True  # learned content queries (mixed query selection) instead of encoder features
msda_backend = 'auto'  # MSDeformAttn: 'auto', 'pytorch', 'cpu', 'cuda' or 'triton'; env CAFF_MSDA_BACKEND overrides it

# Fusion
# fusion_type: 'caff' (cross-attention fusion, the reference), 'caff_dw' (CAFF with depthwise-separable branch
# convs), or the ablations 'concat', 'add', 'rgb_only', 'ir_only'
fusion_type = 'caff'
query_modality = 'ir'  # image on the backbone_visible / input_proj / CAFF-query side; 'ir' is what the reference did
caff_num_stages = 2  # attention stages per CAFF block
caff_kernel_sizes = [1, 5, 7]  # q/k/v conv kernels per branch; the state-dict names stay k1/k3/k7
caff_proj_dim = 64  # channels of the fused map concatenated to both projections before redim_corr

# Denoising training (contrastive DN)
aux_loss = True  # losses on every decoder layer and on the encoder proposals
use_dn = True
dn_number = 100  # denoising queries per image, split into positive/negative groups
dn_box_noise_scale = 0.4  # 1.0 in DINO's own scripts; CAFF trained with 0.4
dn_label_noise_ratio = 0.5  # fraction of DN labels flipped at random
dn_labelbook_size = 91  # label embedding size of the DN queries; usually num_classes

# Matching and losses
set_cost_class = 2.0
set_cost_bbox = 5.0
set_cost_giou = 2.0
cls_loss_coef = 1.0  # focal loss
bbox_loss_coef = 5.0  # L1 on normalised cxcywh
giou_loss_coef = 2.0
interm_loss_coef = 1.0  # weight of the encoder-proposal losses
focal_alpha = 0.25

# Post-processing
num_select = 300  # top-k (query, class) pairs kept per image
nms_iou_threshold = -1.0  # > 0: class-agnostic NMS of those at this IoU (DINO's option); <= 0: none, as the reference
