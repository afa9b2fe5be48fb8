"""This project's models on MMDetection 3.x: importing this package registers their backbones (``FAT``,
``LVT``) in MMDetection's model registry and makes MMEngine read local checkpoints with the restricted loader (see
``openmmlab``)."""
from classification.dependencies import require

MODELS = require('mmdet.registry', 'detection', 'Detection').MODELS

import openmmlab  # noqa: E402  (after the check that names what installs MMDetection)

openmmlab.register(MODELS)
