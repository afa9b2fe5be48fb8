#!/usr/bin/env python3
"""Every GPU path of the repository checked and measured by one command, within a short lease of a GPU.

    python3 tools/gpu_check.py             (make gpu-check)        on a machine with a CUDA GPU
    python3 tools/gpu_check.py --smoke     (make gpu-check-smoke)  the same steps on the CPU, tiny

It runs the repository's own entry points, each step under its own time limit and all of them under one budget
(390 s on a GPU by default, --budget); a step that fails is reported and the next one runs:

    dependencies              the packages the steps import; missing ones installed from gpu-wheels/
                              (tools/gpu_wheels.sh) into the work folder, beside the machine's torch
    kernels_build             kernels/ built in place for this GPU (setup.py build_ext --inplace, all cores)
    kernels_tests             the gpu-marked tests of tests/test_kernels.py
    kernels_benchmark         python -m kernels.benchmark: the extension against cuDNN at FAT's 7x7 and 9x9 layers
    model_benchmark           python -m classification.benchmark --device cuda: FAT, LVT and the paper's peers
    trainer_bf16_resume       the ImageNet trainer on generated data through torchrun: bf16, channels-last, EMA;
                              killed after its first checkpoint, then resumed
    trainer_fp16              the same in fp16 with the GradScaler
    trainer_fat_b2            FAT-B2's training speed and memory at batch 128
    model_benchmark_compiled  torch.compile throughput of FAT-B0 and its two paper peers, if the budget allows

The report, report.md and report.json, goes to gpu-check/, or the folder GPU_CHECK_OUT or --out names; it is
rewritten after every step, so a check stopped from outside still reports the steps it finished. Every step's log,
the trainer's runs and the generated dataset stay in the work folder (build/gpu-check/, --work-dir). The exit
status is 1 when a step failed, 2 when the check could not start. docs/benchmarks.md says how to read the report.

The rehearsal runs the bf16 steps in bf16 where the CPU computes it natively (AVX-512 BF16 or AMX, as oneDNN reports
it) and in float32 elsewhere, where bf16 autocast would be emulated and many times slower; the report says which.
"""
import argparse
import datetime
import importlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / 'gpu-check'
DEFAULT_WORK = REPO / 'build' / 'gpu-check'
DEFAULT_WHEELS = REPO / 'gpu-wheels'
GPU_BUDGET_SECONDS = 390
SMOKE_BUDGET_SECONDS = 240
SMOKE_SHAPES_PER_CLASS = (10, 5)  # training and validation images a class of the rehearsal's generated dataset
# The rehearsal's budget and step limits were sized on a machine where probe_seconds() measured this, idle (a 2-core
# AMD EPYC with AVX2 only, 2 threads: its steps took 175-185 s, the fp16 one 67-78 s, fp16 autocast being emulated
# there as bf16 is, on the full generated dataset); on a slower or busier CPU they stretch by what the probe measures
# there.
SMOKE_PROBE_REFERENCE_SECONDS = 2.5
LOG_TAIL_LINES = 40

# What the steps import: (module, distribution). tools/gpu_wheels.sh fetches those a GPU machine's image may lack or
# hold at another version than requirements.txt pins (timm, and Pillow, whose version 13 breaks RandAugment).
REQUIRED = (('yacs.config', 'yacs'), ('fvcore.nn', 'fvcore'), ('iopath', 'iopath'), ('termcolor', 'termcolor'),
            ('timm', 'timm'), ('PIL', 'pillow'), ('torch', 'torch'),
            ('torchvision', 'torchvision'), ('numpy', 'numpy'), ('yaml', 'pyyaml'), ('tqdm', 'tqdm'),
            ('tensorboard', 'tensorboard'), ('scipy', 'scipy'), ('tabulate', 'tabulate'),
            ('portalocker', 'portalocker'), ('pytest', 'pytest'), ('setuptools', 'setuptools'))

NOT_COVERED = (
    'Detection and segmentation (MMDetection, MMSegmentation) on CUDA: they need mmcv compiled on the machine '
    '(over 10 minutes), which does not fit the check; their CPU tests run in `make test`.',
    'The trainer\'s DDP and SyncBatchNorm paths: torchrun starts one process per GPU, and with one GPU the trainer '
    'runs a world of one, without them (classification/train.py); on a machine with several GPUs the trainer steps '
    'run two processes, which use them.',
    'FAT end to end on the CUDA depthwise kernel: the FAT_CUDA_DWCONV switch is not wired into classification/fat.py '
    'yet (kernels/README.md); kernels_benchmark gives the per-layer figures that decide it.',
    'The compiled training step: model_benchmark_compiled times compiled inference only.',
)


class StepFailed(Exception):
    def __init__(self, reason: str, figures: Optional[Dict] = None):
        super().__init__(reason)
        self.figures = figures or {}


class StepSkipped(StepFailed):
    pass


class StepTimedOut(StepFailed):
    def __init__(self, reason: str, by_budget: bool):
        super().__init__(reason)
        self.by_budget = by_budget  # the check's budget ran out, not the step's own limit


class Step(NamedTuple):
    name: str
    description: str
    run: Callable[['Check'], Dict]
    limit: float  # seconds on a GPU
    smoke_limit: float  # seconds in the CPU rehearsal
    cuda_only: Optional[str] = None  # why the CPU rehearsal skips it


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec='seconds')


