import os
from pathlib import Path

import pytest
import torch

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
