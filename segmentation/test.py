"""Evaluate a FAT or LVT segmentor: ``python -m segmentation.test CONFIG CHECKPOINT [--work-dir DIR]
[--cfg-options KEY=VALUE ...]`` reports mIoU; ``torchrun ... --launcher pytorch`` as for training."""
from openmmlab.cli import test

if __name__ == '__main__':
    test('python -m segmentation.test', 'Evaluate a FAT or LVT segmentor (MMSegmentation 1.x)')
