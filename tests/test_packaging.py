"""The distribution as users get it: an sdist with every source, the wheel built from it with one import name
(``fat_vit``) beside Hugging Face's ``kernels``, its configs and entry points, installed into a fresh virtual
environment and run from a folder outside the checkout."""
import json
import os
import re
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT, write_image_folder, write_tiny_coco

pytestmark = pytest.mark.slow  # each test builds or installs the wheel

PROJECT_PACKAGES = ('classification', 'openmmlab', 'detection', 'segmentation', 'kernels')
# the checkout's files that a build reads
SOURCES = (*PROJECT_PACKAGES, 'configs', 'setup.py', 'pyproject.toml', 'MANIFEST.in', 'README.md', 'LICENSE',
           'requirements.txt', 'requirements-extras.txt', 'requirements-dense.txt', 'requirements-nodeps.txt')
# the commands the README teaches, as entry points
COMMANDS = {'fat-train', 'fat-eval', 'fat-predict', 'fat-publish', 'fat-visualize', 'fat-export',
            'fat-benchmark', 'fat-pack-dataset', 'fat-model-table', 'fat-trainer-benchmark', 'fat-det-train',
            'fat-det-test', 'fat-seg-train', 'fat-seg-test'}
# a process without the checkout: no PYTHONPATH (pip and the installed code run away from its folders, kernels/
# above all, which would shadow installed packages)
AWAY = {name: value for name, value in os.environ.items() if name != 'PYTHONPATH'}

INSTALLED_USE = '''
import sys
import timm, torch
import fat_vit
import fat_vit.detection, fat_vit.segmentation, fat_vit.kernels
from fat_vit.classification import export, train
from fat_vit.openmmlab.backbone import BACKBONES
model = timm.create_model('fat_b0', num_classes=3).eval()
assert type(model).__module__ == 'fat_vit.classification.fat'
assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
assert fat_vit.kernels.DepthwiseConv2d(4, 3)(torch.randn(1, 4, 8, 8)).shape == (1, 4, 8, 8)
assert train._logger.name == 'fat_vit.classification.train'
leaked = sorted(name for name in sys.modules if name.split('.')[0] in {packages})
assert not leaked, leaked
import kernels  # Hugging Face's
assert callable(kernels.get_kernel) and 'site-packages' in kernels.__file__, kernels.__file__
print('ok', fat_vit.__version__, sorted(BACKBONES))
'''


def run(command, cwd: Path, env: dict = AWAY, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f'{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result


@pytest.fixture(scope='module')
def sdist(tmp_path_factory) -> Path:
    """The sdist of a copy of what a build of this repository reads (so that building leaves the checkout as it
    is), through setuptools' PEP 517 backend as pip and ``python -m build`` call it."""
    import shutil

    source = tmp_path_factory.mktemp('packaging') / 'source'
    for name in SOURCES:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns('__pycache__', '*.so'))
        else:
            shutil.copy(REPO_ROOT / name, source / name)
    dist = source.parent / 'dist'
    build_sdist = f'from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})'
    run([sys.executable, '-I', '-c', build_sdist], cwd=source)
    return next(dist.glob('fat_vit-*.tar.gz'))


@pytest.fixture(scope='module')
def wheel(sdist) -> Path:
    """The wheel built from the sdist, as pip builds an sdist it downloaded."""
    dist = sdist.parent
    run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--quiet', '--wheel-dir', dist,
         sdist], cwd=dist)
    return next(dist.glob('fat_vit-*.whl'))


@pytest.fixture(scope='module')
def installed(wheel, tmp_path_factory) -> dict:
    """The wheel installed into a fresh virtual environment that reuses this environment's packages (a .pth file
    naming its site-packages, after the environment's own), with nothing of the checkout on its path; a folder
    outside the checkout to run it from."""
    root = tmp_path_factory.mktemp('installed')
    venv = root / 'venv'
    run([sys.executable, '-m', 'venv', '--without-pip', venv], cwd=root)
    python = venv / 'bin' / 'python'
    own_site = Path(run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                        cwd=root).stdout.strip())
    (own_site / 'test_environment.pth').write_text('\n'.join(site.getsitepackages()) + '\n')
    run([python, '-m', 'pip', 'install', '--no-deps', '--no-index', '--quiet', wheel], cwd=root)
    away = root / 'away'
    away.mkdir()
    env = dict(AWAY, PATH=f'{venv / "bin"}{os.pathsep}{os.environ["PATH"]}')
    return dict(python=python, site=own_site, away=away, env=env)


