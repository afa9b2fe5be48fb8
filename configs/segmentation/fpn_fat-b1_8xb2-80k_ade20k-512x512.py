# Semantic FPN with FAT-B1, 80k iterations, ADE20K train -> val, single-scale.
# Paper: none; the paper publishes an ADE20K result for FAT-B0 only.
# Parameters: 11.6 M, this segmentor as built.
# Backbone: FAT-B1 ImageNet weights from pretrained/fat_b1.pth, or from another file with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
# Drop path 0.0: the authors' rate for ADE20K (FAT_b1.py), not the ImageNet one.
_base_ = './_base_/fpn_fat_8xb2-80k_ade20k-512x512.py'
model = dict(
    backbone=dict(arch='fat_b1', drop_path_rate=0.0, init_cfg=dict(checkpoint='pretrained/fat_b1.pth')),
    neck=dict(in_channels=[48, 96, 192, 384]))