def _descendants(pid: int) -> List[int]:
    """The processes below ``pid``, from /proc (torchrun's workers run in sessions of their own)."""
    children: Dict[int, List[int]] = {}
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def kill_tree(process: subprocess.Popen):
    """SIGKILL a process this check started and everything it started."""
    for pid in [process.pid] + _descendants(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


class Check:
    def __init__(self, args: argparse.Namespace, out: Path, work: Path):
        self.args = args
        self.smoke = args.smoke
        self.out = out
        self.work = work
        self.python = sys.executable
        self.site = work / 'site'
        self.started = time.monotonic()
        self.started_at = _now()
        self.budget = args.budget or (SMOKE_BUDGET_SECONDS if self.smoke else GPU_BUDGET_SECONDS)
        self.extra_paths: List[str] = []
        self.environment: Dict = {}
        self.results: List[Dict] = []
        self.step_deadline = math.inf
        self.step_name = ''
        self.current_limit = 0.0
        self.gpus = 0
        # what the bf16 steps run in: float32 in a rehearsal on a CPU without native bf16 (describe_environment)
        self.bf16 = True
        # the rehearsal's limits and budget over those it was sized with (calibrate())
        self.time_scale = 1.0
        self.probe_seconds: Optional[float] = None

    def calibrate(self):
        """In the rehearsal, stretch the budget and the step limits by how much slower this machine runs the probe than
        the one they were sized on (never shrink them)."""
        self.probe_seconds = probe_seconds()
        self.time_scale = max(1.0, self.probe_seconds / SMOKE_PROBE_REFERENCE_SECONDS)
        self.budget *= self.time_scale

    # ---- time -------------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        """Seconds left to the current step: its own limit or the check's budget, whichever ends first."""
        return min(self.step_deadline, self.started + self.budget) - time.monotonic()

    # ---- subprocesses -----------------------------------------------------------------------------------------

    def env(self, **extra: str) -> Dict[str, str]:
        paths = [str(REPO)] + self.extra_paths + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED='1')
        if self.smoke:
            env['CUDA_VISIBLE_DEVICES'] = ''  # the rehearsal runs on the CPU even where a GPU is
        env.update(extra)
        return env

    @property
    def log_path(self) -> Path:
        return self.work / 'logs' / f'{self.step_name}.log'

    def start(self, argv: Sequence[str], **extra_env: str) -> subprocess.Popen:
        with open(self.log_path, 'a') as log:
            log.write(f'$ {" ".join(map(str, argv))}\n')
            log.flush()
            return subprocess.Popen([str(a) for a in argv], cwd=REPO, env=self.env(**extra_env), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait(self, process: subprocess.Popen, what: str) -> int:
        try:
            return process.wait(timeout=max(self.remaining(), 1))
        except subprocess.TimeoutExpired:
            kill_tree(process)
            by_budget = self.started + self.budget < self.step_deadline
            raise StepTimedOut(f'{what} timed out: stopped at {self.elapsed():.0f} s into the check, by the '
                               + (f"check's budget of {self.budget:.0f} s" if by_budget else
                                  f"step's limit of {self.current_limit:.0f} s"), by_budget) from None
        except BaseException:  # Ctrl-C or SIGTERM: the step's processes (torchrun's workers too) end with the check
            kill_tree(process)
            raise

    def run(self, argv: Sequence[str], what: str, check: bool = True, **extra_env: str) -> str:
        """Run a command to its end within the step's time; its output (also appended to the step's log)."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        code = self.wait(self.start(argv, **extra_env), what)
        with open(self.log_path) as log:
            log.seek(offset)
            output = log.read()
        if check and code != 0:
            raise StepFailed(f'{what} exited with status {code}')
        return output

    def python_json(self, code: str, *arguments, what: str):
        """The JSON that ``python -c code arguments...`` prints last."""
        output = self.run([self.python, '-c', code, *arguments], what)
        return json.loads(output.strip().splitlines()[-1])

    # ---- the steps --------------------------------------------------------------------------------------------

    def run_steps(self, steps: Sequence[Step]):
        for step in steps:
            self.step_name = step.name
            self.current_limit = step.smoke_limit * self.time_scale if self.smoke else step.limit
            started = time.monotonic()
            self.step_deadline = started + self.current_limit
            result = dict(name=step.name, description=step.description, status='passed', seconds=0.0,
                          limit_seconds=self.current_limit, reason=None, figures={},
                          log=str(self.log_path.relative_to(REPO) if self.log_path.is_relative_to(REPO)
                                  else self.log_path))
            print(f'[{self.elapsed():6.1f} s] {step.name}: {step.description}', flush=True)
            try:
                if self.smoke and step.cuda_only:
                    raise StepSkipped(step.cuda_only)
                if self.started + self.budget - time.monotonic() < 5:
                    raise StepSkipped(f'the check\'s budget of {self.budget:.0f} s was spent before this step')
                result['figures'] = step.run(self) or {}
            except StepFailed as outcome:
                result.update(status='skipped' if isinstance(outcome, StepSkipped) else 'failed', reason=str(outcome),
                              figures=outcome.figures)
            except Exception as error:  # a bug in the check itself: report it and go on
                result.update(status='failed', reason=f'the check raised {type(error).__name__}: {error}')
                with open(self.log_path, 'a') as log:
                    log.write(traceback.format_exc())
            except BaseException as stop:  # Ctrl-C, SIGTERM: report the step as stopped, then stop
                result.update(status='failed', reason=f'the check was stopped ({type(stop).__name__}: {stop})',
                              seconds=round(time.monotonic() - started, 1))
                self.results.append(result)
                self.write_report(complete=False)
                raise
            result['seconds'] = round(time.monotonic() - started, 1)
            if result['status'] == 'failed' and self.log_path.exists():
                result['log_tail'] = self.log_path.read_text(errors='replace').splitlines()[-LOG_TAIL_LINES:]
            self.results.append(result)
            print(f'[{self.elapsed():6.1f} s] {step.name}: {result["status"]} in {result["seconds"]:.1f} s'
                  + (f' ({result["reason"]})' if result['reason'] else ''), flush=True)
            self.write_report(complete=False)

    # ---- the report -------------------------------------------------------------------------------------------

    def report(self, complete: bool) -> Dict:
        counts = {status: sum(result['status'] == status for result in self.results)
                  for status in ('passed', 'failed', 'skipped')}
        return dict(
            check=dict(mode='smoke (CPU rehearsal)' if self.smoke else 'gpu', complete=complete,
                       command=' '.join([Path(self.python).name] + sys.argv), started=self.started_at,
                       seconds=round(self.elapsed(), 1), budget_seconds=self.budget, out_dir=str(self.out),
                       work_dir=str(self.work), bf16_steps_precision=self.bf16_steps_precision(),
                       probe_seconds=self.probe_seconds, time_scale=self.time_scale),
            environment=self.environment, summary=counts, steps=self.results, not_covered=list(NOT_COVERED))

    def bf16_steps_precision(self) -> str:
        if self.bf16:
            return 'bf16'
        return ('float32: this CPU has no native bf16 (no AVX-512 BF16 or AMX), where bf16 autocast is emulated and '
                'many times slower')

    def amp(self, precision: str) -> str:
        """A step's AMP setting (the trainer's AMP key): 'off' for a bf16 step run in float32."""
        return precision if precision != 'bf16' or self.bf16 else 'off'

    def write_report(self, complete: bool):
        report = self.report(complete)
        texts = {'report.json': json.dumps(report, indent=2) + '\n'}
        try:
            texts['report.md'] = render_markdown(report)
        except Exception as error:  # the figures are in report.json whatever happens to their tables
            texts['report.md'] = (f'# GPU check\n\nreport.md could not be rendered ({type(error).__name__}: {error}); '
                                  'report.json holds every figure.\n')
        for name, text in texts.items():
            temporary = self.out / f'.{name}.tmp'
            temporary.write_text(text)
            os.replace(temporary, self.out / name)


# ---- environment ----------------------------------------------------------------------------------------------


def probe_seconds() -> float:
    """Seconds of two float32 training steps of FAT-B0 at batch 100 of 32-pixel images (the size on which the
    rehearsal was sized), after a warm-up one, with the threads that the steps' processes get (OMP_NUM_THREADS, else
    every core)."""
    import timm
    import torch

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import classification  # noqa: F401  (registers FAT with timm)

    torch.manual_seed(0)
    model = timm.create_model('fat_b0', num_classes=10).train()
    images, labels = torch.randn(100, 3, 32, 32), torch.randint(0, 10, (100,))
    for step in range(3):
        if step == 1:
            started = time.perf_counter()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    return time.perf_counter() - started


def _first_line(argv: Sequence[str], pattern: str = '') -> Optional[str]:
    try:
        output = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in output.splitlines() if pattern in line]
    return lines[-1] if lines else None


def describe_environment(check: Check) -> Dict:
    import torch

    env = dict(python=platform.python_version(), python_executable=sys.executable, platform=platform.platform(),
               cpu_count=os.cpu_count(), torch=torch.__version__, torch_cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), nvcc=_first_line(['nvcc', '--version'], 'release'),
               git_commit=_first_line(['git', '-C', str(REPO), 'rev-parse', 'HEAD']))
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                env['cpu'] = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    for module in ('timm', 'torchvision'):
        try:
            env[module] = importlib.import_module(module).__version__
        except ImportError:
            env[module] = None
    if check.smoke or not torch.cuda.is_available():
        env['device'] = 'cpu'
        env['cpu_native_bf16'] = check.bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return env
    properties = torch.cuda.get_device_properties(0)
    check.gpus = torch.cuda.device_count()
    env.update(device=properties.name, gpus=check.gpus, compute_capability=f'{properties.major}.{properties.minor}',
               multiprocessors=properties.multi_processor_count,
               memory_gib=round(properties.total_memory / 2 ** 30, 1))
    fields = ('driver_version', 'clocks.max.sm', 'clocks.max.memory', 'power.limit', 'temperature.gpu')
    smi = _first_line(['nvidia-smi', f'--query-gpu={",".join(fields)}', '--format=csv,noheader,nounits'])
    if smi:
        values = [value.strip() for value in smi.split(',')]
        env.update(zip(('driver', 'max_sm_clock_mhz', 'max_memory_clock_mhz', 'power_limit_w', 'temperature_c'),
                       values))
    else:
        env['driver'] = None
    return env


# ---- step: dependencies ---------------------------------------------------------------------------------------

_PROBE = '''
import importlib, importlib.metadata, importlib.util, json, sys
found, missing = {}, {}
for module, distribution in json.loads(sys.argv[1]):
    try:
        if '.' in module:
            importlib.import_module(module)
        elif importlib.util.find_spec(module) is None:
            raise ImportError(f'no module named {module}')
        found[distribution] = importlib.metadata.version(distribution)
    except Exception as error:
        missing[distribution] = f'{type(error).__name__}: {error}'
print(json.dumps(dict(found=found, missing=missing)))
'''

_FROM_SITE = '''
import importlib, json, os, sys
site = os.path.realpath(sys.argv[1])
sys.path.insert(0, site)
outside = [name for name in json.loads(sys.argv[2])
           if not os.path.realpath(importlib.import_module(name).__file__).startswith(site)]
print(json.dumps(outside))
'''


def _normalized(distribution: str) -> str:
    return re.sub(r'[-_.]+', '-', distribution).lower()


class Wheel(NamedTuple):
    path: Path
    distribution: str  # normalized
    version: str
    runs_here: bool  # pure Python, or built for this interpreter


def find_wheels(folder: Path) -> Dict[str, Wheel]:
    wheels = {}
    for path in sorted(folder.glob('*.whl')) if folder.is_dir() else []:
        name, version, *_, python, abi, platform_tag = path.stem.split('-')
        native = f'cp{sys.version_info.major}{sys.version_info.minor}'
        wheels[_normalized(name)] = Wheel(path, _normalized(name), version,
                                          abi == 'none' and python.startswith('py3') or python == native)
    return wheels


def step_dependencies(check: Check) -> Dict:
    """Every package the steps import must be importable; the wheel folder supplies those missing and replaces those
    at another version than its own. Its wheels that can run here are installed into the work folder and imported
    from there even when nothing is needed, so that the rehearsal proves the wheels a GPU machine will use."""
    probe = check.python_json(_PROBE, json.dumps(REQUIRED), what='the import probe')
    wheels = find_wheels(check.args.wheels)
    figures = dict(versions=probe['found'], wheels=[wheel.path.name for wheel in wheels.values()])
    versions = {_normalized(name): version for name, version in probe['found'].items()}
    needed = [wheel for name, wheel in wheels.items() if versions.get(name) != wheel.version
              and name in {_normalized(distribution) for _, distribution in REQUIRED}]
    lacking = {name: error for name, error in probe['missing'].items() if _normalized(name) not in wheels}
    if lacking:
        hint = '' if wheels else (f'; {check.args.wheels} holds no wheels: run `make gpu-wheels` (tools/gpu_wheels.sh) '
                                  'where a package registry is reachable and bring that folder along')
        raise StepFailed('missing: ' + ', '.join(f'{name} ({error})' for name, error in lacking.items()) + hint,
                         figures)
    foreign = [wheel.path.name for wheel in needed if not wheel.runs_here]
    if foreign:
        raise StepFailed(f'needed, but built for another Python than {platform.python_version()}: '
                         f'{", ".join(foreign)}', figures)
    runnable = [wheel for wheel in wheels.values() if wheel.runs_here]
    if runnable:
        check.run([check.python, '-m', 'pip', 'install', '--quiet', '--no-index', '--no-deps', '--no-cache-dir',
                   '--target', check.site, *(wheel.path for wheel in runnable)], 'pip install of the wheels')
        modules = [module for module, distribution in REQUIRED
                   if _normalized(distribution) in {wheel.distribution for wheel in runnable}]
        outside = check.python_json(_FROM_SITE, check.site, json.dumps(modules), what='the import check of the wheels')
        if outside:
            raise StepFailed(f'the wheels in {check.args.wheels} do not provide {", ".join(outside)}', figures)
        figures['wheels_installed'] = f'{len(runnable)} of {len(wheels)} installed into {check.site} and imported ' \
                                      'from there'
    if needed:
        check.extra_paths.append(str(check.site))
        figures['installed_for_the_check'] = {wheel.distribution: [versions.get(wheel.distribution), wheel.version]
                                              for wheel in needed}
        again = check.python_json(_PROBE, json.dumps(REQUIRED), what='the import probe')
        figures['versions'] = again['found']
        wrong = [wheel.path.name for wheel in needed
                 if {_normalized(k): v for k, v in again['found'].items()}.get(wheel.distribution) != wheel.version]
        if again['missing'] or wrong:
            raise StepFailed(f"after installing the wheels, still missing: {again['missing'] or 'none'}; not taken "
                             f"from the wheels: {wrong or 'none'}", figures)
    return figures


# ---- steps: kernels -------------------------------------------------------------------------------------------


def step_kernels_build(check: Check) -> Dict:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        raise StepFailed('no CUDA toolkit found: set CUDA_HOME to the folder that holds bin/nvcc')
    major, minor = torch.cuda.get_device_capability(0)
    figures = dict(arch_list=os.environ.get('TORCH_CUDA_ARCH_LIST') or f'{major}.{minor}',
                   jobs=os.cpu_count() or 1, cuda_home=CUDA_HOME)
    check.run([check.python, 'setup.py', 'build_ext', '--inplace'], 'setup.py build_ext', FORCE_CUDA='1',
              MAX_JOBS=str(figures['jobs']), TORCH_CUDA_ARCH_LIST=figures['arch_list'])
    error = check.python_json('import json, kernels; print(json.dumps(kernels.ops.EXTENSION_ERROR))',
                              what='the import of the built extension')
    if error:
        raise StepFailed(f'built, but kernels._dwconv_cuda does not load: {error}', figures)
    built = sorted((REPO / 'kernels').glob('_dwconv_cuda*.so'))
    figures['extension'] = [f'{path.name} ({path.stat().st_size / 2 ** 20:.1f} MiB)' for path in built]
    return figures


def _junit_counts(path: Path) -> Dict:
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == 'testsuite' else root.find('testsuite')
    counts = {key: int(suite.get(key, 0)) for key in ('tests', 'failures', 'errors', 'skipped')}
    counts['passed'] = counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']
    outcomes = [(case.get('name'), child) for case in suite.iter('testcase') for child in case]
    counts['not_passed'] = [f'{name}: {child.tag}' for name, child in outcomes
                            if child.tag in ('failure', 'error')][:10]
    counts['skip_reasons'] = sorted({child.get('message', '') for _, child in outcomes if child.tag == 'skipped'})
    return counts


def step_kernels_tests(check: Check) -> Dict:
    report = check.work / 'kernels_tests.xml'
    check.run([check.python, '-m', 'pytest', 'tests/test_kernels.py', '-m', 'gpu', '-q', '-p', 'no:cacheprovider',
               f'--junitxml={report}'], 'pytest', check=False)
    if not report.exists():
        raise StepFailed('pytest wrote no report (see the log)')
    figures = _junit_counts(report)
    if figures['failures'] or figures['errors'] or not figures['tests']:
        raise StepFailed(f"{figures['failures']} failed, {figures['errors']} errors of {figures['tests']} gpu tests",
                         figures)
    if not figures['passed']:
        reason = f"all {figures['tests']} gpu tests skipped: {'; '.join(figures['skip_reasons'])}"
        raise (StepSkipped if check.smoke else StepFailed)(reason, figures)
    return figures


# The forward of a float16 / bfloat16 path against the float16 / bfloat16 NCHW one: both round to their dtype.
_FORWARD_TOLERANCE = 2e-2


def step_kernels_benchmark(check: Check) -> Dict:
    results = check.work / 'bench' / 'kernels.json'
    argv = [check.python, '-m', 'kernels.benchmark', '--json', results]
    if check.smoke:
        argv += ['--device', 'cpu', '--batch-sizes', '1', '2', '--dtypes', 'bfloat16' if check.bf16 else 'float32',
                 '--warmup', '1', '--iterations', '2', '--rounds', '1']
    check.run(argv, 'kernels.benchmark')
    figures = json.loads(results.read_text())
    if check.smoke:
        return figures
    if not figures['extension']:
        raise StepFailed(f"timed PyTorch's paths only: the extension is not built ({figures['extension_error']})",
                         figures)
    off = [f"{row['model']} k{row['kernel_size']} b{row['batch']} {row['dtype']} {key[:-len('_relative_difference')]}"
           f' {row[key]:.1e}' for row in figures['rows'] for key in row
           if key.endswith('_relative_difference') and not row[key] <= _FORWARD_TOLERANCE]
    if off:
        raise StepFailed(f'forward differs from the NCHW path by more than {_FORWARD_TOLERANCE} (relative): '
                         + ', '.join(off), figures)
    return figures


# ---- steps: the models' speed ---------------------------------------------------------------------------------


def _registry():
    from classification import registry
    return registry


def compile_models() -> List[str]:
    """FAT-B0 and the peers the paper compares it with."""
    registry = _registry()
    return ['fat_b0'] + [name for name, peer in registry.PEERS.items()
                         if peer.counterpart == 'fat_b0' and not peer.cpu_first]


def paper_comparisons(rows: List[Dict], batch_sizes: Sequence[int]) -> List[Dict]:
    """FAT's throughput over each peer's that the paper's GPU comparison lists, measured (the median of the rounds'
    ratios) beside the paper's."""
    registry = _registry()
    comparisons = []
    for row in rows:
        fat, peer = row['vs'], row['model']
        paper_fat, paper_peer = registry.paper_gpu_throughput(fat or ''), registry.paper_gpu_throughput(peer)
        if fat == peer or fat != registry.counterpart(peer) or not (paper_fat and paper_peer):
            continue
        for batch in batch_sizes:
            comparisons.append(dict(model=fat, versus=peer, batch=batch,
                                    measured=1 / row[f'throughput_b{batch}_x_fat'], paper=paper_fat / paper_peer,
                                    paper_images_per_second=[paper_fat, paper_peer]))
    return comparisons