def test_sdist_and_wheel_hold_everything_under_one_top_level_name(sdist, wheel):
    with tarfile.open(sdist) as archive:
        sources = {name.split('/', 1)[1] for name in archive.getnames() if '/' in name}
    assert {'kernels/csrc/depthwise_conv_kernels.cu', 'kernels/csrc/depthwise_conv_ops.cpp', 'MANIFEST.in',
            'configs/classification/fat_b0.yaml', 'configs/detection/_base_/fat_adamw_1x.py'} <= sources
    names = zipfile.ZipFile(wheel).namelist()
    read = lambda name: zipfile.ZipFile(wheel).read(name).decode()  # noqa: E731
    assert {name.split('/')[0] for name in names} == {'fat_vit', 'fat_vit-0.1.0.dist-info'}
    assert {name.split('/')[1] for name in names if name.startswith('fat_vit/')} == \
        {*PROJECT_PACKAGES, 'configs', '__init__.py'}
    configs = {name for name in names if name.startswith('fat_vit/configs/')}
    assert configs == {f'fat_vit/{path.relative_to(REPO_ROOT)}' for path in (REPO_ROOT / 'configs').rglob('*')
                       if path.suffix in ('.py', '.yaml')}
    # the modules' imports of one another, and the configs' custom_imports, point into fat_vit
    assert 'from fat_vit.classification.checkpoint_io import' in read('fat_vit/openmmlab/backbone.py')
    assert 'from fat_vit import openmmlab' in read('fat_vit/detection/__init__.py')
    detection, segmentation = '_base_/fat_adamw_1x.py', '_base_/fpn_fat_8xb2-80k_ade20k-512x512.py'
    assert "custom_imports = dict(imports=['fat_vit.detection']" in read(f'fat_vit/configs/detection/{detection}')
    assert "custom_imports = dict(imports=['fat_vit.segmentation']" in read(f'fat_vit/configs/segmentation/{segmentation}')
    entry_points = read('fat_vit-0.1.0.dist-info/entry_points.txt')
    assert set(re.findall(r'^(fat-[a-z-]+) = fat_vit\.', entry_points, re.M)) == COMMANDS
    metadata = read('fat_vit-0.1.0.dist-info/METADATA')
    requirements = [line.split(': ', 1)[1].split(';')[0] for line in metadata.splitlines()
                    if line.startswith('Requires-Dist: ')]
    assert {'torch>=2.6', 'timm<2,>=1.0.31', 'pillow<13'} <= set(requirements)
    assert not any('==' in requirement for requirement in requirements)  # exact pins stay in requirements.txt


def test_installed_package_works_away_from_the_checkout_beside_huggingface_kernels(installed):
    script = INSTALLED_USE.replace('{packages}', repr(set(PROJECT_PACKAGES)))
    result = run([installed['python'], '-c', script], cwd=installed['away'], env=installed['env'])
    assert result.stdout.startswith("ok 0.1.0 ['FAT', 'LVT']")


