# The FAT paper's ablation row 'w/o conv. pos' (fat_b0_no_cpe backbone) in FAT-B0's Mask R-CNN 1x config.
# Paper: 40.5 box AP, 37.3 mask AP.
# Parameters: 24.2 M, this detector as built.
# Backbone: ImageNet weights from pretrained/fat_b0_no_cpe.pth (configs/classification/ablation/),
#   or from another file with --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = '../mask-rcnn_fat-b0_fpn_1x_coco.py'
model = dict(backbone=dict(arch='fat_b0_no_cpe', init_cfg=dict(checkpoint='pretrained/fat_b0_no_cpe.pth')))
