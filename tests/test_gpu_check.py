"""tools/gpu_check.py, the GPU check: its CPU rehearsal (make gpu-check-smoke) end to end, and the runner's handling
of failing, overrunning and CUDA-only steps and of missing packages."""
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / 'tools' / 'gpu_check.py'
STEP_NAMES = ['dependencies', 'kernels_build', 'kernels_tests', 'kernels_benchmark', 'model_benchmark',
              'trainer_bf16_resume', 'trainer_fp16', 'trainer_fat_b2', 'model_benchmark_compiled']


def load_gpu_check():
    spec = importlib.util.spec_from_file_location('gpu_check', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rehearsal(gpu_check, tmp_path: Path, *options: str):
    """A Check of the CPU rehearsal writing to tmp_path, as main() sets it up."""
    out, work = tmp_path / 'out', tmp_path / 'work'
    out.mkdir(parents=True)
    work.mkdir(parents=True)
    gpu_check.clear_work_folder(work)
    check = gpu_check.Check(gpu_check.parse_args(['--smoke', '--work-dir', str(work), *options]), out, work)
    check.environment = dict(device='cpu')
    return check


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), **env))


def _alive(pid: int) -> bool:
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return False


def test_a_failing_or_overrunning_step_is_reported_and_the_next_one_runs(tmp_path):
    gpu_check = load_gpu_check()
    check = rehearsal(gpu_check, tmp_path)
    # a command that starts a process in a session of its own, as torchrun starts its workers
    sleeper = ('import subprocess, sys, time\n'
               'child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],\n'
               '                         start_new_session=True)\n'
               'print("grandchild", child.pid, flush=True)\n'
               'time.sleep(120)\n')

    def fails(check):
        raise gpu_check.StepFailed('broken on purpose', dict(partial=1))

    def hangs(check):
        check.run([sys.executable, '-c', sleeper], 'the sleeper')

    def passes(check):
        return dict(answer=42)

    Step = gpu_check.Step
    check.run_steps([Step('fails', 'fails', fails, 60, 60), Step('hangs', 'hangs', hangs, 60, 3),
                     Step('passes', 'passes', passes, 60, 60),
                     Step('on_cuda', 'cuda only', passes, 60, 60, cuda_only='needs a CUDA GPU')])

    report = json.loads((tmp_path / 'out' / 'report.json').read_text())
    assert not report['check']['complete']  # written after each step; main() writes the final one
    steps = {step['name']: step for step in report['steps']}
    assert [step['name'] for step in report['steps']] == ['fails', 'hangs', 'passes', 'on_cuda']
    assert (steps['fails']['status'], steps['fails']['reason'], steps['fails']['figures']) == \
        ('failed', 'broken on purpose', dict(partial=1))
    assert steps['hangs']['status'] == 'failed' and steps['hangs']['limit_seconds'] == 3
    reason = steps['hangs']['reason']
    assert 'the sleeper timed out' in reason and "by the step's limit of 3 s" in reason
    grandchild = int(next(line for line in steps['hangs']['log_tail'] if line.startswith('grandchild')).split()[1])
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
    assert (steps['passes']['status'], steps['passes']['figures']) == ('passed', dict(answer=42))
    assert (steps['on_cuda']['status'], steps['on_cuda']['reason']) == ('skipped', 'needs a CUDA GPU')
    assert report['summary'] == dict(passed=1, failed=2, skipped=1)
    markdown = (tmp_path / 'out' / 'report.md').read_text()
    assert '| hangs | failed |' in markdown and '## hangs failed: the end of its log' in markdown


