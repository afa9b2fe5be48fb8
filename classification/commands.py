"""What the command-line tools share: the name they were run by, where a config named on them is found, and their
progress bars.

The same code runs from a checkout (``python -m classification.train``) and installed (``fat-train``, or
``python -m fat_vit.classification.train``); the configs sit beside it in either case: the checkout's ``configs/``, or
``fat_vit/configs/`` in an installed copy.
"""
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

from tqdm import tqdm

__all__ = ['PACKAGED_CONFIGS', 'find_config', 'program_name', 'progress']

PACKAGED_CONFIGS = Path(__file__).resolve().parent.parent / 'configs'


def program_name(module: str) -> str:
    """How the running command was invoked, for its usage line: its entry point (``fat-train``), else
    ``python -m MODULE`` (``module``: the command's ``__spec__.name``, right in the checkout and installed)."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ''
    return script if script.startswith('fat-') else f'python -m {module}'


def find_config(path: str) -> str:
    """``path`` where it names a file; else the packaged config of that name relative to ``configs/`` (given with
    or without the leading ``configs/``), which it says on stderr; else ``path``, for the caller's not-found
    message."""
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    relative = Path(path)
    if relative.parts[:1] == ('configs',):
        relative = Path(*relative.parts[1:])
    packaged = PACKAGED_CONFIGS / relative
    if not packaged.is_file():
        return path
    print(f'{path} is not a file here: using the packaged config {packaged}', file=sys.stderr)
    return str(packaged)


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = '',
             enabled: bool = True) -> tqdm:
    """A progress bar with its rate and ETA where stdout is a terminal (and ``enabled``: the main process, say);
    nothing where the output goes to a log file or a pipe, so that logs hold lines, not redrawn bars."""
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stdout,
                disable=not (enabled and sys.stdout.isatty()))
