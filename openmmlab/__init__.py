"""This project's glue for OpenMMLab, shared by ``detection`` (MMDetection) and ``segmentation`` (MMSegmentation)
and depending on neither: the backbone wrapper over the classification models (``backbone``), MMEngine's
checkpoints read by the restricted unpickler (``checkpoints``) and the train / test command lines (``cli``).

``register(registry)`` puts the backbones into a model registry (MMDetection's or MMSegmentation's) and makes
MMEngine read local checkpoints with the restricted loader.
"""
from classification.dependencies import refuse_second_copy, require

require('mmengine', 'openmmlab', 'Detection and segmentation')
require('mmcv.ops', 'openmmlab', 'Detection and segmentation')

from mmengine.registry import Registry  # noqa: E402  (after the check that names what installs it)

from .backbone import BACKBONES  # noqa: E402
from .checkpoints import use_restricted_loading  # noqa: E402

__all__ = ['register']


def register(registry: Registry):
    """Register the backbones in ``registry``; refused, naming both, where another copy of this project (the
    checkout's packages beside the installed ``fat_vit``) registered them in this process first."""
    for name, backbone in BACKBONES.items():
        registered = registry.module_dict.get(name)
        if registered is None:
            registry.register_module(name, module=backbone)
        elif registered is not backbone:
            refuse_second_copy(f'the {registry.scope} {registry.name} registry', name, registered.__module__,
                               backbone.__module__)
    use_restricted_loading()
