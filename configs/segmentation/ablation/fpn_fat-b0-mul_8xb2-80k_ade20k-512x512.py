# The FAT paper's ablation row 'mul+linear' (fat_b0_mul backbone) in FAT-B0's Semantic FPN 80k config.
# Paper: 40.9 mIoU.
# Parameters: 8.4 M, this segmentor as built.
# Backbone: ImageNet weights from pretrained/fat_b0_mul.pth (configs/classification/ablation/),
#   or from another file with --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = '../fpn_fat-b0_8xb2-80k_ade20k-512x512.py'
model = dict(backbone=dict(arch='fat_b0_mul', init_cfg=dict(checkpoint='pretrained/fat_b0_mul.pth')))