def run_model_benchmark(check: Check, name: str, options: Sequence[str]) -> Dict:
    folder = check.work / 'bench' / name
    check.run([check.python, '-m', 'classification.benchmark', '--no-flops', '--output-dir', folder, '--markdown',
               *options], 'classification.benchmark')
    result = json.loads((folder / 'benchmark.json').read_text())
    settings = result['settings']
    wrong = [f'{row["model"]} {figure}' for row in result['rows']
             for figure in result['seconds_per_round'][row['backend']] if not 0 < (row[figure] or 0) < math.inf]
    if wrong:
        raise StepFailed(f'figures that are not positive and finite: {", ".join(wrong)}', result)
    return dict(machine=result['machine'], settings=settings, rows=result['rows'],
                latency_comparisons=result['comparisons'],
                paper_comparisons=paper_comparisons(result['rows'], settings['throughput_batch_sizes']))


def step_model_benchmark(check: Check) -> Dict:
    if check.smoke:
        options = ['--device', 'cpu', '--models', 'fat_b0', 'mobilevit_xs', 'fat_b2', 'efficientnet_b3',
                   '--throughput-batch-sizes', '2', '--train-batch-size', '2', '--latency-rounds', '2', '--warmup', '1',
                   '--throughput-warmup', '0', '--throughput-rounds', '1',
                   '--amp', 'bf16' if check.bf16 else 'none']
    else:
        options = ['--device', 'cuda', '--throughput-batch-sizes', '64', '256', '--train-batch-size', '128',
                   '--amp', 'bf16', '--warmup', '10', '--latency-rounds', '50', '--throughput-warmup', '3',
                   '--throughput-rounds', '10']
    return run_model_benchmark(check, 'models', [*options, '--memory-format', 'channels_last',
                                                 '--compare', 'fat_b0:mobilevit_xs', 'fat_b2:efficientnet_b3'])


