import itertools
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

import classification  # noqa: F401  (registers the FAT models with timm)
from classification import export

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get('FAT_REFERENCE_DIR', REPO_ROOT.parent / 'shared' / 'reference'))

# The seed of the training runs that tests hold to a floor (detection, segmentation, panoptic, the classifier's):
# FAT_TEST_SEED=1 pytest ... tries another. A floor must clear with margin under several seeds, as a proxy for
# another CPU's rounding, which sends a short training elsewhere as a seed does.
TRAINING_SEED = int(os.environ.get('FAT_TEST_SEED', '0'))

# Under pytest-xdist (make test runs a worker per core), each worker and the processes its tests start share the
# cores: one worker's OpenMP threads spinning beside another's would slow both.
_WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if _WORKERS > 1:
    THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(THREADS)
    os.environ['OMP_NUM_THREADS'] = str(THREADS)


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


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """Under pytest-xdist's ``--dist loadgroup`` (make test), the tests that share a module-scoped fixture (a trained
    detector, a traced model) run on one worker, which builds it once; the others go wherever a worker is free."""
    for item in items:
        if any(definitions[-1].scope == 'module' for definitions in item._fixtureinfo.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Each test starts from seed 0, and leaves the number of threads as it found it (the benchmark sets its own)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class RunsShellCommand:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


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


TINY_COCO_SIZE = (128, 96)
TINY_COCO_CATEGORIES = [{'id': 1, 'name': 'disc'}, {'id': 2, 'name': 'box'}]


def _polygon(rng, category):
    width, height = TINY_COCO_SIZE
    radius = int(rng.integers(12, 24))
    cx, cy = int(rng.integers(radius, width - radius)), int(rng.integers(radius, height - radius))
    if category['name'] == 'disc':
        angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        return np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
    return np.array([[cx - radius, cy - radius * .7], [cx + radius, cy - radius * .7],
                     [cx + radius, cy + radius * .7], [cx - radius, cy + radius * .7]])


def write_tiny_coco(root: Path) -> Path:
    """COCO layout in ``root``, 8 train and 4 val images of 128x96 with 1-2 discs and boxes each (boxes, polygon
    masks), categories ``TINY_COCO_CATEGORIES``."""
    import cv2  # OpenCV comes with the OpenMMLab stack

    rng = np.random.default_rng(0)
    width, height = TINY_COCO_SIZE
    (root / 'annotations').mkdir(parents=True)
    for split, count in (('train', 8), ('val', 4)):
        (root / split).mkdir()
        images, annotations = [], []
        for image_id in range(1, count + 1):
            image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
            for _ in range(rng.integers(1, 3)):
                category = TINY_COCO_CATEGORIES[rng.integers(0, 2)]
                polygon = _polygon(rng, category)
                color = (40, 200, 240) if category['name'] == 'disc' else (220, 120, 30)
                cv2.fillPoly(image, [polygon.round().astype(np.int32)], color)
                (x0, y0), (x1, y1) = polygon.min(0), polygon.max(0)
                x, y = polygon[:, 0], polygon[:, 1]
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=image_id, category_id=category['id'], iscrowd=0,
                    bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    area=float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2),
                    segmentation=[polygon.flatten().round(1).tolist()]))
            file_name = f'{image_id:012d}.jpg'
            cv2.imwrite(str(root / split / file_name), image)
            images.append(dict(id=image_id, file_name=file_name, width=width, height=height))
        (root / 'annotations' / f'instances_{split}.json').write_text(json.dumps(
            dict(info={}, licenses=[], images=images, annotations=annotations, categories=TINY_COCO_CATEGORIES)))
    return root


def run_ok(command, timeout=600) -> subprocess.CompletedProcess:
    """Run a command from the repository's root; its result, after checking it succeeded."""
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result



def assert_reported_accuracy_matches(stdout: str, model: torch.nn.Module, val) -> None:
    """The trainer's ``--eval`` report on the 12 images of ``val`` equals top-1 and top-5 of the model's own
    predictions, image by image."""
    reported = re.search(r'on 12 images: acc@1 ([\d.]+) %  acc@5 ([\d.]+) %', stdout)
    assert reported
    images = torch.stack([val[i][0] for i in range(len(val))])
    targets = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        top5 = model.eval()(images).topk(5).indices
    assert float(reported.group(1)) == pytest.approx(100 * (top5[:, 0] == targets).float().mean().item(), abs=0.01)
    assert float(reported.group(2)) == pytest.approx(100 * (top5 == targets[:, None]).any(1).float().mean().item(),
                                                     abs=0.01)


