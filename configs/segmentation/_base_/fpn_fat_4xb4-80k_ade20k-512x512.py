# Semantic FPN with a FAT backbone on ADE20K, the protocol of PVT (followed by the lightweight backbones FAT
# compares with): 512x512 crops, batch 16 (4 GPUs x 4 images, the dataloader's batch_size=4 of
# MMSegmentation's ADE20K base), 80k iterations, AdamW lr 1e-4 and weight decay 1e-4, poly decay (power 0.9)
# to 0, single-scale testing (shorter side 512).
_base_ = [
    'mmseg::_base_/models/fpn_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py',
]
custom_imports = dict(imports=['segmentation'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    # each variant config adds its arch and checkpoint
    backbone=dict(_delete_=True, type='FAT', init_cfg=dict(type='Pretrained')),
    decode_head=dict(num_classes=150))
# The backbone's BatchNorm layers are synchronised across GPUs, like the head's.
sync_bn = 'torch'

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, weight_decay=1e-4))
param_scheduler = [
    dict(type='PolyLR', power=0.9, eta_min=0.0, begin=0, end=80000, by_epoch=False),
]
