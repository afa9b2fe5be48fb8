# Semantic FPN with a FAT backbone on ADE20K: the FAT authors' recipe (their segmentation code, configs
# FAT/FAT_b0.py ... FAT_b3.py, on MMSegmentation 0.x), on MMSegmentation's own bases, which hold the rest of it:
# the FPN head (128 channels, dropout 0.1, SyncBN), 512x512 crops of images resized to 2048x512 x (0.5-2.0),
# flip and photometric distortion, whole-image single-scale testing at 2048x512.
# What differs from those bases: the FAT backbone (the authors' dense-prediction backbone: their pyramid and a
# GroupNorm on each feature, FATBackbone's defaults), batch 16 as 8 GPUs x 2 images, AdamW with lr 1e-4 and weight
# decay 1e-4, and poly decay (power 0.9) over the 80k iterations to 1e-6. The backbone's BatchNorm layers are
# those of each GPU, as in the authors' training (only the head's norm is synchronised).
_base_ = [
    'mmseg::_base_/models/fpn_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py',
]
custom_imports = dict(imports=['segmentation'], allow_failed_imports=False)
# logs to TensorBoard (vis_data/ of each run) beside MMEngine's JSON lines
visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    # each variant config adds its arch, drop path rate and checkpoint
    backbone=dict(_delete_=True, type='FAT', init_cfg=dict(type='Pretrained')),
    decode_head=dict(num_classes=150))
train_dataloader = dict(batch_size=2)

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=1e-4))
param_scheduler = [
    dict(type='PolyLR', power=0.9, eta_min=1e-6, begin=0, end=80000, by_epoch=False),
]
