# The FAT paper's ablation row 'pool down' (fat_b0_pool_down backbone) in FAT-B0's Mask R-CNN 1x config.
# Paper: 40.2 box AP, 36.9 mask AP.
# Parameters: 24.2 M, this detector as built.
# Backbone: ImageNet weights from pretrained/fat_b0_pool_down.pth (configs/classification/ablation/),
#   or from another file with --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = '../mask-rcnn_fat-b0_fpn_1x_coco.py'
model = dict(backbone=dict(arch='fat_b0_pool_down', init_cfg=dict(checkpoint='pretrained/fat_b0_pool_down.pth')))
