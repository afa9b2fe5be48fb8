"""This project's models on MMDetection 3.x: importing this package registers their backbones (``FAT``,
``LVT``) in MMDetection's model registry and makes MMEngine read local checkpoints with the restricted loader (see
``openmmlab``)."""
from mmdet.registry import MODELS

import openmmlab

openmmlab.register(MODELS)
