"""Train a FAT or LVT detector: ``python -m detection.train CONFIG [--work-dir DIR] [--resume [CHECKPOINT]] [--amp]
[--cfg-options KEY=VALUE ...]``; on N GPUs ``torchrun --nproc_per_node N -m detection.train CONFIG --launcher
pytorch``."""
from typing import Optional, Sequence

from classification.commands import program_name
from openmmlab.cli import train


def main(argv: Optional[Sequence[str]] = None):
    train(program_name(__spec__.name), 'Train a FAT or LVT detector (MMDetection 3.x)', argv)


if __name__ == '__main__':
    main()
