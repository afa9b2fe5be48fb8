"""Evaluate a FAT or LVT detector: ``python -m detection.test CONFIG CHECKPOINT [--work-dir DIR]
[--cfg-options KEY=VALUE ...]`` reports COCO box (and mask) mAP; ``torchrun ... --launcher pytorch`` as for
training."""
from typing import Optional, Sequence

from classification.commands import program_name
from openmmlab.cli import test


def main(argv: Optional[Sequence[str]] = None):
    test(program_name(__spec__.name), 'Evaluate a FAT or LVT detector (MMDetection 3.x)', argv)


if __name__ == '__main__':
    main()
