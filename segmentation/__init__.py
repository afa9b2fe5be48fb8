"""This project's models on MMSegmentation 1.x: importing this package registers their backbones (``FAT``,
``LVT``) in MMSegmentation's model registry and makes MMEngine read local checkpoints with the restricted loader (see
``openmmlab``). MMDetection is not needed."""
from mmseg.registry import MODELS

import openmmlab

openmmlab.register(MODELS)
