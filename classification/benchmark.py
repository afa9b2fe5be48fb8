"""Speed of FAT beside the peers of the paper's efficiency comparison, measured side by side.

    python -m classification.benchmark [--device cpu|cuda] [--models fat_b0 edgenext_small ...]
        [--backend torch authors onnxruntime openvino executorch] [--precision fp32 int8] [--threads 2]
        [--latency-rounds 100] [--throughput-batch-sizes 16] [--train-batch-size 128] [--compile]
        [--output-dir DIR] [--plot]

Every model is built by timm without pretrained weights (weights do not change the timing), put into its
inference form with ``timm.utils.reparameterize_model``, as it ships for inference (FAT folds its BatchNorms and
residual depthwise convolutions; RepViT, FastViT and the other reparameterizable peers fuse their branches; peers
without fusions stay as they are), made channels-last, and fed inputs of its own default resolution
(``pretrained_cfg['input_size']``). The default set is FAT-B0...B3, LVT, the FAT paper's peers and the CPU-first
peers (``registry.PEERS``), each with the top-1 its authors publish. On CUDA, forward passes run under AMP, with cuDNN's
autotuner on (``torch.backends.cudnn.benchmark``).

The models are measured in one process, interleaved (every round runs each model once, in a shuffled order)
after a warm-up, so that drifts of the machine's speed fall on every model alike; each figure is the median
over rounds. Batch-1 latency and batched throughput are measured; parameters are the training form's, FLOPs
are fvcore's (one multiply-add = one FLOP, attention products included) at the model's resolution. Each
figure is also given as a ratio to a FAT model of similar accuracy (latency ratio > 1: slower than FAT;
throughput ratio < 1: fewer images/s than FAT).

``--backend`` names where the models run: ``torch`` (eager PyTorch as above), ``authors`` (eager PyTorch as the
models' authors run them: training form, NCHW, no compilation), and the CPU runtimes ``onnxruntime``,
``openvino`` and ``executorch`` (XNNPACK), which run each model's inference form exported by
``classification.export`` at static shapes (batch and resolution fixed, as a deployed model runs) with ``--threads``
threads. Each backend is timed in its own block, the models taking turns within it, never two runtimes call
after call: PyTorch's OpenMP threads keep spinning after each call and slow a runtime called right after them.
Ratios between models are taken within a backend; ``--compare-backends`` adds the ratio of one model's median
latency in one backend to another's in another backend (two blocks of the same run).

``--precision fp32 int8`` adds a block of INT8 models for each runtime (``onnxruntime-int8``, ``openvino-int8``,
``executorch-int8``), each model quantized as ``export --int8`` quantizes it (``classification.int8``): the float32
file by ONNX Runtime's quantizer or by NNCF, the PyTorch model by timmx for XNNPACK, calibrated on
``INT8_CALIBRATION_IMAGES`` random images. Calibration values change the quantization scales, not the graph that
runs, so the latency is the INT8 model's; its accuracy is not measured here (``export --int8`` measures it on real
images), and tables and plots give every block the published float32 top-1.

With ``--train-batch-size N`` the training step is timed as well (training form, train mode, AdamW,
cross-entropy on random labels, forward + backward + optimizer step under the same AMP, memory format and
compilation), interleaved in the same way.
"""
import argparse
import contextlib
import copy
import csv
import datetime
import importlib.metadata
import itertools
import json
import os
import platform
import random
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import reparameterize_model

from . import dependencies, export, int8
from .commands import program_name
from .model_table import count_flops, count_params
from .registry import MODELS, PEERS, compared_models, counterpart, published_top1

# The paper's CPU latency claim (FAT-B0 44.3 ms vs EdgeNeXt-S 86.4 ms) and the target for B1.
DEFAULT_COMPARISONS = ('fat_b0:edgenext_small', 'fat_b1:edgenext_small')


def is_fat(name: str) -> bool:
    return name in MODELS and MODELS[name].family == 'fat'


def reference_fat(name: str, measured: Sequence[str]) -> Optional[str]:
    """The FAT model a figure is divided by: the model itself if it is FAT, else its counterpart when that was
    measured, else the first FAT model measured (None when none was)."""
    if is_fat(name):
        return name
    if counterpart(name) in measured:
        return counterpart(name)
    return next((m for m in measured if is_fat(m)), None)


class Candidate(NamedTuple):
    name: str
    model: torch.nn.Module
    input_size: int


