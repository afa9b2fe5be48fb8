# SegFormer with LVT on ADE20K, 160k iterations at 8 GPUs x 2 images: the LVT authors' setting, which is
# MMSegmentation's own SegFormer (MiT-B0) config, inherited; only the backbone and the head's input widths differ.
# Paper (LVT): 39.3 mIoU, 3.9 M params, 10.6 GFLOPs.
# Parameters: 3.9 M, this segmentor as built.
# FLOPs at 512x512 (fvcore): 10.8 G, or 9.7 G without the attention matrix products.
# Backbone: LVT ImageNet weights from pretrained/lvt_cls.pth (the paper's classifier, trained with
#   configs/classification/lvt_cls.yaml, or the authors' checkpoint or downstream backbone file), or from another
#   file with --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = 'mmseg::segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py'
custom_imports = dict(imports=['segmentation'], allow_failed_imports=False)
# logs to TensorBoard (vis_data/ of each run) beside MMEngine's JSON lines
visualizer = dict(vis_backends=[dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')])

model = dict(
    backbone=dict(
        _delete_=True, type='LVT', arch='lvt_cls', init_cfg=dict(type='Pretrained', checkpoint='pretrained/lvt_cls.pth')),
    decode_head=dict(in_channels=[64, 64, 160, 256], channels=256))
