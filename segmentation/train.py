"""Train a FAT or LVT segmentor: ``python -m segmentation.train CONFIG [--work-dir DIR] [--resume [CHECKPOINT]]
[--amp] [--cfg-options KEY=VALUE ...]``; on N GPUs ``torchrun --nproc_per_node N -m segmentation.train CONFIG
--launcher pytorch``."""
from openmmlab.cli import train

if __name__ == '__main__':
    train('python -m segmentation.train', 'Train a FAT or LVT segmentor (MMSegmentation 1.x)')
