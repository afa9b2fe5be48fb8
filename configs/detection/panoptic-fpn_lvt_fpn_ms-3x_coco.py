# Panoptic FPN with LVT on COCO panoptic, 3x schedule with multi-scale training (1333 x 640-800): the LVT authors'
# setting on MMDetection's own Panoptic FPN 3x config (inherited), with their narrow heads and AdamW at a batch of 64
# (8 GPUs x 8 images).
# Paper (LVT): val PQ 42.8, PQ^th 49.5, PQ^st 32.6 (test-dev PQ 43.0), 5.4 M params.
# Parameters: 5.3 M, this detector as built (the paper: 5.4 M).
# Backbone: LVT ImageNet weights from pretrained/lvt_cls.pth (the paper's classifier, trained with
#   configs/classification/lvt_cls.yaml, or the authors' checkpoint or downstream backbone file), or from another
#   file with --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = 'mmdet::panoptic_fpn/panoptic-fpn_r50_fpn_ms-3x_coco.py'
custom_imports = dict(imports=['detection'], allow_failed_imports=False)
# logs to TensorBoard (vis_data/ of each run) beside MMEngine's JSON lines
visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])

model = dict(
    backbone=dict(
        _delete_=True, type='LVT', arch='lvt_cls', init_cfg=dict(type='Pretrained', checkpoint='pretrained/lvt_cls.pth')),
    neck=dict(in_channels=[64, 64, 160, 256], out_channels=96),
    rpn_head=dict(in_channels=96, feat_channels=96),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=96),
        bbox_head=dict(in_channels=96, fc_out_channels=160),
        mask_roi_extractor=dict(out_channels=96),
        mask_head=dict(in_channels=96, conv_out_channels=96)),
    semantic_head=dict(
        in_channels=96, inner_channels=48, norm_cfg=dict(type='GN', num_groups=12, requires_grad=True)))

optim_wrapper = dict(_delete_=True, type='OptimWrapper', optimizer=dict(type='AdamW', lr=3e-4, weight_decay=1e-4))
train_dataloader = dict(batch_size=8)
auto_scale_lr = dict(base_batch_size=64)
