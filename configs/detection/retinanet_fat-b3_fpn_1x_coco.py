# RetinaNet with FAT-B3, 1x schedule, COCO train2017 -> val2017.
# Paper: 45.9 box AP.
# Parameters: 38.9 M, this detector as built.
# Backbone: FAT-B3 ImageNet weights from pretrained/fat_b3.pth, or from another file with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = './_base_/retinanet_fat_fpn_1x_coco.py'
model = dict(
    backbone=dict(arch='fat_b3', init_cfg=dict(checkpoint='pretrained/fat_b3.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))
