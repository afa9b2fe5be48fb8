# Mask R-CNN with FAT-B2, 1x schedule, COCO train2017 -> val2017.
# Paper: 45.2 box AP, 41.3 mask AP.
# Parameters: 33.1 M, this detector as built.
# Backbone: FAT-B2 ImageNet weights from pretrained/fat_b2.pth, or from another file with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = './_base_/mask-rcnn_fat_fpn_1x_coco.py'
model = dict(
    backbone=dict(arch='fat_b2', init_cfg=dict(checkpoint='pretrained/fat_b2.pth')),
    neck=dict(in_channels=[64, 128, 256, 512]))
