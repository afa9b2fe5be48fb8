"""FAT on MMSegmentation 1.x: importing this package registers the ``FAT`` backbone (the one of
``detection.backbone``) in MMSegmentation's model registry and makes MMEngine read local checkpoints with the
restricted loader of ``detection.runner_checkpoints``."""
from mmseg.registry import MODELS

from detection.backbone import FATBackbone
from detection.runner_checkpoints import use_restricted_loading

MODELS.register_module('FAT', module=FATBackbone)
use_restricted_loading()
