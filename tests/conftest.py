import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import classification  # noqa: F401  (registers the FAT models with timm)

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get('FAT_REFERENCE_DIR', REPO_ROOT.parent / 'shared' / 'reference'))


@pytest.fixture(scope='session')
def reference_dir() -> Path:
    """The golden data beside the checkout. A user's own clone lacks it and skips these tests; CI sets
    FAT_REQUIRE_GOLDEN=1, which turns its absence into a failure."""
    if not (REFERENCE_DIR / 'fat_b0_official_format.pth').is_file():
        message = f'golden data not found in {REFERENCE_DIR}'
        if os.environ.get('FAT_REQUIRE_GOLDEN') == '1':
            pytest.fail(message)
        pytest.skip(message)
    return REFERENCE_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_image_folder(root: Path, train_per_class: int, val_per_class: int, classes=('disc', 'bar', 'noise'),
                       corrupt: bool = False) -> Path:
    """A tiny ImageFolder dataset (train/ and val/) of 40x40 noise images with a per-class colour cue;
    with ``corrupt``, each class folder also holds a file that is not a readable image."""
    rng = np.random.RandomState(0)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.randint(0, 256, size=(40, 40, 3)).astype(np.uint8)
                pixels[..., label] = 255
                Image.fromarray(pixels).save(folder / f'{i}.png')
            if corrupt:
                (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really an image')
    return root


@pytest.fixture(scope='session')
def classification_trainer_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint written by ``python -m classification.train``: FAT-B0, one epoch on a tiny dataset."""
    root = tmp_path_factory.mktemp('classification_trainer')
    data = write_image_folder(root / 'data', 4, 1)
    command = [sys.executable, '-m', 'classification.train', '--cfg', 'configs/classification/fat_b0.yaml',
               '--data-path', str(data), '--output', str(root / 'output'), '--batch-size', '4',
               '--opts', 'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0', 'DATA.IMG_SIZE', '32',
               'DATA.NUM_WORKERS', '0', 'MODEL.NUM_CLASSES', '3']
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return root / 'output' / 'latest.pth'
