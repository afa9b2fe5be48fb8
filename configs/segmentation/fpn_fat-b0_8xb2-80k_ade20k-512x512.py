# Semantic FPN with FAT-B0, 80k iterations, ADE20K train -> val, single-scale.
# Paper: 41.5 mIoU (the paper's ablation table; it does not name the head).
# Parameters: 8.4 M, this segmentor as built.
# Backbone: FAT-B0 ImageNet weights from pretrained/fat_b0.pth, or from another file with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
# Drop path 0.05: the authors' rate for ADE20K (FAT_b0.py), not the ImageNet one.
# FPN widths: the backbone's. The authors' FAT_b0.py gives [80, 160, 256, 256], which do not match the widths
#   of their own backbone's outputs.
_base_ = './_base_/fpn_fat_8xb2-80k_ade20k-512x512.py'
model = dict(
    backbone=dict(arch='fat_b0', drop_path_rate=0.05, init_cfg=dict(checkpoint='pretrained/fat_b0.pth')),
    neck=dict(in_channels=[32, 80, 160, 256]))
