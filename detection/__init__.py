"""FAT on MMDetection 3.x: importing this package registers the ``FAT`` backbone in MMDetection's model
registry and makes MMEngine read local checkpoints with the restricted loader (``runner_checkpoints``)."""
from mmdet.registry import MODELS

from .backbone import FATBackbone
from .runner_checkpoints import use_restricted_loading

MODELS.register_module('FAT', module=FATBackbone)
use_restricted_loading()
