# Mask R-CNN with FAT-B1, 1x schedule, COCO train2017 -> val2017.
# Paper: 43.3 box AP, 39.6 mask AP.
# Parameters: 27.5 M, this detector as built.
# Backbone: FAT-B1 ImageNet weights from pretrained/fat_b1.pth, or from another file with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = './_base_/mask-rcnn_fat_fpn_1x_coco.py'
model = dict(
    backbone=dict(arch='fat_b1', init_cfg=dict(checkpoint='pretrained/fat_b1.pth')),
    neck=dict(in_channels=[48, 96, 192, 384]))
