# RetinaNet with FAT-B0, 1x schedule, COCO train2017 -> val2017.
# Paper: 40.4 box AP.
# Parameters: 13.8 M, this detector as built.
# Backbone: FAT-B0 ImageNet weights from pretrained/fat_b0.pth, or from another file with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = './_base_/retinanet_fat_fpn_1x_coco.py'
model = dict(
    backbone=dict(arch='fat_b0', init_cfg=dict(checkpoint='pretrained/fat_b0.pth')),
    neck=dict(in_channels=[32, 80, 160, 256]))
