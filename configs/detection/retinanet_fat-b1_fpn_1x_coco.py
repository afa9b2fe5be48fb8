# RetinaNet with FAT-B1, 1x schedule, COCO train2017 -> val2017.
# Paper: 42.5 box AP.
# Parameters: 17.3 M, this detector as built.
# Backbone: FAT-B1 ImageNet weights from pretrained/fat_b1.pth, or from another file with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = './_base_/retinanet_fat_fpn_1x_coco.py'
model = dict(
    backbone=dict(arch='fat_b1', init_cfg=dict(checkpoint='pretrained/fat_b1.pth')),
    neck=dict(in_channels=[48, 96, 192, 384]))
