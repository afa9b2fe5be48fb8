"""Train a FAT or LVT segmentor: ``python -m segmentation.train CONFIG [--work-dir DIR] [--resume [CHECKPOINT]]
[--amp] [--cfg-options KEY=VALUE ...]``; on N GPUs ``torchrun --nproc_per_node N -m segmentation.train CONFIG
--launcher pytorch``."""
from typing import Optional, Sequence

from classification.commands import program_name
from openmmlab.cli import train


def main(argv: Optional[Sequence[str]] = None):
    train(program_name(__spec__.name), 'Train a FAT or LVT segmentor (MMSegmentation 1.x)', argv)


if __name__ == '__main__':
    main()
