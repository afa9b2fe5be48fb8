# The FAT paper's ablation row 'mul+linear' (fat_b0_mul backbone) in FAT-B0's Mask R-CNN 1x config.
# Paper: 40.3 box AP, 37.1 mask AP.
# Parameters: 24.3 M, this detector as built.
# Backbone: ImageNet weights from pretrained/fat_b0_mul.pth (configs/classification/ablation/),
#   or from another file with --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = '../mask-rcnn_fat-b0_fpn_1x_coco.py'
model = dict(backbone=dict(arch='fat_b0_mul', init_cfg=dict(checkpoint='pretrained/fat_b0_mul.pth')))
