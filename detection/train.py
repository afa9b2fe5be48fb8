"""Train a FAT or LVT detector: ``python -m detection.train CONFIG [--work-dir DIR] [--resume [CHECKPOINT]] [--amp]
[--cfg-options KEY=VALUE ...]``; on N GPUs ``torchrun --nproc_per_node N -m detection.train CONFIG --launcher
pytorch``."""
from openmmlab.cli import train

if __name__ == '__main__':
    train('python -m detection.train', 'Train a FAT or LVT detector (MMDetection 3.x)')