def _fake_wheel(folder: Path, name: str, version: str, module: str) -> Path:
    """A pure-Python wheel of distribution ``name`` holding the package ``module``."""
    folder.mkdir(exist_ok=True)
    wheel = folder / f'{name}-{version}-py3-none-any.whl'
    info = f'{name}-{version}.dist-info'
    with zipfile.ZipFile(wheel, 'w') as archive:
        archive.writestr(f'{module}/__init__.py', 'VALUE = 1\n')
        archive.writestr(f'{info}/METADATA', f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n')
        archive.writestr(f'{info}/WHEEL',
                         'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n')
        archive.writestr(f'{info}/RECORD', '')
    return wheel


def test_missing_packages_come_from_the_wheels_or_are_named(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()
    name = 'gpu_check_test_package'
    monkeypatch.setattr(gpu_check, 'REQUIRED', ((name, name), ('yacs', 'yacs')))
    dependencies = [step for step in gpu_check.STEPS if step.name == 'dependencies']

    without = rehearsal(gpu_check, tmp_path / 'without', '--wheels', str(tmp_path / 'no-wheels'))
    without.run_steps(dependencies)
    assert without.results[0]['status'] == 'failed'
    assert f'missing: {name} (ImportError' in without.results[0]['reason']
    assert 'make gpu-wheels' in without.results[0]['reason']

    # one package missing, one at another version than the wheel's: both come from the wheels
    _fake_wheel(tmp_path / 'wheels', name, '1.0', name)
    _fake_wheel(tmp_path / 'wheels', 'yacs', '99.0', 'yacs')
    with_wheels = rehearsal(gpu_check, tmp_path / 'with', '--wheels', str(tmp_path / 'wheels'))
    with_wheels.run_steps(dependencies)
    result = with_wheels.results[0]
    assert result['status'] == 'passed', result
    assert result['figures']['installed_for_the_check'] == {'gpu-check-test-package': [None, '1.0'],
                                                             'yacs': ['0.1.8', '99.0']}
    assert result['figures']['versions'] == {name: '1.0', 'yacs': '99.0'}
    # the later steps' subprocesses import them from the work folder
    assert with_wheels.env()['PYTHONPATH'].split(os.pathsep)[1] == str(with_wheels.site)
    assert (with_wheels.site / name / '__init__.py').exists()


@pytest.mark.slow  # runs a process of its own: left out of the fast tier
def test_bad_report_or_work_folder_stops_with_one_line(tmp_path):
    not_a_folder = tmp_path / 'file'
    not_a_folder.write_text('')
    result = run_script('--smoke', GPU_CHECK_OUT=str(not_a_folder))
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip() == f'error: GPU_CHECK_OUT {not_a_folder} is a file, not a folder'

    result = run_script('--smoke', '--out', '/proc/gpu-check')
    assert result.returncode == 2 and result.stderr.startswith('error: --out /proc/gpu-check cannot be written')

    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('keep me')
    result = run_script('--smoke', '--out', str(tmp_path / 'out'), '--work-dir', str(foreign))
    assert 'is not empty and was not made by this check' in result.stderr
    assert (foreign / 'notes.txt').read_text() == 'keep me'


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_step_and_reports_it(tmp_path):
    """`make gpu-check-smoke`: the CUDA-only steps skipped with their reason, every other step run at tiny sizes,
    the report in GPU_CHECK_OUT; the bf16 steps in bf16 where the CPU computes it natively, else in float32, as the
    report says."""
    out = tmp_path / 'report'
    result = run_script('--smoke', '--work-dir', str(tmp_path / 'work'), GPU_CHECK_OUT=str(out))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    report = json.loads((out / 'report.json').read_text())
    assert report['check']['complete'] and report['check']['mode'].startswith('smoke')
    assert report['environment']['device'] == 'cpu' and report['environment']['torch']
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert report['environment']['cpu_native_bf16'] == native_bf16
    precision = report['check']['bf16_steps_precision']
    assert precision == 'bf16' if native_bf16 else precision.startswith('float32: this CPU has no native bf16')
    steps = {step['name']: step for step in report['steps']}
    assert list(steps) == STEP_NAMES
    skipped = {name for name, step in steps.items() if step['status'] == 'skipped'}
    assert skipped == {'kernels_build', 'kernels_tests', 'model_benchmark_compiled'}
    assert all(step['status'] == 'passed' for name, step in steps.items() if name not in skipped), steps
    assert 'needs a CUDA GPU' in steps['kernels_build']['reason']
    assert 'torch.compile' in steps['model_benchmark_compiled']['reason']
    tests = steps['kernels_tests']['figures']  # pytest ran: every gpu test collected and skipped for want of a GPU
    assert tests['tests'] >= 40 and tests['skipped'] == tests['tests'] and tests['failures'] == tests['errors'] == 0
    assert 'needs a CUDA GPU' in steps['kernels_tests']['reason']

    kernels = steps['kernels_benchmark']['figures']
    assert kernels['copy_gbs'] > 0 and not kernels['extension']
    assert {(row['model'], row['kernel_size'], row['batch']) for row in kernels['rows']} == {
        (model, k, batch) for model in ('fat_b0', 'fat_b2') for k in (7, 9) for batch in (1, 2)}
    for row in kernels['rows']:
        assert row['nchw_training_ms'] > 0 and row['channels_last_forward_gbs'] > 0
        assert row['channels_last_relative_difference'] < 1e-2

    models = steps['model_benchmark']['figures']
    rows = {row['model']: row for row in models['rows']}
    assert set(rows) == {'fat_b0', 'mobilevit_xs', 'fat_b2', 'efficientnet_b3'}
    assert all(row['latency_ms'] > 0 and row['throughput_b2'] > 0 and row['train_b2'] > 0 for row in rows.values())
    paper = {(c['model'], c['versus']): c for c in models['paper_comparisons']}
    assert set(paper) == {('fat_b0', 'mobilevit_xs'), ('fat_b2', 'efficientnet_b3')}
    assert paper['fat_b0', 'mobilevit_xs']['paper'] == pytest.approx(1.41, abs=0.005)
    assert paper['fat_b2', 'efficientnet_b3']['paper'] == pytest.approx(1.71, abs=0.005)
    assert paper['fat_b0', 'mobilevit_xs']['measured'] == pytest.approx(1 / rows['mobilevit_xs']['throughput_b2_x_fat'])

    resumed = steps['trainer_bf16_resume']['figures']
    assert resumed['epochs'] == [1, 2] and resumed['resumed_after_epoch'] == 1  # killed after its first checkpoint
    fp16, fat_b2 = steps['trainer_fp16']['figures'], steps['trainer_fat_b2']['figures']
    assert fp16['loss_scale'] > 0 and resumed['loss_scale'] is None and fat_b2['epochs'] == [1]
    for run in (resumed, fp16, fat_b2):
        assert run['last_epoch_steps']['images_per_second'] > 0 and run['ema_acc1'] is not None
        assert run['global_batch'] == 50 and run['peak_memory_gib'] is None  # CPU: no CUDA memory figure

    markdown = (out / 'report.md').read_text()
    for heading in ('## Steps', '## kernels_benchmark', '## model_benchmark', '## The trainer', '## Not covered'):
        assert heading in markdown
    assert '| fat_b0 | mobilevit_xs | 2 |' in markdown and 'mmcv' in markdown
    assert f'The bf16 steps ran in {precision}.' in markdown


def test_benchmark_without_batch1_latency(tmp_path, capsys):
    """The compiled step's benchmark: --latency-rounds 0 leaves out batch 1, so each model compiles for one shape."""
    from classification import benchmark

    benchmark.main(['--models', 'fat_b0', '--latency-rounds', '0', '--throughput-batch-sizes', '2',
                    '--throughput-warmup', '0', '--throughput-rounds', '1', '--no-flops',
                    '--output-dir', str(tmp_path)])
    assert 'latency' not in capsys.readouterr().out
    result = json.loads((tmp_path / 'benchmark.json').read_text())
    assert result['seconds_per_round'].keys() == {'torch'} and 'latency_ms' not in result['rows'][0]
    assert list(result['seconds_per_round']['torch']) == ['throughput_b2']
    assert result['rows'][0]['throughput_b2'] > 0
    with pytest.raises(SystemExit):
        benchmark.main(['--latency-rounds', '1'])
    assert '--latency-rounds must be 0 (no batch-1 latency) or at least 2' in capsys.readouterr().err


def test_report_renders_what_only_a_gpu_measures(tmp_path):
    """report.md from figures shaped as a GPU run gives them (the extension's column, memory, loss scale, the paper's
    ratios at the paper's batch), so that the first GPU run cannot fail on its own report."""
    from kernels.benchmark import summarise

    gpu_check = load_gpu_check()
    check = rehearsal(gpu_check, tmp_path)
    check.smoke = False
    check.environment = dict(device='NVIDIA H200', gpus=1, compute_capability='9.0', multiprocessors=132,
                             memory_gib=139.8, driver='580.159.03', torch='2.11.0+cu130', torch_cuda='13.0')
    layer = dict(model='fat_b0', batch=128, channels=160, height=14, width=14, kernel_size=7, dtype='float16',
                 forward_bytes=8_028_160, training_bytes=20_070_400, channels_last_relative_difference=1e-3,
                 extension_relative_difference=2e-3)
    for path, milliseconds in (('nchw', 0.02), ('channels_last', 0.015), ('extension', 0.01)):
        for phase, scale in (('forward', 1), ('training', 3)):
            layer[f'{path}_{phase}_ms'] = scale * milliseconds
            layer[f'{path}_{phase}_gbs'] = layer[f'{phase}_bytes'] / (scale * milliseconds) / 1e6
    kernels = dict(device='NVIDIA H200', copy_gbs=4300., driver_peak_gbs=None, reference_gbs=4300., extension=True,
                   extension_error=None, rows=[layer], summary=summarise([layer], 128))

    def model(name, vs, x_fat, throughput=2000.):
        return dict(model=name, vs=vs, input_size=224, latency_ms=4.0, latency_ms_x_fat=1 / x_fat,
                    throughput_b64=throughput, throughput_b64_x_fat=x_fat, throughput_b256=throughput,
                    throughput_b256_x_fat=x_fat, train_b128=throughput / 3, train_b128_x_fat=x_fat)

    rows = [model('fat_b0', 'fat_b0', 1.), model('mobilevit_xs', 'fat_b0', .5), model('lvt_cls', 'fat_b0', .8),
            model('fat_b2', 'fat_b2', 1.), model('efficientnet_b3', 'fat_b2', .4),
            model('convnext_small', 'fat_b3', .9)]
    settings = dict(amp='bf16', memory_format='channels_last', deploy=True, compile=False, throughput_rounds=10,
                    latency_rounds=50, throughput_batch_sizes=[64, 256], train_batch_size=128)
    models = dict(machine=dict(gpu='NVIDIA H200'), settings=settings, rows=rows, latency_comparisons=[],
                  paper_comparisons=gpu_check.paper_comparisons(rows, [64, 256]))
    compiled = dict(machine=dict(gpu='NVIDIA H200'), rows=[model('fat_b0', 'fat_b0', 1., 3000.)],
                    settings=dict(settings, compile=True, latency_rounds=0, throughput_batch_sizes=[64],
                                  train_batch_size=None),
                    paper_comparisons=[], speedup_over_eager_b64=dict(fat_b0=1.5))
    trainer = dict(epochs=[1, 2], processes=1, global_batch=128, train_loss=[2.3, 2.2], val_acc1=10., ema_acc1=11.,
                   epoch_images_per_second=[1, 2], peak_memory_gib=12.5, loss_scale=65536.,
                   last_epoch_steps=dict(images_per_second=3000., data_seconds_per_batch=.01,
                                         compute_seconds_per_batch=.04))
    for name, figures in (('kernels_benchmark', kernels), ('model_benchmark', models), ('trainer_fp16', trainer),
                          ('model_benchmark_compiled', compiled)):
        check.results.append(dict(name=name, description=name, status='passed', seconds=1., limit_seconds=60.,
                                  reason=None, figures=figures))
    check.write_report(complete=True)
    markdown = (tmp_path / 'out' / 'report.md').read_text()

    paper = {(c['model'], c['versus'], c['batch']): c for c in models['paper_comparisons']}
    assert set(paper) == {(fat, peer, batch) for fat, peer in (('fat_b0', 'mobilevit_xs'), ('fat_b0', 'lvt_cls'),
                                                                ('fat_b2', 'efficientnet_b3')) for batch in (64, 256)}
    assert paper['fat_b0', 'lvt_cls', 64]['paper'] == pytest.approx(1932 / 1265)
    assert '| fat_b0 | mobilevit_xs | 64 | 2.00× | 1.41× |' in markdown
    assert '| fat_b2 | efficientnet_b3 | 256 | 2.50× | 1.71× |' in markdown
    assert '# GPU check: NVIDIA H200' in markdown and 'NVIDIA H200 × 1, compute capability 9.0, 132 SMs' in markdown
    assert ('| fat_b0 | 128 | 160, 14, 14, 7 | float16 | 0.0200 (9 %), 2.00× | 0.0150 (12 %), 1.50× | 0.0100 (19 %) |'
            in markdown)
    assert 'Batch 128, float16, geometric mean over 1 layers' in markdown and 'channels-last 1.50 forward' in markdown
    assert '| trainer_fp16 | 1 × 128 | 3000.0 | 0.010 / 0.040 | 12.50 | 65536 |' in markdown
    assert 'Compiled over eager throughput at batch 64 (two runs): fat_b0 1.50×.' in markdown
