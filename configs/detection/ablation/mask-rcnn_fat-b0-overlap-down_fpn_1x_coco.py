# The FAT paper's ablation row 'conv w/ overlap' (fat_b0_overlap_down backbone) in FAT-B0's Mask R-CNN 1x config.
# Paper: 40.5 box AP, 37.3 mask AP.
# Parameters: 24.3 M, this detector as built.
# Backbone: ImageNet weights from pretrained/fat_b0_overlap_down.pth (configs/classification/ablation/),
#   or from another file with --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = '../mask-rcnn_fat-b0_fpn_1x_coco.py'
model = dict(backbone=dict(arch='fat_b0_overlap_down', init_cfg=dict(checkpoint='pretrained/fat_b0_overlap_down.pth')))
