"""Evaluate a FAT or LVT detector: ``python -m detection.test CONFIG CHECKPOINT [--work-dir DIR]
[--cfg-options KEY=VALUE ...]`` reports COCO box (and mask) mAP; ``torchrun ... --launcher pytorch`` as for
training."""
from openmmlab.cli import test

if __name__ == '__main__':
    test('python -m detection.test', 'Evaluate a FAT or LVT detector (MMDetection 3.x)')
