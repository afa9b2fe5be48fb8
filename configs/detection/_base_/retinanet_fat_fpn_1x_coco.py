# RetinaNet with a FAT backbone, 1x on COCO: MMDetection's RetinaNet-FPN and COCO detection data.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    './fat_adamw_1x.py',
]
model = dict(backbone=dict(_delete_=True, **_base_.fat_backbone))
