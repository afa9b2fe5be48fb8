# What every FAT detection config shares: the 1x protocol of PVT (and of the FAT paper's detection table).
# Batch 16 (8 GPUs x 2 images, the dataloader's batch_size=2 of MMDetection's COCO base), single-scale
# 1333x800 training with flip, AdamW lr 1e-4 and weight decay 1e-4, 12 epochs, lr x0.1 after epochs 8 and 11
# (with MMDetection's 500-iteration linear warm-up).
_base_ = [
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['detection'], allow_failed_imports=False)
# logs to TensorBoard (vis_data/ of each run) beside MMEngine's JSON lines
visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=1e-4))

# The backbone settings of every FAT detector, which the detector configs take as model.backbone (override
# model.backbone.*, not this); each variant config adds its arch and checkpoint. FATBackbone's defaults make it the
# authors' dense-prediction backbone (their segmentation code's pyramid and a GroupNorm on each feature), the only
# one they released: their detection backbone is inferred from it. BatchNorm statistics stay those of ImageNet
# (norm_eval), as in MMDetection's ResNet configs: 2 images per GPU are too few to estimate them.
fat_backbone = dict(type='FAT', norm_eval=True, init_cfg=dict(type='Pretrained'))
