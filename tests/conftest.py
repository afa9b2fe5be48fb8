import json
import os
import re
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
    """A checkpoint written by ``python -m classification.train``: FAT-B0, one epoch on a tiny dataset."""
    root = tmp_path_factory.mktemp('classification_trainer')
    data = write_image_folder(root / 'data', 4, 1)
    command = [sys.executable, '-m', 'classification.train', '--cfg', 'configs/classification/fat_b0.yaml',
               '--data-path', str(data), '--output', str(root / 'output'), '--batch-size', '4',
               '--opts', 'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0', 'DATA.IMG_SIZE', '32',
               'DATA.NUM_WORKERS', '0', 'MODEL.NUM_CLASSES', '3']
    run_ok(command)
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

def run_entry_point(module: str, *args) -> str:
    """Run ``python -m module args`` from the repository's root; its output, after checking it succeeded."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=REPO_ROOT, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, result.stdout[-6000:]
    return result.stdout


def read_json_lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def metrics_of_test_run(module: str, config: Path, checkpoint: Path, work_dir: Path, *cfg_options: str) -> dict:
    """The metrics that ``python -m module config checkpoint`` (an OpenMMLab test entry point) writes last."""
    options = ('--cfg-options', *cfg_options) if cfg_options else ()
    run_entry_point(module, config, checkpoint, '--work-dir', work_dir, *options)
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