def step_model_benchmark_compiled(check: Check) -> Dict:
    try:
        figures = run_model_benchmark(check, 'models_compiled', [
            '--device', 'cuda', '--models', *compile_models(), '--compile', '--latency-rounds', '0',
            '--throughput-batch-sizes', '64', '--throughput-warmup', '3', '--throughput-rounds', '10', '--amp', 'bf16',
            '--memory-format', 'channels_last', '--compare'])
    except StepTimedOut as timeout:
        if timeout.by_budget:  # optional: it runs last, in what the budget leaves
            raise StepSkipped(f'did not fit the budget: {timeout}') from None
        raise
    eager = next((r['figures'].get('rows', []) for r in check.results if r['name'] == 'model_benchmark'), [])
    eager_by_name = {row['model']: row for row in eager}
    figures['speedup_over_eager_b64'] = {
        row['model']: row['throughput_b64'] / eager_by_name[row['model']]['throughput_b64']
        for row in figures['rows'] if 'throughput_b64' in eager_by_name.get(row['model'], {})}
    return figures


# ---- steps: the trainer ---------------------------------------------------------------------------------------


def trainer_processes(check: Check) -> int:
    """One per GPU, at most 2: the generated dataset's 1000 images give each of 2 processes 3 batches of 128."""
    return min(max(check.gpus, 1), 2)


