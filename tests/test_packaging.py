"""The installed distribution: one import name, ``fat_vit``, beside Hugging Face's ``kernels``."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # each test builds or installs the wheel

PROJECT_PACKAGES = ('classification', 'openmmlab', 'detection', 'segmentation', 'kernels')
# pip run away from the checkout, whose folders (kernels/ above all) would otherwise shadow installed packages
AWAY = dict(env={name: value for name, value in os.environ.items() if name != 'PYTHONPATH'}, capture_output=True,
            text=True)

INSTALLED_USE = '''
import sys
import timm, torch
import fat_vit.classification, fat_vit.detection, fat_vit.segmentation, fat_vit.kernels
from fat_vit.classification import export
from fat_vit.openmmlab.backbone import BACKBONES
model = timm.create_model('fat_b0', num_classes=3).eval()
assert type(model).__module__ == 'fat_vit.classification.fat'
assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
assert fat_vit.kernels.DepthwiseConv2d(4, 3)(torch.randn(1, 4, 8, 8)).shape == (1, 4, 8, 8)
leaked = sorted(name for name in sys.modules if name.split('.')[0] in {packages})
assert not leaked, leaked
import kernels  # Hugging Face's
assert callable(kernels.get_kernel) and 'site-packages' in kernels.__file__, kernels.__file__
print('ok', sorted(BACKBONES))
'''


@pytest.fixture(scope='module')
def source(tmp_path_factory) -> Path:
    """A copy of what a build of this repository reads (so that building leaves the checkout as it is)."""
    source = tmp_path_factory.mktemp('packaging') / 'source'
    for package in PROJECT_PACKAGES:
        shutil.copytree(REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns('__pycache__', '*.so'))
    for name in ('setup.py', 'pyproject.toml', 'README.md'):
        shutil.copy(REPO_ROOT / name, source / name)
    return source


@pytest.fixture(scope='module')
def wheel(source) -> zipfile.ZipFile:
    dist = source.parent / 'dist'
    built = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--quiet',
                            '--wheel-dir', str(dist), str(source)], cwd=source.parent, **AWAY)
    assert built.returncode == 0, built.stderr[-3000:]
    return zipfile.ZipFile(next(dist.glob('fat_vit-*.whl')))


def test_wheel_installs_one_top_level_name(wheel):
    top_level = {name.split('/')[0] for name in wheel.namelist()}
    assert top_level == {'fat_vit', 'fat_vit-0.1.0.dist-info'}
    assert {name.split('/')[1] for name in wheel.namelist() if name.startswith('fat_vit/')} == set(PROJECT_PACKAGES)
    assert 'fat_vit/classification/export.py' in wheel.namelist()
    # the modules' imports of one another point into fat_vit
    backbone = wheel.read('fat_vit/openmmlab/backbone.py').decode()
    assert 'from fat_vit.classification.checkpoint_io import' in backbone
    assert 'from fat_vit import openmmlab' in wheel.read('fat_vit/detection/__init__.py').decode()
    metadata = wheel.read('fat_vit-0.1.0.dist-info/METADATA').decode()
    requirements = [line.split(': ', 1)[1].split(';')[0] for line in metadata.splitlines()
                    if line.startswith('Requires-Dist: ')]
    assert 'torch>=2.6' in requirements and 'timm<2,>=1.0.9' in requirements
    assert not any('==' in requirement for requirement in requirements)  # exact pins stay in requirements.txt


def test_installed_wheel_works_away_from_the_checkout_beside_huggingface_kernels(wheel, tmp_path):
    site = tmp_path / 'site'
    installed = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--quiet', '--target', str(site),
                                wheel.filename], cwd=tmp_path, **AWAY)
    assert installed.returncode == 0, installed.stderr[-3000:]
    script = INSTALLED_USE.replace('{packages}', repr(set(PROJECT_PACKAGES)))
    result = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env={'PYTHONPATH': str(site)},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith('ok')


def test_editable_install_is_refused_with_directions(source, tmp_path):
    # the PEP 660 hook that `pip install -e .` calls (-I: without the current folder on sys.path, as pip runs it)
    build_editable = f'from setuptools import build_meta; build_meta.build_editable({str(tmp_path)!r})'
    result = subprocess.run([sys.executable, '-I', '-c', build_editable], cwd=source, **AWAY)
    assert result.returncode != 0
    assert 'fat-vit has no editable install' in result.stdout + result.stderr
    assert not list(tmp_path.iterdir())
