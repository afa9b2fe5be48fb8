# Mask R-CNN with FAT-B4, 1x schedule, COCO train2017 -> val2017.
# FAT-B4 was never released: its layout is inferred from the paper (see the README).
# Paper: 49.7 box AP, 44.8 mask AP.
# Parameters: 71.2 M, this detector as built.
# Backbone: FAT-B4 ImageNet weights from pretrained/fat_b4.pth, or from another file with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = './_base_/mask-rcnn_fat_fpn_1x_coco.py'
model = dict(
    backbone=dict(arch='fat_b4', init_cfg=dict(checkpoint='pretrained/fat_b4.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