def test_two_copies_in_one_process_are_refused_naming_both(installed):
    command = [installed['python'], '-c', 'import classification, fat_vit']
    result = subprocess.run(command, cwd=installed['away'], env=dict(installed['env'], PYTHONPATH=str(REPO_ROOT)),
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert ('ImportError: fat_vit.classification.fat would register fat_b0 in timm, which has it already from '
            f'classification.fat ({REPO_ROOT / "classification" / "fat.py"}): two copies of this project in one '
            'process') in result.stderr


def test_entry_points_run_the_readme_commands_away_from_the_checkout(installed, tmp_path):
    """From a folder outside the checkout, through the installed commands: one epoch of the demo config (found
    among the packaged configs by its path under configs/) on a small image folder, an ONNX export with its parity
    check (by the TorchScript exporter, the quicker of the two; tests/test_deploy.py runs both), a
    one-model benchmark, and two iterations of a packaged detection config through MMDetection's own
    tools/train.py."""
    away, env = installed['away'], installed['env']
    usage = run(['fat-det-train', '--help'], cwd=away, env=env).stdout
    assert usage.startswith('usage: fat-det-train ')
    usage = run([installed['python'], '-m', 'fat_vit.classification.train', '--help'], cwd=away, env=env).stdout
    assert usage.startswith('usage: python -m fat_vit.classification.train ')

    images = write_image_folder(tmp_path / 'images', train_per_class=8, val_per_class=4)  # 3 classes
    on_images = ['--data-path', images, '--dataset', 'folder', '--batch-size', '8']
    trained = run(['fat-train', '--cfg', 'configs/classification/demo.yaml', *on_images, '--opts', 'TRAIN.EPOCHS',
                   '1', 'TRAIN.WARMUP_EPOCHS', '0', 'SAVE_FREQ', '1'], cwd=away, env=env)
    packaged = installed['site'] / 'fat_vit' / 'configs' / 'classification' / 'demo.yaml'
    assert f'configs/classification/demo.yaml is not a file here: using the packaged config {packaged}' in \
        trained.stderr
    summary = json.loads((away / 'output' / 'demo' / 'summary.json').read_text())
    assert [entry['epoch'] for entry in summary['history']] == [1]
    run(['fat-eval', '--cfg', 'classification/demo.yaml', '--resume', 'output/demo/latest.pth', *on_images],
        cwd=away, env=env)
    assert 'output/demo/latest.pth on 12 images: acc@1' in (away / 'output' / 'demo' / 'eval_log.txt').read_text()

    exported = run(['fat-export', '--model', 'fat_b0', '--format', 'onnx', '--output', 'fat_b0.onnx', '--img-size',
                    '64', '--exporter', 'torchscript', '--opset', '17'], cwd=away, env=env).stdout
    errors = [float(line.rsplit(' ', 1)[1]) for line in exported.splitlines() if 'relative error' in line]
    assert len(errors) == 2 and max(errors) <= 1e-4 and (away / 'fat_b0.onnx').is_file()

    run(['fat-benchmark', '--models', 'fat_b0', '--backend', 'torch', '--warmup', '1', '--latency-rounds', '2',
         '--throughput-batch-sizes', '2', '--throughput-warmup', '0', '--throughput-rounds', '1', '--no-flops',
         '--output-dir', 'bench'], cwd=away, env=env)
    rows = json.loads((away / 'bench' / 'benchmark.json').read_text())['rows']
    assert [(row['backend'], row['model']) for row in rows] == [('torch', 'fat_b0')]

    mmdet = pytest.importorskip('mmdet', reason='MMDetection is not installed (make setup-dense)')
    coco = write_tiny_coco(tmp_path / 'coco')
    packaged = installed['site'] / 'fat_vit' / 'configs' / 'detection' / 'retinanet_fat-b0_fpn_1x_coco.py'
    config = away / 'tiny_retinanet.py'
    config.write_text(f"""_base_ = '{packaged}'
metainfo = dict(classes=('disc', 'box'))
model = dict(backbone=dict(init_cfg=None), bbox_head=dict(num_classes=2))
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False, dataset=dict(
    data_root='{coco}/', ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
    metainfo=metainfo, pipeline=[dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
                                 dict(type='Resize', scale=(128, 96), keep_ratio=True), dict(type='PackDetInputs')]))
val_dataloader = val_cfg = val_evaluator = None
test_dataloader = test_cfg = test_evaluator = None
train_cfg = dict(max_epochs=1)
default_hooks = dict(logger=dict(interval=1))
""")
    tools_train = Path(mmdet.__file__).parent / '.mim' / 'tools' / 'train.py'
    run([installed['python'], tools_train, config, '--work-dir', 'work_dir'], cwd=away, env=env)
    scalars = [json.loads(line) for line in next((away / 'work_dir').glob('*/vis_data/scalars.json')).open()]
    assert [entry['iter'] for entry in scalars] == [1, 2]  # 8 images in batches of 4
    assert (away / 'work_dir' / 'epoch_1.pth').is_file()


def test_editable_install_is_refused_with_directions(sdist, tmp_path):
    # the PEP 660 hook that `pip install -e .` calls (-I: without the current folder on sys.path, as pip runs it)
    source = sdist.parent.parent / 'source'
    build_editable = f'from setuptools import build_meta; build_meta.build_editable({str(tmp_path)!r})'
    result = subprocess.run([sys.executable, '-I', '-c', build_editable], cwd=source, env=AWAY, capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert 'fat-vit has no editable install' in result.stdout + result.stderr
    assert not list(tmp_path.iterdir())
