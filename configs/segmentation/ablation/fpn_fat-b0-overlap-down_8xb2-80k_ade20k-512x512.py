# The FAT paper's ablation row 'conv w/ overlap' (fat_b0_overlap_down backbone) in FAT-B0's Semantic FPN 80k config.
# Paper: 40.9 mIoU.
# Parameters: 8.4 M, this segmentor as built.
# Backbone: ImageNet weights from pretrained/fat_b0_overlap_down.pth (configs/classification/ablation/),
#   or from another file with --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = '../fpn_fat-b0_8xb2-80k_ade20k-512x512.py'
model = dict(backbone=dict(arch='fat_b0_overlap_down', init_cfg=dict(checkpoint='pretrained/fat_b0_overlap_down.pth')))
