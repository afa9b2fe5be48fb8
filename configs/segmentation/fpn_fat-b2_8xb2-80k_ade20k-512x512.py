# Semantic FPN with FAT-B2, 80k iterations, ADE20K train -> val, single-scale.
# Paper: none; the paper publishes an ADE20K result for FAT-B0 only.
# Parameters: 17.2 M, this segmentor as built.
# Backbone: FAT-B2 ImageNet weights from pretrained/fat_b2.pth, or from another file with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
# Drop path 0.1: the authors' rate for ADE20K (FAT_b2.py), not the ImageNet one.
# FPN widths: the backbone's. The authors' FAT_b2.py gives [128, 256, 512, 512], which do not match the widths
#   of their own backbone's outputs.
_base_ = './_base_/fpn_fat_8xb2-80k_ade20k-512x512.py'
model = dict(
    backbone=dict(arch='fat_b2', drop_path_rate=0.1, init_cfg=dict(checkpoint='pretrained/fat_b2.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))