def prepare(model: torch.nn.Module, device: torch.device, channels_last: bool, deploy: bool,
            compile_model: bool) -> torch.nn.Module:
    """The eval-mode ``model`` as it is timed: inference form, device, memory format, compilation."""
    model = model.eval()
    if deploy:
        model = reparameterize_model(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile_model else model


def _timer(device: torch.device) -> Callable[[], float]:
    if device.type == 'cuda':
        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return now
    return time.perf_counter


def measure_interleaved(candidates: Sequence[Candidate], batch_size: int, warmup: int, rounds: int,
                        device: torch.device, channels_last: bool,
                        amp_dtype: Optional[torch.dtype]) -> Dict[str, List[float]]:
    """Seconds per forward pass of each candidate at ``batch_size``, one per round, the candidates taking turns.

    Each round runs every candidate once, in an order shuffled anew (with a fixed seed): in a fixed order
    each model would always follow the same one and inherit its effect on the caches.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    inputs = {c.name: torch.randn(batch_size, 3, c.input_size, c.input_size, device=device)
              .contiguous(memory_format=memory_format) for c in candidates}
    now = _timer(device)
    order = random.Random(0)
    times: Dict[str, List[float]] = {c.name: [] for c in candidates}
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for _ in range(warmup):
            for c in candidates:
                c.model(inputs[c.name])
        for _ in range(rounds):
            for c in order.sample(candidates, len(candidates)):
                start = now()
                c.model(inputs[c.name])
                times[c.name].append(now() - start)
    return times


def measure_training_interleaved(names: Sequence[str], batch_size: int, warmup: int, rounds: int,
                                 device: torch.device, channels_last: bool, amp_dtype: Optional[torch.dtype],
                                 compile_model: bool) -> Dict[str, List[float]]:
    """Seconds per training step (forward, backward, AdamW step) of each model at ``batch_size``, one per
    round, the models taking turns as in ``measure_interleaved``."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    steps = {}
    for name in names:
        model = timm.create_model(name, pretrained=False).to(device=device, memory_format=memory_format).train()
        optimizer = create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=0.05)
        forward = torch.compile(model) if compile_model else model
        input_size = model.pretrained_cfg['input_size'][-1]
        images = torch.randn(batch_size, 3, input_size, input_size, device=device).contiguous(
            memory_format=memory_format)
        labels = torch.randint(0, model.num_classes, (batch_size,), device=device)

        def step(forward=forward, optimizer=optimizer, images=images, labels=labels):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.cross_entropy(forward(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        steps[name] = step

    now = _timer(device)
    order = random.Random(0)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            steps[name]()
    for _ in range(rounds):
        for name in order.sample(list(names), len(names)):
            start = now()
            steps[name]()
            times[name].append(now() - start)
    return times


# The runtimes a model can be timed in besides eager PyTorch, and the export format each runs.
RUNTIMES = {'onnxruntime': 'onnx', 'openvino': 'openvino', 'executorch': 'executorch'}
# ``torch``: eager PyTorch as set by the options (by default the inference form, channels-last); ``authors``: eager
# PyTorch as the models' authors run them (the training form, NCHW, no compilation).
BACKENDS = ('torch', 'authors') + tuple(RUNTIMES)
PRECISIONS = ('fp32', 'int8')
INT8_RUNTIMES = tuple(RUNTIMES)  # the runtimes that time INT8 models
INT8_CALIBRATION_IMAGES = 32


class Block(NamedTuple):
    """Models timed together: one backend at one precision."""
    backend: str
    precision: str

    @property
    def name(self) -> str:
        return self.backend if self.precision == 'fp32' else f'{self.backend}-{self.precision}'


def blocks(backends: Sequence[str], precisions: Sequence[str]) -> List[Block]:
    """Each backend at each precision it runs: float32 everywhere, INT8 in ``INT8_RUNTIMES``."""
    return [Block(backend, precision) for backend in backends for precision in precisions
            if precision == 'fp32' or backend in INT8_RUNTIMES]


def runtime_models(models: Dict[str, torch.nn.Module], block: Block, batch_sizes: Sequence[int], threads: int,
                   folder: Path, traces: Dict,
                   training_forms: Optional[Dict[str, torch.nn.Module]] = None) -> Dict[int, Dict[str, Callable]]:
    """Per batch size, each model (in its inference form) exported by ``classification.export`` for that batch of
    images at its own resolution (static shapes, as a deployed model runs), quantized for an INT8 block, and loaded
    in the block's runtime; a model that fails to export, quantize or load is left out with a message. ``traces``
    keeps the static programs, which the runtimes of one graph form convert, from one block to the next; the
    runtime's files in ``folder``, from one precision's block to the next (INT8 quantizes float32's file).
    ExecuTorch's INT8 programs are quantized from the PyTorch model by timmx, which folds it itself: from
    ``training_forms``."""
    fmt = RUNTIMES[block.backend]
    runners: Dict[int, Dict[str, Callable]] = {batch_size: {} for batch_size in batch_sizes}
    for name, model in models.items():
        input_size = model.pretrained_cfg['input_size'][-1]
        if block.precision == 'int8':
            calibration = torch.randn(INT8_CALIBRATION_IMAGES, 3, input_size, input_size,
                                      generator=torch.Generator().manual_seed(0))
        for batch_size in batch_sizes:
            path = folder / f'{name}_b{batch_size}{export.FORMATS[fmt]}'
            int8_path = path.with_name(f'{path.stem}_int8{path.suffix}')
            try:
                if block == Block('executorch', 'int8'):
                    export.export_with_timmx(training_forms[name], name, int8_path, fmt, input_size, calibration,
                                             batch_size=batch_size)
                else:
                    trace_key = (name, batch_size, export.graph_form(fmt))
                    if trace_key not in traces:
                        traces[trace_key] = export.trace(model, input_size, fmt, batch_size=batch_size)
                    if not path.exists():
                        export.export(model, path, fmt, input_size, traced=traces[trace_key])
                    if block.precision == 'int8':
                        int8.quantize(path, int8_path, calibration, fmt, batch_size=batch_size)
                runners[batch_size][name] = export.load_runtime(int8_path if block.precision == 'int8' else path,
                                                                fmt, threads)
            except Exception as error:  # noqa: BLE001  (a peer that a runtime cannot take is reported, not fatal)
                print(f'{block.name}: {name} at batch {batch_size} left out ({type(error).__name__}: '
                      f'{str(error).splitlines()[0][:200]})')
    return runners


def measure_runtime_interleaved(runners: Dict[str, Callable], batch_size: int, input_sizes: Dict[str, int],
                                warmup: int, rounds: int) -> Dict[str, List[float]]:
    """``measure_interleaved`` for models loaded in a runtime: seconds per call of each at ``batch_size``, one per
    round, the models taking turns in an order shuffled anew each round."""
    inputs = {name: torch.randn(batch_size, 3, input_sizes[name], input_sizes[name]).numpy() for name in runners}
    order = random.Random(0)
    names = list(runners)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            runners[name](inputs[name])
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            start = time.perf_counter()
            runners[name](inputs[name])
            times[name].append(time.perf_counter() - start)
    return times


def images_per_second_figure(figure: str) -> Optional[int]:
    """The batch size of a throughput figure (``throughput_b64``, ``train_b128``); None for latency."""
    for prefix in ('throughput_b', 'train_b'):
        if figure.startswith(prefix):
            return int(figure[len(prefix):])
    return None


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of the ratio of two models' times in the same round: drifts of the machine's
    speed from round to round cancel out."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def cpu_model_name() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# the instruction-set features that decide CPU runtimes' speed (and INT8's, bf16's), by their /proc/cpuinfo flags
CPU_FEATURES = {'AVX2': ('avx2',), 'AVX-512': ('avx512f',), 'VNNI': ('avx512_vnni', 'avx_vnni'), 'AMX': ('amx_tile',),
                'bf16': ('avx512_bf16', 'amx_bf16')}


def cpu_features(cpuinfo: Optional[str] = None) -> Dict[str, bool]:
    """Which of ``CPU_FEATURES`` the CPU has, from the flags of ``cpuinfo`` (default: /proc/cpuinfo); empty where
    the flags are not readable (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path('/proc/cpuinfo').read_text()
        except OSError:
            return {}
    for line in cpuinfo.splitlines():
        if line.startswith('flags'):
            flags = set(line.split(':', 1)[1].split())
            return {name: any(flag in flags for flag in names) for name, names in CPU_FEATURES.items()}
    return {}


def describe_cpu(machine: Dict) -> str:
    """The CPU and its instruction-set features, e.g. ``AMD EPYC (AVX2; no AVX-512, VNNI, AMX, bf16)``."""
    features = machine.get('cpu_features') or {}
    if not features:
        return f"{machine['cpu']} (instruction set not read)"
    present = ', '.join(name for name, has in features.items() if has)
    absent = ', '.join(name for name, has in features.items() if not has)
    return f"{machine['cpu']} ({'; '.join(filter(None, (present, absent and 'no ' + absent)))})"


def machine_where(machine: Dict) -> str:
    return machine.get('gpu') or f"{describe_cpu(machine)}, {machine['threads']} threads"


def machine_description(device: torch.device, threads: Optional[int], backends: Sequence[str] = ()) -> Dict:
    description = dict(
        date=datetime.date.today().isoformat(), torch=torch.__version__, timm=timm.__version__,
        cpu=cpu_model_name(), cpu_features=cpu_features(), cpu_count=os.cpu_count())
    for backend in backends:
        if backend in RUNTIMES:
            description[backend] = importlib.metadata.version(backend)
    if device.type == 'cuda':
        description['gpu'] = torch.cuda.get_device_name(device)
    else:
        description['threads'] = threads
    return description


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def time_backend(backend: str, args: argparse.Namespace, models: Dict[str, torch.nn.Module], device: torch.device,
                 amp_dtype: Optional[torch.dtype], traces: Dict, precision: str = 'fp32',
                 folder: Optional[Path] = None,
                 training_forms: Optional[Dict[str, torch.nn.Module]] = None) -> Dict[str, Dict[str, List[float]]]:
    """Seconds per round of every model in one backend at one precision, per figure (``latency_ms``,
    ``throughput_bN``, ...); ``traces``, ``folder`` (a runtime's files) and ``training_forms``: see
    ``runtime_models``."""
    input_sizes = {name: model.pretrained_cfg['input_size'][-1] for name, model in models.items()}
    if backend in RUNTIMES:
        batch_sizes = [1, *args.throughput_batch_sizes]
        runners = runtime_models(models, Block(backend, precision), batch_sizes, args.threads, folder, traces,
                                 training_forms)
        time.sleep(1)  # let the threads of the exports' PyTorch calls go idle before timing
        timings = {}
        if args.latency_rounds:
            timings['latency_ms'] = measure_runtime_interleaved(runners[1], 1, input_sizes, args.warmup,
                                                                args.latency_rounds)
        for batch_size in args.throughput_batch_sizes:
            timings[f'throughput_b{batch_size}'] = measure_runtime_interleaved(
                runners[batch_size], batch_size, input_sizes, args.throughput_warmup, args.throughput_rounds)
        return timings

    authors = backend == 'authors'
    channels_last = args.memory_format == 'channels_last' and not authors
    candidates = [Candidate(name, prepare(copy.deepcopy(model), device, channels_last,
                                          not (args.training_form or authors), args.compile and not authors),
                            input_sizes[name]) for name, model in models.items()]
    timings = {}
    if args.latency_rounds:
        timings['latency_ms'] = measure_interleaved(candidates, 1, args.warmup, args.latency_rounds, device,
                                                    channels_last, amp_dtype)
    for batch_size in args.throughput_batch_sizes:
        timings[f'throughput_b{batch_size}'] = measure_interleaved(
            candidates, batch_size, args.throughput_warmup, args.throughput_rounds, device, channels_last, amp_dtype)
    if args.train_batch_size and backend == 'torch':
        del candidates  # free the inference models before building the training ones
        timings[f'train_b{args.train_batch_size}'] = measure_training_interleaved(
            list(models), args.train_batch_size, args.throughput_warmup, args.throughput_rounds, device,
            channels_last, amp_dtype, args.compile)
    return timings


def backend_figures(block: Block, model_rows: List[Dict], timings: Dict[str, Dict[str, List[float]]],
                    compare: Sequence[str]) -> Tuple[List[Dict], List[Dict]]:
    """The rows of one block (each model's figures and their ratios to its FAT model, in this block) and its
    latency comparisons; rows and comparisons name the block as their ``backend``."""
    rows = []
    for model_row in model_rows:
        if not any(model_row['model'] in times for times in timings.values()):
            continue  # a model the runtime could not take
        row = dict(model_row)
        for figure, times in timings.items():
            if row['model'] in times:
                median = statistics.median(times[row['model']])
                batch_size = images_per_second_figure(figure)
                row[figure] = median * 1e3 if batch_size is None else batch_size / median
            else:
                row[figure] = None
        rows.append(row)

    names = [row['model'] for row in rows]
    by_name = {row['model']: row for row in rows}
    for row in rows:
        reference = reference_fat(row['model'], names)
        row['vs'] = reference
        for figure in ('params_m', 'gflops'):
            value, base = row[figure], by_name[reference][figure] if reference else None
            row[f'{figure}_x_fat'] = value / base if value is not None and base is not None else None
        for figure, times in timings.items():
            if reference is None or row['model'] not in times or reference not in times:
                row[f'{figure}_x_fat'] = None
            elif figure == 'latency_ms':
                row[f'{figure}_x_fat'] = paired_ratio(times[row['model']], times[reference])
            else:
                row[f'{figure}_x_fat'] = paired_ratio(times[reference], times[row['model']])
        row['backend'] = block.name
        row['precision'] = block.precision

    latency = timings.get('latency_ms', {})
    comparisons = []
    for pair in compare:
        first, second = pair.split(':')
        if first in latency and second in latency:
            per_round = [a / b for a, b in zip(latency[first], latency[second])]
            low, median, high = statistics.quantiles(per_round, n=4, method='inclusive')
            comparisons.append(dict(backend=block.name, model=first, versus=second, latency_ratio=median,
                                    latency_ratio_quartiles=[low, high]))
    return rows, comparisons


def run(args: argparse.Namespace) -> Dict:
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA GPU is available')
    if device.type == 'cpu':
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True  # each input shape gets cuDNN's fastest algorithm, as in timm's benchmark
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': None}[args.amp]
    load_before = _load_average()

    model_rows = []
    models = {}
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        input_size = model.pretrained_cfg['input_size'][-1]
        model_rows.append(dict(
            model=name, input_size=input_size, params_m=count_params(model) / 1e6,
            gflops=None if args.no_flops else count_flops(model, input_size) / 1e9, top1=published_top1(name)))
        models[name] = model
    runtime_forms = {name: reparameterize_model(model) for name, model in models.items()}

    # each backend is timed in its own block, the models taking turns within it: never two runtimes call after call
    rows, comparisons, timings, traces = [], [], {}, {}
    timed_blocks = blocks(args.backend, args.precision)
    for backend, backend_blocks in itertools.groupby(timed_blocks, key=lambda block: block.backend):
        runtime = backend in RUNTIMES
        # a runtime's files live through its blocks: its INT8 block quantizes the float32 block's files
        files = tempfile.TemporaryDirectory(prefix=f'benchmark-{backend}-') if runtime else contextlib.nullcontext()
        with files as folder:
            for block in backend_blocks:
                timings[block.name] = time_backend(backend, args, runtime_forms if runtime else models, device,
                                                   amp_dtype, traces, block.precision, folder and Path(folder),
                                                   training_forms=models)
                block_rows, block_comparisons = backend_figures(block, model_rows, timings[block.name], args.compare)
                rows += block_rows
                comparisons += block_comparisons
    comparisons += cross_backend_comparisons(timings, args.compare_backends)

    settings = dict(
        device=args.device, backends=list(args.backend), precisions=list(args.precision),
        blocks=[block.name for block in timed_blocks], deploy=not args.training_form,
        memory_format=args.memory_format, amp=args.amp, compile=args.compile, warmup=args.warmup,
        latency_rounds=args.latency_rounds, throughput_warmup=args.throughput_warmup,
        throughput_rounds=args.throughput_rounds, throughput_batch_sizes=list(args.throughput_batch_sizes),
        train_batch_size=args.train_batch_size)
    return dict(machine=machine_description(device, args.threads if device.type == 'cpu' else None, args.backend),
                settings=settings, load_average=dict(before=load_before, after=_load_average()),
                rows=rows, comparisons=comparisons, seconds_per_round=timings)


def cross_backend_comparisons(timings: Dict[str, Dict[str, Dict[str, List[float]]]],
                              pairs: Sequence[str]) -> List[Dict]:
    """Latency ratios of a model in one backend to a model in another (``BACKEND/MODEL:BACKEND/MODEL``): the ratio of
    their medians, the two measured in separate blocks of the same run."""
    comparisons = []
    for pair in pairs:
        (first_backend, first), (second_backend, second) = (side.split('/') for side in pair.split(':'))
        latency = {backend: figures.get('latency_ms', {}) for backend, figures in timings.items()}
        if first in latency.get(first_backend, {}) and second in latency.get(second_backend, {}):
            comparisons.append(dict(backend=first_backend, model=first, versus_backend=second_backend, versus=second,
                                    latency_ratio=statistics.median(latency[first_backend][first])
                                    / statistics.median(latency[second_backend][second])))
    return comparisons


def _cell(value: Optional[float], digits: int, ratio: Optional[float] = None) -> str:
    if value is None:
        return '–'
    text = f'{value:.{digits}f}'
    return f'{text} ({ratio:.2f}×)' if ratio is not None else text


def format_table(result: Dict, markdown: bool = False) -> str:
    """One table per block (backend and precision), then the latency comparisons."""
    batch_sizes = result['settings']['throughput_batch_sizes']
    train_batch_size = result['settings']['train_batch_size']
    latency = result['settings']['latency_rounds'] > 0
    tables = []
    for block in result['settings']['blocks']:
        rows = [row for row in result['rows'] if row['backend'] == block]
        train = train_batch_size if any(row.get(f'train_b{train_batch_size}') for row in rows) else None
        header = ['model', 'input', 'params (M)', 'GFLOPs', 'top-1 (%)'] + \
            (['latency b1 (ms)'] if latency else []) + \
            [f'throughput b{b} (img/s)' for b in batch_sizes] + \
            ([f'training b{train} (img/s)'] if train else []) + ['ratios vs']
        lines = []
        for row in rows:
            lines.append([
                row['model'], str(row['input_size']),
                _cell(row['params_m'], 2, row['params_m_x_fat']),
                _cell(row['gflops'], 2, row['gflops_x_fat']),
                _cell(row['top1'], 1),
                *([_cell(row['latency_ms'], 1, row['latency_ms_x_fat'])] if latency else []),
                *[_cell(row[f'throughput_b{b}'], 1, row[f'throughput_b{b}_x_fat']) for b in batch_sizes],
                *([_cell(row[f'train_b{train}'], 1, row[f'train_b{train}_x_fat'])] if train else []),
                row['vs'] or '–',
            ])
        if markdown:
            table = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
            table += ['| ' + ' | '.join(line) + ' |' for line in lines]
        else:
            widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
            table = ['  '.join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [header] + lines]
        tables.append(f'{block}:\n' + '\n'.join(table))
    for comparison in result['comparisons']:
        if 'versus_backend' in comparison:
            tables.append(f"latency {comparison['backend']} {comparison['model']} / {comparison['versus_backend']} "
                          f"{comparison['versus']}: {comparison['latency_ratio']:.2f}× (ratio of the medians of two "
                          'blocks)')
        else:
            low, high = comparison['latency_ratio_quartiles']
            tables.append(f"latency {comparison['model']} / {comparison['versus']} in {comparison['backend']}: "
                          f"{comparison['latency_ratio']:.2f}× (median of the rounds' ratios; quartiles "
                          f"{low:.2f}–{high:.2f})")
    return '\n\n'.join(tables)


def write_outputs(result: Dict, output_dir: Path, plot: bool):
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / 'benchmark.json').write_text(json.dumps(result, indent=2) + '\n')
    with open(output_dir / 'benchmark.csv', 'w', newline='') as f:
        fields = list(dict.fromkeys(key for row in result['rows'] for key in row))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result['rows'])
    if plot:
        plot_accuracy_against_throughput(result, output_dir / 'accuracy_vs_throughput.png')
        if result['settings']['latency_rounds']:
            plot_accuracy_against_latency(result, output_dir / 'accuracy_vs_latency.png')


def _model_groups(rows: Sequence[Dict]) -> List[Tuple[str, List[Dict], Dict]]:
    """FAT, the FAT paper's peers and the CPU-first peers among ``rows``, each with its plot style."""
    def group(row: Dict) -> str:
        if is_fat(row['model']):
            return 'FAT'
        return 'CPU-first peers' if row['model'] in PEERS and PEERS[row['model']].cpu_first else 'other peers'
    styles = {'FAT': dict(color='tab:red', marker='o', linestyle='-'),
              'other peers': dict(color='tab:blue', marker='s', linestyle='none'),
              'CPU-first peers': dict(color='tab:green', marker='^', linestyle='none')}
    return [(label, [row for row in rows if group(row) == label], style) for label, style in styles.items()
            if any(group(row) == label for row in rows)]


def plot_accuracy_against_latency(result: Dict, path: Path):
    """Published top-1 against batch-1 latency, one panel per block (backend and precision)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = result['settings']['blocks']
    columns = min(2, len(names))
    rows_of_panels = -(-len(names) // columns)
    figure, panels = plt.subplots(rows_of_panels, columns, figsize=(6.5 * columns, 4.5 * rows_of_panels),
                                  squeeze=False, sharex=True, sharey=True)
    for axes in panels.flat[len(names):]:
        axes.set_visible(False)
    for axes, block in zip(panels.flat, names):
        rows = [row for row in result['rows']
                if row['backend'] == block and row['top1'] is not None and row['latency_ms'] is not None]
        for label, chosen, style in _model_groups(rows):
            axes.plot([row['latency_ms'] for row in chosen], [row['top1'] for row in chosen], label=label, **style)
            for row in chosen:
                axes.annotate(row['model'], (row['latency_ms'], row['top1']), fontsize=6, xytext=(3, 3),
                              textcoords='offset points')
        axes.set_title(block, fontsize=9)
        axes.set_xlabel('batch-1 latency (ms)')
        axes.xaxis.set_tick_params(labelbottom=True)
        axes.grid(alpha=.3)
    for axes in panels[:, 0]:
        axes.set_ylabel('published ImageNet-1K top-1 (%, float32)')
    panels[0][0].legend(fontsize=7)
    figure.suptitle(f'{machine_where(result["machine"])}, {result["machine"]["date"]}', fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def plot_accuracy_against_throughput(result: Dict, path: Path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    batch_size = result['settings']['throughput_batch_sizes'][-1]
    backend = result['settings']['backends'][0]
    rows = [row for row in result['rows'] if row['top1'] is not None and row['backend'] == backend]
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, chosen, style in _model_groups(rows):
        axes.plot([row[f'throughput_b{batch_size}'] for row in chosen], [row['top1'] for row in chosen], label=label,
                  **style)
        for row in chosen:
            axes.annotate(row['model'], (row[f'throughput_b{batch_size}'], row['top1']), fontsize=7,
                          xytext=(3, 3), textcoords='offset points')
    where = machine_where(result['machine'])
    axes.set_xlabel(f'throughput, batch {batch_size} (images/s, {backend}, {where})')
    axes.set_ylabel('published ImageNet-1K top-1 (%)')
    axes.legend()
    axes.grid(alpha=.3)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=program_name(__spec__.name), description=__doc__.splitlines()[0])
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--backend', nargs='+', choices=BACKENDS, default=['torch'], metavar='BACKEND',
                        help=f'where the models run, each timed in its own block: {", ".join(BACKENDS)} (default: '
                             'torch; authors: the training form, NCHW, eager, as the authors run it; the runtimes '
                             'run the inference form exported by classification.export, on the CPU)')
    parser.add_argument('--precision', nargs='+', choices=PRECISIONS, default=['fp32'], metavar='PRECISION',
                        help=f'fp32, int8 (default: fp32); int8 is timed in {", ".join(INT8_RUNTIMES)}, each model '
                             'quantized as export --int8 does, in a block of its own (e.g. openvino-int8)')
    parser.add_argument('--compare-backends', nargs='*', metavar='B/A:B/A',
                        help='pairs BACKEND/MODEL:BACKEND/MODEL whose latency ratio is printed (default: fat_b0 in '
                             'each backend against fat_b0 in authors, when measured)')
    parser.add_argument('--models', nargs='+', metavar='NAME', default=compared_models() + tuple(PEERS),
                        help='timm model names (default: FAT-B0...B3, LVT, the FAT paper\'s other peers and the '
                             'CPU-first peers)')
    parser.add_argument('--threads', type=int, default=2, help='CPU threads (default: 2)')
    parser.add_argument('--warmup', type=int, default=10, help='warm-up passes per model (default: 10)')
    parser.add_argument('--latency-rounds', type=int, default=100,
                        help='batch-1 rounds (default: 100; 0: no batch-1 latency)')
    parser.add_argument('--throughput-batch-sizes', type=int, nargs='+', metavar='N',
                        help='throughput batch sizes (default: 16 on the CPU, 64 128 on CUDA)')
    parser.add_argument('--throughput-warmup', type=int, default=2,
                        help='warm-up passes per model and batch size (default: 2)')
    parser.add_argument('--throughput-rounds', type=int, default=10, help='rounds per batch size (default: 10)')
    parser.add_argument('--train-batch-size', type=int, metavar='N',
                        help='also time the training step at this batch size (default: off)')
    parser.add_argument('--memory-format', choices=('channels_last', 'contiguous'), default='channels_last')
    parser.add_argument('--amp', choices=('bf16', 'fp16', 'none'),
                        help='autocast dtype (default: bf16 on CUDA where supported, else fp16; none on the CPU)')
    parser.add_argument('--compile', action='store_true', help='torch.compile every model')
    parser.add_argument('--training-form', action='store_true',
                        help='measure the models as built, without timm.utils.reparameterize_model')
    parser.add_argument('--no-flops', action='store_true', help='skip the fvcore FLOP count')
    parser.add_argument('--compare', nargs='*', metavar='A:B', default=DEFAULT_COMPARISONS,
                        help='pairs whose latency ratio A/B is printed, when both were measured '
                             f'(default: {" ".join(DEFAULT_COMPARISONS)})')
    parser.add_argument('--output-dir', type=Path, help='write benchmark.csv and benchmark.json here')
    parser.add_argument('--plot', action='store_true',
                        help='also write accuracy_vs_throughput.png (the first block) and accuracy_vs_latency.png '
                             '(a panel per block) to --output-dir (needs matplotlib)')
    parser.add_argument('--markdown', action='store_true', help='print a Markdown table')
    args = parser.parse_args(argv)

    unknown = [name for name in args.models if not timm.is_model(name)]
    if unknown:
        parser.error(f'unknown timm model(s): {", ".join(unknown)}')
    if len(set(args.models)) != len(args.models):
        parser.error('--models lists a model twice')
    for pair in args.compare:
        if pair.count(':') != 1 or not all(pair.split(':')):
            parser.error(f'--compare takes pairs A:B, got {pair!r}')
    for option in ('threads', 'throughput_rounds'):
        if getattr(args, option) < 1:
            parser.error(f'--{option.replace("_", "-")} must be at least 1')
    if args.latency_rounds < 0 or args.latency_rounds == 1:
        parser.error('--latency-rounds must be 0 (no batch-1 latency) or at least 2')
    if args.warmup < 0 or args.throughput_warmup < 0:
        parser.error('--warmup and --throughput-warmup must not be negative')
    if args.throughput_batch_sizes is None:
        args.throughput_batch_sizes = [64, 128] if args.device == 'cuda' else [16]
    if args.train_batch_size is not None and args.train_batch_size < 2:
        parser.error('--train-batch-size must be at least 2 (BatchNorm needs two samples in train mode)')
    if any(b < 1 for b in args.throughput_batch_sizes):
        parser.error('--throughput-batch-sizes must be at least 1')
    if args.amp is None:
        if args.device == 'cuda':
            args.amp = 'bf16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'fp16'
        else:
            args.amp = 'none'
    if args.plot and args.output_dir is None:
        parser.error('--plot needs --output-dir')
    if len(set(args.backend)) != len(args.backend):
        parser.error('--backend lists a backend twice')
    if args.device == 'cuda' and set(args.backend) & set(RUNTIMES):
        parser.error(f'the runtimes ({", ".join(RUNTIMES)}) are timed on the CPU: use --device cpu')
    for backend in set(args.backend) & set(RUNTIMES):
        try:
            export.require(RUNTIMES[backend])
        except export.RuntimeMissing as error:
            parser.error(str(error))
    if len(set(args.precision)) != len(args.precision):
        parser.error('--precision lists a precision twice')
    if 'int8' in args.precision:
        if not set(args.backend) & set(INT8_RUNTIMES):
            parser.error(f'--precision int8 is timed in the runtimes: add --backend {" or ".join(INT8_RUNTIMES)}')
        try:
            for backend in set(args.backend) & set(INT8_RUNTIMES):
                int8.require(RUNTIMES[backend])
        except dependencies.MissingDependency as error:
            parser.error(str(error))
    if args.compare_backends is None:
        args.compare_backends = [f'{block.name}/fat_b0:authors/fat_b0' for block in blocks(args.backend, args.precision)
                                 if block.backend != 'authors' and 'authors' in args.backend]
    for pair in args.compare_backends:
        if not re.fullmatch(r'[\w-]+/[\w.-]+:[\w-]+/[\w.-]+', pair):
            parser.error(f'--compare-backends takes pairs BACKEND/MODEL:BACKEND/MODEL, got {pair!r}')
    return args


def main(argv: Optional[Sequence[str]] = None):
    args = parse_args(argv)
    result = run(args)
    machine = result['machine']
    where = machine_where(machine)
    runtimes = ''.join(f', {backend} {machine[backend]}' for backend in RUNTIMES if backend in machine)
    print(f"{machine['date']}, {where}, torch {machine['torch']}, timm {machine['timm']}{runtimes}; "
          f"load average {result['load_average']['before']} before, {result['load_average']['after']} after")
    print(format_table(result, markdown=args.markdown))
    if args.output_dir is not None:
        write_outputs(result, args.output_dir, args.plot)


if __name__ == '__main__':
    main()