def training_data(check: Check) -> Tuple[Path, int]:
    """The generated shapes dataset that the trainer steps share, written here, and its number of training images:
    the full one on a GPU; in the rehearsal a smaller one (SMOKE_SHAPES_PER_CLASS: 2 batches of 50 an epoch, 50
    images to validate on), on which its fp16 step, emulated on most CPUs, takes a fraction of the full one's time."""
    from classification.synthetic_shapes import CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, ensure_synthetic_shapes

    root = check.work / 'data' / 'synthetic_shapes'
    train_per_class, val_per_class = SMOKE_SHAPES_PER_CLASS if check.smoke else (TRAIN_PER_CLASS, VAL_PER_CLASS)
    ensure_synthetic_shapes(str(root), train_per_class=train_per_class, val_per_class=val_per_class)
    return root, train_per_class * len(CLASSES)


def trainer_command(check: Check, model: str, output: Path, epochs: int, amp: str) -> List:
    """``torchrun -m classification.train`` on the generated shapes dataset, the recipe of
    ``configs/classification/<model>.yaml`` (RandAugment, Mixup / CutMix, random erasing, AdamW) with channels-last
    and EMA, on 224-pixel crops at batch 128 per GPU (32 pixels, batch 50 in the rehearsal), one log line per
    epoch."""
    data, images = training_data(check)
    image_size, batch = (32, 50) if check.smoke else (224, 128)
    processes = trainer_processes(check)
    steps_per_epoch = math.ceil(images / processes) // batch
    workers = 1 if check.smoke else max(2, (os.cpu_count() or 4) // processes - 2)
    return [check.python, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', processes,
            '-m', 'classification.train', '--cfg', f'configs/classification/{model}.yaml',
            '--data-path', data, '--output', output, '--batch-size', batch,
            '--opts', 'DATA.DATASET', 'synthetic_shapes', 'MODEL.NUM_CLASSES', '10', 'DATA.IMG_SIZE', image_size,
            'DATA.NUM_WORKERS', workers, 'DATA.PIN_MEMORY', not check.smoke, 'DATA.DEVICE_NORMALIZE', 'True',
            'TRAIN.EPOCHS', epochs, 'TRAIN.WARMUP_EPOCHS', min(1, epochs - 1), 'TRAIN.CHANNELS_LAST', 'True',
            'TRAIN.EMA.ENABLED', 'True', 'AMP', check.amp(amp), 'PRINT_FREQ', steps_per_epoch, 'SAVE_FREQ', '1']


def read_run(output: Path, epochs: int, processes: int) -> Dict:
    """A finished run's figures, from its summary.json, after checking that it trained every epoch."""
    if not (output / 'summary.json').exists():
        raise StepFailed(f'the run wrote no {output / "summary.json"}')
    summary = json.loads((output / 'summary.json').read_text())
    history = summary['history']
    figures = dict(epochs=[entry['epoch'] for entry in history], processes=processes,
                   global_batch=summary.get('global_batch'),
                   train_loss=[entry['train_loss'] for entry in history],
                   epoch_images_per_second=[entry['images_per_second'] for entry in history],
                   val_acc1=history[-1]['acc1'] if history else None,
                   ema_acc1=history[-1].get('ema_acc1') if history else None)
    if figures['epochs'] != list(range(1, epochs + 1)):
        raise StepFailed(f"summary.json lists epochs {figures['epochs']}, not 1 to {epochs}", figures)
    if not all(math.isfinite(loss) for loss in figures['train_loss']):
        raise StepFailed(f"a training loss is not finite: {figures['train_loss']}", figures)
    if figures['ema_acc1'] is None:
        raise StepFailed('summary.json has no EMA accuracy (TRAIN.EMA.ENABLED)', figures)
    intervals = [entry['last_interval'] for entry in history]
    last = intervals[-1]
    figures['last_epoch_steps'] = dict(images_per_second=last['images_per_second'],
                                       data_seconds_per_batch=last['data_seconds'],
                                       compute_seconds_per_batch=last['compute_seconds'])
    memory = [interval['peak_memory_gib'] for interval in intervals if 'peak_memory_gib' in interval]
    figures['peak_memory_gib'] = max(memory) if memory else None
    figures['loss_scale'] = last.get('loss_scale')
    return figures


def train(check: Check, model: str, run_name: str, epochs: int, amp: str) -> Dict:
    output = check.work / 'runs' / run_name
    check.run(trainer_command(check, model, output, epochs, amp), f'the {run_name} run')
    return read_run(output, epochs, trainer_processes(check))


def step_trainer_bf16_resume(check: Check) -> Dict:
    epochs = 2 if check.smoke else 3
    output = check.work / 'runs' / 'fat_b0_bf16'
    command = trainer_command(check, 'fat_b0', output, epochs, 'bf16')
    process = check.start(command)
    try:
        while process.poll() is None and not (output / 'latest.pth').exists():
            if check.remaining() <= 0:
                raise StepFailed(f'no first checkpoint within the step\'s time ({check.elapsed():.0f} s into the '
                                 'check)')
            time.sleep(0.05)
    except BaseException:
        kill_tree(process)
        raise
    if process.poll() is not None:
        raise StepFailed(f'the run ended (status {process.returncode}) before it could be killed after its first '
                         'checkpoint')
    kill_tree(process)
    check.run(command, 'the resumed run')
    figures = read_run(output, epochs, trainer_processes(check))
    resumed_from = json.loads((output / 'summary.json').read_text())['resumed_from']
    if not resumed_from or Path(resumed_from['checkpoint']).resolve() != (output / 'latest.pth').resolve():
        raise StepFailed(f'the second run did not resume from {output / "latest.pth"} (summary.json: resumed_from '
                         f'{resumed_from})', figures)
    figures['resumed_after_epoch'] = resumed_from['epochs_done']
    return figures


def step_trainer_fp16(check: Check) -> Dict:
    figures = train(check, 'fat_b0', 'fat_b0_fp16', 1 if check.smoke else 2, 'fp16')
    if figures['loss_scale'] is None:
        raise StepFailed('the fp16 run logged no GradScaler loss scale', figures)
    return figures


def step_trainer_fat_b2(check: Check) -> Dict:
    return train(check, 'fat_b2', 'fat_b2_bf16', 1 if check.smoke else 2, 'bf16')


_ONLY_ON_CUDA = 'needs a CUDA GPU'
STEPS = (
    Step('dependencies', 'the packages the steps import; missing ones installed from the wheel folder',
         step_dependencies, 60, 60),
    Step('kernels_build', 'kernels/ built in place for this GPU (setup.py build_ext --inplace)', step_kernels_build,
         180, 0, cuda_only=f'{_ONLY_ON_CUDA} to build for (CI compiles the extension without one: .ci/run)'),
    Step('kernels_tests', 'the gpu-marked tests of tests/test_kernels.py', step_kernels_tests, 150, 60),
    Step('kernels_benchmark', 'python -m kernels.benchmark: the extension against cuDNN, FAT-B0 / B2 7x7 and 9x9',
         step_kernels_benchmark, 60, 30),
    Step('model_benchmark', 'python -m classification.benchmark: FAT, LVT and the paper\'s peers, eager',
         step_model_benchmark, 150, 60),
    Step('trainer_bf16_resume', 'torchrun classification.train, FAT-B0 bf16 channels-last EMA, killed and resumed',
         step_trainer_bf16_resume, 120, 90),
    Step('trainer_fp16', 'torchrun classification.train, FAT-B0 fp16 with the GradScaler', step_trainer_fp16,
         60, 120),
    Step('trainer_fat_b2', 'torchrun classification.train, FAT-B2 bf16 channels-last EMA', step_trainer_fat_b2,
         60, 60),
    Step('model_benchmark_compiled', 'python -m classification.benchmark --compile: FAT-B0 and its two paper peers',
         step_model_benchmark_compiled, 150, 0,
         cuda_only='the rehearsal leaves out torch.compile, minutes of C++ compilation on a small CPU '
                   '(tests/test_model.py compiles FAT on the CPU)'),
)


# ---- report.md ------------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + \
        ['| ' + ' | '.join('–' if cell is None else str(cell) for cell in row) + ' |' for row in rows]


def _number(value, digits: int = 1) -> Optional[str]:
    return None if value is None else f'{value:.{digits}f}'


def _render_kernels_benchmark(figures: Dict) -> List[str]:
    paths = ['nchw', 'channels_last'] + (['extension'] if figures.get('extension') else [])
    driver = f"{figures['driver_peak_gbs']:.0f} GB/s" if figures['driver_peak_gbs'] else 'not reported'
    lines = [f"{figures['device']}: device-to-device copy {figures['copy_gbs']:.0f} GB/s; driver's peak {driver}; "
             "bandwidth percentages of "
             f"{figures['reference_gbs']:.0f} GB/s. Times in ms (% of that bandwidth)"
             + ('; ratio: PyTorch path / extension (> 1: the extension is faster).' if len(paths) == 3 else '.'), '']
    header = ['model', 'batch', 'C, H, W, k', 'dtype'] + [f'{phase} {path}' for phase in ('fwd', 'fwd+bwd')
                                                          for path in paths]
    rows = []
    for row in figures['rows']:
        cells = []
        for phase in ('forward', 'training'):
            for path in paths:
                share = 100 * row[f'{path}_{phase}_gbs'] / figures['reference_gbs']
                cell = f"{row[f'{path}_{phase}_ms']:.4f} ({share:.0f} %)"
                if path != 'extension' and 'extension' in paths:
                    cell += f", {row[f'{path}_{phase}_ms'] / row[f'extension_{phase}_ms']:.2f}×"
                cells.append(cell)
        rows.append([row['model'], row['batch'], f"{row['channels']}, {row['height']}, {row['width']}, "
                     f"{row['kernel_size']}", row['dtype'], *cells])
    lines += _table(header, rows)
    for entry in figures.get('summary', []):
        lines.append(f"\nBatch {entry['batch']}, {entry['dtype']}, geometric mean over {entry['rows']} layers of "
                     "PyTorch's time / the extension's: channels-last "
                     f"{entry['channels_last_over_extension_forward']:.2f} forward, "
                     f"{entry['channels_last_over_extension_training']:.2f} forward+backward; NCHW "
                     f"{entry['nchw_over_extension_forward']:.2f} forward, "
                     f"{entry['nchw_over_extension_training']:.2f} forward+backward.")
    return lines


def _render_model_benchmark(figures: Dict) -> List[str]:
    settings = figures['settings']
    batches = settings['throughput_batch_sizes']
    train_batch = settings['train_batch_size']
    latency = settings['latency_rounds'] > 0
    where = figures['machine'].get('gpu') or figures['machine'].get('cpu')
    rounds = f"{settings['throughput_rounds']} rounds"
    if latency:
        rounds += f" ({settings['latency_rounds']} at batch 1)"
    lines = [f"{where}; AMP {settings['amp']}, {settings['memory_format']}, "
             f"{'inference form' if settings['deploy'] else 'training form'}"
             f"{', torch.compile' if settings['compile'] else ''}; medians of {rounds}. Each figure with its ratio "
             'to the FAT model of the last column (latency above 1: slower than FAT; img/s below 1: fewer than FAT).',
             '']
    header = ['model', 'input'] + (['latency b1 (ms)'] if latency else []) + \
        [f'b{b} (img/s)' for b in batches] + ([f'training b{train_batch} (img/s)'] if train_batch else []) + ['vs']

    def cell(row, figure, digits=1):
        return f"{row[figure]:.{digits}f} ({row[f'{figure}_x_fat']:.2f}×)" if row.get(f'{figure}_x_fat') else \
            _number(row.get(figure), digits)

    rows = [[row['model'], row['input_size']] + ([cell(row, 'latency_ms', 2)] if latency else []) +
            [cell(row, f'throughput_b{b}') for b in batches] +
            ([cell(row, f'train_b{train_batch}')] if train_batch else []) + [row['vs']]
            for row in figures['rows']]
    lines += _table(header, rows)
    if figures.get('paper_comparisons'):
        lines += ['', 'Throughput of FAT over the paper\'s GPU peers, measured in this run (median of the rounds\' '
                  'ratios) and in the paper:', '']
        lines += _table(['FAT', 'peer', 'batch', 'measured', 'paper'],
                        [[c['model'], c['versus'], c['batch'], f"{c['measured']:.2f}×", f"{c['paper']:.2f}×"]
                         for c in figures['paper_comparisons']])
    if figures.get('speedup_over_eager_b64'):
        lines += ['', 'Compiled over eager throughput at batch 64 (two runs): ' + ', '.join(
            f'{name} {ratio:.2f}×' for name, ratio in figures['speedup_over_eager_b64'].items()) + '.']
    return lines


def _render_trainers(results: Sequence[Dict]) -> List[str]:
    header = ['step', 'processes × batch', 'img/s (last epoch)', 'data / compute s per batch', 'peak memory (GiB)',
              'loss scale', 'train loss by epoch', 'val acc@1 / EMA (%)', 'resumed after epoch']
    rows = []
    for result in results:
        run = result['figures']
        if 'last_epoch_steps' not in run:
            continue
        interval = run['last_epoch_steps']
        rows.append([result['name'], f"{run['processes']} × {(run['global_batch'] or 0) // run['processes']}",
                     _number(interval['images_per_second']),
                     f"{interval['data_seconds_per_batch']:.3f} / {interval['compute_seconds_per_batch']:.3f}",
                     _number(run['peak_memory_gib'], 2),
                     None if run['loss_scale'] is None else f"{run['loss_scale']:g}",
                     ', '.join(f'{loss:.3f}' for loss in run['train_loss']),
                     f"{run['val_acc1']:.1f} / {run['ema_acc1']:.1f}", run.get('resumed_after_epoch')])
    if not rows:
        return []
    return ['## The trainer', '', 'On the generated shapes dataset (10 classes, 1000 training images), so the '
            'accuracies only show that evaluation ran; img/s over the training steps of the last epoch, data loading '
            'included.', ''] + _table(header, rows) + ['']


def render_markdown(report: Dict) -> str:
    check, env, steps = report['check'], report['environment'], report['steps']
    device = env.get('device', 'cpu')
    counts = report['summary']
    lines = [f'# GPU check: {device}', '',
             f"{check['mode']}, started {check['started']}, {check['seconds']:.0f} s of a "
             f"{check['budget_seconds']:.0f} s budget: {counts['passed']} passed, {counts['failed']} failed, "
             f"{counts['skipped']} skipped"
             + ('.' if check['complete'] else ' (incomplete: the check was still running).'), '',
             f"`{check['command']}`; every step's log is in `{check['work_dir']}/logs/`. "
             'docs/benchmarks.md says how to read this report.', '',
             f"The bf16 steps ran in {check['bf16_steps_precision']}."
             + (f" Budget and limits ×{check['time_scale']:.2f}: the probe took {check['probe_seconds']:.2f} s, "
                f'{SMOKE_PROBE_REFERENCE_SECONDS:.2f} s where they were sized.' if check.get('probe_seconds') else ''),
             '']
    if device != 'cpu':
        gpu = (f"{device} × {env.get('gpus')}, compute capability {env.get('compute_capability')}, "
               f"{env.get('multiprocessors')} SMs, {env.get('memory_gib')} GiB")
    else:
        gpu = 'none (CPU)'
    lines += _table(['', ''], [
        ['GPU', gpu], ['driver', env.get('driver')],
        ['torch', f"{env.get('torch')} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')})"],
        ['nvcc', env.get('nvcc')], ['timm / torchvision', f"{env.get('timm')} / {env.get('torchvision')}"],
        ['python', f"{env.get('python')} ({env.get('python_executable')})"],
        ['CPU', f"{env.get('cpu')}, {env.get('cpu_count')} cores"], ['commit', env.get('git_commit')]])
    lines += ['', '## Steps', '']
    lines += _table(['step', 'status', 'seconds', 'limit (s)', 'what', 'reason'],
                    [[s['name'], s['status'], f"{s['seconds']:.1f}", f"{s['limit_seconds']:.0f}", s['description'],
                      s['reason']] for s in steps])
    lines.append('')
    by_name = {s['name']: s for s in steps}
    for name in ('kernels_benchmark', 'model_benchmark', 'model_benchmark_compiled'):
        figures = by_name.get(name, {}).get('figures')
        if figures and figures.get('rows'):
            render = _render_kernels_benchmark if name == 'kernels_benchmark' else _render_model_benchmark
            lines += [f'## {name}', ''] + render(figures) + ['']
    lines += _render_trainers([s for s in steps if s['name'].startswith('trainer')])
    tests = by_name.get('kernels_tests', {}).get('figures')
    if tests:
        lines += ['## kernels_tests', '', f"{tests['tests']} gpu tests: {tests['passed']} passed, {tests['failures']} "
                  f"failed, {tests['errors']} errors, {tests['skipped']} skipped."
                  + (f" Skipped: {'; '.join(tests['skip_reasons'])}." if tests['skip_reasons'] else '')
                  + (f" Not passed: {'; '.join(tests['not_passed'])}." if tests['not_passed'] else ''), '']
    dependencies = by_name.get('dependencies', {}).get('figures')
    if dependencies and dependencies.get('versions'):
        text = ', '.join(f'{name} {version}' for name, version in sorted(dependencies['versions'].items())) + '.'
        if dependencies.get('installed_for_the_check'):
            text += ' Taken from the wheels for the check (the machine\'s version → the wheel\'s): ' + ', '.join(
                f'{name} {mine or "missing"} → {theirs}'
                for name, (mine, theirs) in dependencies['installed_for_the_check'].items()) + '.'
        lines += ['## dependencies', '', text, '']
    for step in steps:
        if step.get('log_tail'):
            lines += [f'## {step["name"]} failed: the end of its log', '', '```'] + step['log_tail'] + ['```', '']
    lines += ['## Not covered', ''] + [f'- {item}' for item in report['not_covered']]
    return '\n'.join(lines) + '\n'


# ---- main -----------------------------------------------------------------------------------------------------


def cannot_start(message: str):
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def usable_folder(path: Path, what: str) -> Path:
    """``path`` made and checked writable; exits with one line naming the problem otherwise."""
    path = path.expanduser().resolve()
    if path.exists() and not path.is_dir():
        cannot_start(f'{what} {path} is a file, not a folder')
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / '.gpu_check_write_test'
        probe.write_text('')
        probe.unlink()
    except OSError as error:
        cannot_start(f'{what} {path} cannot be written: {error.strerror or error}')
    return path


def clear_work_folder(work: Path):
    """Remove what the last check left in ``work`` (logs, runs, results, installed wheels), keeping the generated
    dataset. A folder this check did not make is left alone."""
    marker = work / '.gpu_check_work'
    if not marker.exists():
        if any(work.iterdir()):
            cannot_start(f'the work folder {work} is not empty and was not made by this check: choose another '
                     '(--work-dir)')
        marker.write_text('the work folder of tools/gpu_check.py, which clears it on every run\n')
    for stale in ('runs', 'logs', 'bench', 'site', 'kernels_tests.xml'):
        target = work / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    (work / 'logs').mkdir()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--smoke', action='store_true',
                        help='the CPU rehearsal: the same steps at tiny sizes, the CUDA-only ones skipped')
    parser.add_argument('--out', type=Path, help='the report folder (default: $GPU_CHECK_OUT, else gpu-check/)')
    parser.add_argument('--work-dir', type=Path, default=DEFAULT_WORK,
                        help='logs, runs and the generated dataset (default: build/gpu-check/)')
    parser.add_argument('--wheels', type=Path, default=DEFAULT_WHEELS,
                        help='the wheels of tools/gpu_wheels.sh (default: gpu-wheels/)')
    parser.add_argument('--budget', type=float, metavar='SECONDS',
                        help=f'time for the whole check (default: {GPU_BUDGET_SECONDS} on a GPU, '
                             f'{SMOKE_BUDGET_SECONDS} for --smoke)')
    parser.add_argument('--steps', nargs='+', metavar='STEP', choices=[step.name for step in STEPS],
                        help='run only these steps (dependencies always runs)')
    args = parser.parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        parser.error('--budget must be positive')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out_source = '--out' if args.out else 'GPU_CHECK_OUT' if os.environ.get('GPU_CHECK_OUT') else 'the report folder'
    out = usable_folder(args.out or Path(os.environ.get('GPU_CHECK_OUT') or DEFAULT_OUT), out_source)
    work = usable_folder(args.work_dir, '--work-dir')
    if out == work or out.is_relative_to(work):
        cannot_start(f'{out_source} {out} is inside the work folder {work}, which each check clears')
    args.wheels = args.wheels.expanduser().resolve()
    try:
        import torch
    except ImportError as error:
        cannot_start(f'{sys.executable} cannot import torch ({error}); run the check with a Python that has it')
    if not args.smoke and not torch.cuda.is_available():
        cannot_start('no CUDA GPU is visible (torch.cuda.is_available() is False); '
                 '`make gpu-check-smoke` (tools/gpu_check.py --smoke) rehearses the check on the CPU')
    clear_work_folder(work)

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f'stopped by signal {signum}'))
    check = Check(args, out, work)
    check.environment = describe_environment(check)
    if check.smoke and args.budget is None:
        check.calibrate()
    check.write_report(complete=False)
    where = check.environment['device']
    print(f"{'CPU rehearsal' if check.smoke else 'GPU check'} on {where}: report in {out}, logs in {work / 'logs'}, "
          f'budget {check.budget:.0f} s'
          + (f' (×{check.time_scale:.2f}: the probe took {check.probe_seconds:.2f} s)' if check.probe_seconds else '')
          + f'; the bf16 steps run in {check.bf16_steps_precision()}', flush=True)
    steps = [step for step in STEPS if not args.steps or step.name in args.steps or step.name == 'dependencies']
    check.run_steps(steps)
    check.write_report(complete=True)
    report = check.report(complete=True)
    print(f"{report['summary']['passed']} passed, {report['summary']['failed']} failed, "
          f"{report['summary']['skipped']} skipped in {report['check']['seconds']:.0f} s; report: {out / 'report.md'}")
    return 1 if report['summary']['failed'] else 0


if __name__ == '__main__':
    sys.exit(main())
