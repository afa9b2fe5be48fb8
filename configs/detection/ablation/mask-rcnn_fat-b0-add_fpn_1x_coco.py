# The FAT paper's ablation row 'add+linear' (fat_b0_add backbone) in FAT-B0's Mask R-CNN 1x config.
# Paper: 39.0 box AP, 35.8 mask AP.
# Parameters: 24.3 M, this detector as built.
# Backbone: ImageNet weights from pretrained/fat_b0_add.pth (configs/classification/ablation/),
#   or from another file with --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = '../mask-rcnn_fat-b0_fpn_1x_coco.py'
model = dict(backbone=dict(arch='fat_b0_add', init_cfg=dict(checkpoint='pretrained/fat_b0_add.pth')))