def assert_channels_last_autocast_trains(name: str, dtype: torch.dtype) -> None:
    """A registered model runs forward in ``dtype`` under CPU autocast on channels-last input, with finite
    gradients for every parameter."""
    import timm

    model = timm.create_model(name).train().to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=dtype):
        logits = model(images)
    assert logits.dtype == dtype
    logits.float().logsumexp(1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

@pytest.fixture(scope='session')
def classification_trainer_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint written by the classification trainer (``python -m classification.train``'s ``run``, in this
    process): FAT-B0, one epoch on a tiny dataset."""
    from classification.train import parse_args, run

    root = tmp_path_factory.mktemp('classification_trainer')
    data = write_image_folder(root / 'data', 4, 1)
    run(parse_args(['--cfg', str(REPO_ROOT / 'configs' / 'classification' / 'fat_b0.yaml'), '--data-path', str(data),
                    '--output', str(root / 'output'), '--batch-size', '4',
                    '--opts', 'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0', 'DATA.IMG_SIZE', '32',
                    'DATA.NUM_WORKERS', '0', 'MODEL.NUM_CLASSES', '3', 'SEED', str(TRAINING_SEED)]))
    return root / 'output' / 'latest.pth'


@pytest.fixture(scope='session')
def lvt_classification_checkpoint(tmp_path_factory) -> Path:
    """An LVT ImageNet classifier's weights (``lvt_cls``, untrained) as a plain state dict, the form of timm's
    exports."""
    import timm

    path = tmp_path_factory.mktemp('lvt_classifier') / 'lvt_cls.pth'
    torch.manual_seed(0)  # the same weights whichever tests ran before
    torch.save(timm.create_model('lvt_cls').state_dict(), path)
    return path


# ---- OpenMMLab entry points (detection and segmentation tests) ---------------------------------------------------


def fat_configs(task: str) -> list:
    """The FAT configs of ``configs/<task>/`` and its ablation folder (those for LVT have their own protocol)."""
    return sorted(path for path in (REPO_ROOT / 'configs' / task).rglob('*.py')
                  if '_base_' not in path.parts and '_fat-' in path.name)

_IN_PROCESS_RUNS = itertools.count()


def run_entry_point(module: str, *args, process: bool = False) -> str:
    """Run ``python -m module args`` (an OpenMMLab entry point); its log, after checking it succeeded. In this process,
    unless ``process``: a run of its own costs seconds of imports, so only some runs of each command take one. An
    in-process run gets an experiment name of its own (``--cfg-options experiment_name=...``): MMEngine keys its
    logger by that name, by default the config's name and the second the run started, which two runs in one second
    would share; and its visualizer by the config's ``visualizer.name``, which OpenMMLab's bases fix to
    'visualizer', so that a second run would write its scalars into the first one's folder."""
    argv = [str(arg) for arg in args]
    if process:
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')]))
        result = subprocess.run([sys.executable, '-m', module, *argv], cwd=REPO_ROOT, env=environment,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert result.returncode == 0, result.stdout[-6000:]
        return result.stdout
    name = f'in_process_{os.getpid()}_{next(_IN_PROCESS_RUNS)}'
    names = [f'experiment_name={name}', f'visualizer.name={name}']
    argv = argv[:argv.index('--cfg-options') + 1] + names + argv[argv.index('--cfg-options') + 1:] \
        if '--cfg-options' in argv else argv + ['--cfg-options', *names]
    saved = sys.argv
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name='__main__')
    finally:
        sys.argv = saved
    work_dir = Path(argv[argv.index('--work-dir') + 1])
    return max(work_dir.glob('*/*.log'), key=lambda path: path.stat().st_mtime).read_text()


def read_json_lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def metrics_of_test_run(module: str, config: Path, checkpoint: Path, work_dir: Path, *cfg_options: str,
                        process: bool = False) -> dict:
    """The metrics that ``python -m module config checkpoint`` (an OpenMMLab test entry point) writes last."""
    options = ('--cfg-options', *cfg_options) if cfg_options else ()
    run_entry_point(module, config, checkpoint, '--work-dir', work_dir, *options, process=process)
    return read_json_lines(next(work_dir.glob('*/*.json')))[-1]


def with_zeroed_weights(checkpoint: Path, prefixes: tuple, path: Path) -> Path:
    """A copy of an MMEngine checkpoint's model with the weights under ``prefixes`` zeroed: a broken head."""
    from openmmlab.checkpoints import load_from_local_restricted

    saved = load_from_local_restricted(str(checkpoint))
    zeroed = [key for key in saved['state_dict'] if key.startswith(prefixes)]
    assert {prefix for prefix in prefixes if any(key.startswith(prefix) for key in zeroed)} == set(prefixes)
    for key in zeroed:
        saved['state_dict'][key].zero_()
    torch.save(dict(meta=saved['meta'], state_dict=saved['state_dict']), path)
    return path


def cli_exit(command, *args) -> SystemExit:
    """The SystemExit of ``openmmlab.cli.train`` or ``openmmlab.cli.test`` run in this process on bad input."""
    with pytest.raises(SystemExit) as exit_info:
        command('pytest', '', [str(arg) for arg in args])
    return exit_info.value


def build_and_check_model(cfg, config: Path, registry):
    """Build a config's model; check its ImageNet checkpoint, neck / head widths and the header's parameter
    count."""
    import timm

    arch = cfg.model.backbone.arch
    assert cfg.model.backbone.init_cfg == dict(type='Pretrained', checkpoint=f'pretrained/{arch}.pth')
    model = registry.build(cfg.model)
    widths = timm.create_model(arch, features_only=True).feature_info.channels()
    neck = cfg.model.get('neck')
    in_channels = neck.in_channels if neck else cfg.model.decode_head.in_channels
    assert list(in_channels) == model.backbone.out_channels == widths
    num_params = sum(p.numel() for p in model.parameters())
    assert f'# Parameters: {num_params / 1e6:.1f} M' in config.read_text()
    return model


def randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm and GroupNorm statistics and affine parameters far from the identity, so that a
    fusion that forgets one of them shows."""
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model.eval()


def skip_without_runtime(fmt: str):
    """Skip the calling test, with the reason, where the runtime of ``fmt`` is not installed."""
    try:
        export.require(fmt)
    except export.RuntimeMissing as missing:
        pytest.skip(str(missing))


# FAT-B0, an ablation model (its projection takes both branches) and LVT, whose graph depends on the input size, each
# shallower than registered: every module type of the full model (for FAT, a stride-2 block opening each later stage,
# a block of each stage's kind after it), in about half the graph. ExecuTorch's lowering and NNCF's quantization grow
# with the graph, so tests of the tools' own behaviour export these; the full models are exported to ONNX and
# OpenVINO by tests/test_timmx.py, and the full FAT-B0 by the TorchScript ONNX exporter's command test in
# tests/test_deploy.py.
SHALLOW_FAT_B0_DEPTHS = (2, 2, 2, 1)
SHALLOW_MODELS = {'fat_b0': dict(depths=SHALLOW_FAT_B0_DEPTHS), 'fat_b0_cat': dict(depths=SHALLOW_FAT_B0_DEPTHS),
                  'lvt_cls': dict(depths=(1, 1, 1, 1), num_class_blocks=1)}


def build_shallow_by_name(monkeypatch, names: Sequence[str]):
    """Within the test, the models ``names`` built by name, by whichever caller (the exporter, the benchmark, timmx,
    the test), take their ``SHALLOW_MODELS`` arguments."""
    import timm

    create_model = timm.create_model

    def create_shallow(name, *args, **kwargs):
        if name in names:
            kwargs = {**SHALLOW_MODELS[name], **kwargs}
        return create_model(name, *args, **kwargs)
    monkeypatch.setattr(timm, 'create_model', create_shallow)


@pytest.fixture
def shallow_fat_b0(monkeypatch):
    """Within the test, ``fat_b0`` built by name has ``SHALLOW_FAT_B0_DEPTHS`` (``build_shallow_by_name``)."""
    build_shallow_by_name(monkeypatch, ['fat_b0'])
