"""This repository's trainer beside timm's own ``train.py``: training images per second, in one run.

    python -m classification.trainer_benchmark --timm-train-script ../shared/timm-scripts/train.py \\
        [--model fat_b0] [--rounds 2] [--epochs 3] [--batch-size 32] [--img-size 64] [--output-dir DIR]

Both train the same model on the same generated data (the demo's synthetic shapes, written once to
``--output-dir``) with the same batch, image size, data workers and augmentations: the recipe's RandAugment
(rand-m9-mstd0.5-inc1), random erasing 0.25 (pixel mode), Mixup 0.8 / CutMix 1.0, label smoothing 0.1, AdamW and
gradient clipping at 5. The runs alternate (ours, timm's, ours, ...) so that drifts of the machine's speed fall on
both. Each run's figure is the mean, over its epochs but the first, of the trainer's own report: ours from
``summary.json``, timm's from the average rate of each epoch's last log line; both time the whole epoch, data
loading included. The ratio of each round and their median are printed (> 1: ours is faster).
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .commands import PACKAGED_CONFIGS, program_name
from .synthetic_shapes import CLASSES, ensure_synthetic_shapes

# the folder that holds this code's top-level package (the checkout, or site-packages for fat_vit): the runs start
# there, so that ``-m`` finds the trainer and nothing inside the package shadows another
IMPORT_ROOT = Path(__file__).resolve().parents[len(__package__.split('.'))]
_TIMM_RATE = re.compile(r'Train: (\d+) \[.*\]\s+Loss: .*\(\d+\.\d+s,\s+([\d.]+)/s\)')


def our_command(args: argparse.Namespace, data: Path, output: Path) -> List[str]:
    return [sys.executable, '-m', f'{__package__}.train', '--cfg', str(PACKAGED_CONFIGS / 'classification/fat_b0.yaml'),
            '--data-path', str(data), '--output', str(output), '--batch-size', str(args.batch_size), '--opts',
            'MODEL.NAME', args.model, 'MODEL.NUM_CLASSES', str(len(CLASSES)), 'DATA.IMG_SIZE', str(args.img_size),
            'DATA.NUM_WORKERS', str(args.workers), 'DATA.PIN_MEMORY', 'False', 'TRAIN.EPOCHS', str(args.epochs),
            'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.AUTO_RESUME', 'False', 'PRINT_FREQ', '10']


def timm_command(args: argparse.Namespace, data: Path, output: Path) -> List[str]:
    arguments = [str(data), '--model', args.model, '--num-classes', str(len(CLASSES)), '--img-size',
                 str(args.img_size), '-b', str(args.batch_size), '--epochs', str(args.epochs), '--warmup-epochs', '1',
                 '--device', 'cpu', '--no-prefetcher', '--train-split', 'train', '--val-split', 'val', '-j',
                 str(args.workers), '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--remode', 'pixel',
                 '--mixup', '0.8', '--cutmix', '1.0', '--smoothing', '0.1', '--opt', 'adamw', '--weight-decay', '0.05',
                 '--clip-grad', '5.0', '--drop-path', '0.05', '--log-interval', '10', '--output', str(output)]
    # the script is not part of the timm package: run it with this repository's models registered
    launcher = (f'import runpy, sys, {__package__}; sys.argv = ["train.py"] + sys.argv[1:]; '
                f'runpy.run_path({str(args.timm_train_script)!r}, run_name="__main__")')
    return [sys.executable, '-c', launcher, *arguments]


def run(command: Sequence[str]) -> str:
    result = subprocess.run(command, cwd=IMPORT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode:
        raise SystemExit(f'{command[:3]} failed:\n{result.stdout[-3000:]}')
    return result.stdout


def our_rate(output: Path) -> float:
    """Mean training images per second of every epoch but the first, from the run's summary."""
    history = json.loads((output / 'summary.json').read_text())['history']
    return statistics.mean(entry['images_per_second'] for entry in history[1:])


def timm_rate(log: str) -> float:
    """Mean training images per second of every epoch but the first: each epoch's average of its last log line."""
    per_epoch = {int(epoch): float(rate) for epoch, rate in _TIMM_RATE.findall(log)}  # the last line per epoch
    if len(per_epoch) < 2:
        raise SystemExit(f'no throughput found in the log of timm\'s train.py:\n{log[-3000:]}')
    return statistics.mean(rate for epoch, rate in per_epoch.items() if epoch > min(per_epoch))


def measure(args: argparse.Namespace) -> Dict:
    data = args.output_dir / 'data'
    ensure_synthetic_shapes(str(data))
    rounds = []
    for index in range(args.rounds):
        ours = args.output_dir / f'ours_{index}'
        run(our_command(args, data, ours))
        our_images_per_second = our_rate(ours)
        timm_images_per_second = timm_rate(run(timm_command(args, data, args.output_dir / f'timm_{index}')))
        rounds.append(dict(ours=our_images_per_second, timm=timm_images_per_second,
                           ratio=our_images_per_second / timm_images_per_second))
    return dict(model=args.model, batch_size=args.batch_size, img_size=args.img_size, epochs=args.epochs,
                workers=args.workers, rounds=rounds, median_ratio=statistics.median(r['ratio'] for r in rounds))


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(prog=program_name(__spec__.name), description=__doc__.splitlines()[0])
    parser.add_argument('--timm-train-script', type=Path, required=True, help="timm's train.py")
    parser.add_argument('--model', default='fat_b0')
    parser.add_argument('--rounds', type=int, default=2, help='runs of each trainer, alternating (default: 2)')
    parser.add_argument('--epochs', type=int, default=3,
                        help='epochs per run; all but the first are timed (default: 3)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--workers', type=int, default=1, help='data-loading processes (default: 1)')
    parser.add_argument('--output-dir', type=Path, default=Path('output/trainer_benchmark'))
    args = parser.parse_args(argv)
    if not args.timm_train_script.is_file():
        parser.error(f'--timm-train-script {args.timm_train_script}: no such file')
    if args.epochs < 2 or args.rounds < 1:
        parser.error('--epochs must be at least 2 (the first is warm-up) and --rounds at least 1')
    args.timm_train_script, args.output_dir = args.timm_train_script.resolve(), args.output_dir.resolve()
    result = measure(args)
    for index, entry in enumerate(result['rounds']):
        print(f"round {index + 1}: ours {entry['ours']:.1f} img/s, timm's train.py {entry['timm']:.1f} img/s, "
              f"ratio {entry['ratio']:.3f}")
    print(f"median ratio (ours / timm's): {result['median_ratio']:.3f}")
    (args.output_dir / 'trainer_benchmark.json').write_text(json.dumps(result, indent=2) + '\n')


if __name__ == '__main__':
    main()
