"""This project's glue for OpenMMLab, shared by ``detection`` (MMDetection) and ``segmentation`` (MMSegmentation)
and depending on neither: the backbone wrapper over the classification models (``backbone``), MMEngine's
checkpoints read by the restricted unpickler (``checkpoints``) and the train / test command lines (``cli``).

``register(registry)`` puts the backbones into a model registry (MMDetection's or MMSegmentation's) and makes
MMEngine read local checkpoints with the restricted loader.
"""
from classification.dependencies import require

require('mmengine', 'openmmlab', 'Detection and segmentation')
require('mmcv.ops', 'openmmlab', 'Detection and segmentation')

from mmengine.registry import Registry  # noqa: E402  (after the check that names what installs it)

from .backbone import BACKBONES  # noqa: E402
from .checkpoints import use_restricted_loading  # noqa: E402

__all__ = ['register']


def register(registry: Registry):
    for name, backbone in BACKBONES.items():
        registry.register_module(name, module=backbone)
    use_restricted_loading()
