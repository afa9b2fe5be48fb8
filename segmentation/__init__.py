"""This project's models on MMSegmentation 1.x: importing this package registers their backbones (``FAT``,
``LVT``) in MMSegmentation's model registry and makes MMEngine read local checkpoints with the restricted loader (see
``openmmlab``). MMDetection is not needed."""
from classification.dependencies import require

MODELS = require('mmseg.registry', 'segmentation', 'Segmentation').MODELS

import openmmlab  # noqa: E402  (after the check that names what installs MMSegmentation)

openmmlab.register(MODELS)
