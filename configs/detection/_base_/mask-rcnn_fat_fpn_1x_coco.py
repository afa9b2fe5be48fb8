# Mask R-CNN with a FAT backbone, 1x on COCO: MMDetection's Mask R-CNN-FPN and COCO instance data.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    './fat_adamw_1x.py',
]
model = dict(backbone=dict(_delete_=True, **_base_.fat_backbone))
