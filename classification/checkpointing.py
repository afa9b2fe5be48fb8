"""The trainer's checkpoints: what a run writes to its output folder, and every process's random state.

``latest.pth`` is written after every epoch; ``best.pth`` when the validation accuracy improves, and
``ckpt_epoch_N.pth`` every SAVE_FREQ epochs and after the last, are hard links to it (copies where the file system
has no hard links), so the state is serialised once. Of the ``ckpt_epoch_N.pth`` files, the newest
TRAIN.KEEP_CHECKPOINTS are kept. Every file is written to a temporary name and renamed, so none is ever half
written.
"""
import logging
import os
import random
import re
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = ['Checkpointer', 'is_trainer_checkpoint', 'rng_state', 'set_rng_state']

_logger = logging.getLogger(__name__)
_PERIODIC = re.compile(r'^ckpt_epoch_(\d+)\.pth$')
# what every checkpoint of this trainer holds (Trainer.state), and no other trainer's
_TRAINER_KEYS = ('model', 'optimizer', 'epoch', 'max_accuracy', 'config', 'steps_per_epoch', 'global_batch')


def is_trainer_checkpoint(checkpoint: Any) -> bool:
    """Whether ``checkpoint`` is this trainer's (whose optimizer, schedule, epoch and random state a run can
    continue), not another's: the authors' FAT checkpoints, a timm trainer's (the LVT authors'), a state dict."""
    return isinstance(checkpoint, dict) and all(key in checkpoint for key in _TRAINER_KEYS)


def rng_state() -> Dict:
    numpy_state = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=(numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]))
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _replace_atomically(path: str, write: Callable[[str], None]):
    """Have ``write`` fill a temporary file beside ``path``, then rename it to ``path``."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.' + os.path.basename(path))
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _save(state: Dict, path: str):
    def write(temporary: str):
        with open(temporary, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    _replace_atomically(path, write)


def _link_or_copy(source: str, path: str):
    def write(temporary: str):
        os.remove(temporary)
        try:
            os.link(source, temporary)
        except OSError:  # a file system without hard links
            shutil.copyfile(source, temporary)
    _replace_atomically(path, write)


class Checkpointer:
    def __init__(self, output: str, rank: int = 0, world_size: int = 1, keep: int = 3):
        self.output = output
        self.rank = rank
        self.world_size = world_size
        self.keep = keep

    @property
    def latest(self) -> str:
        return os.path.join(self.output, 'latest.pth')

    def periodic(self) -> List[str]:
        """The ``ckpt_epoch_N.pth`` files of the output folder, oldest first."""
        found = [(int(match.group(1)), name) for name in os.listdir(self.output)
                 for match in [_PERIODIC.match(name)] if match]
        return [name for _, name in sorted(found)]

    def save(self, state: Dict, epoch: int, best: Optional[Dict], save_freq: int, last_epoch: bool):
        """Collective: every rank contributes its RNG state; rank 0 writes the files. ``best`` (which weights won
        and their metric) when this epoch is the best so far."""
        rng_states = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(rng_states, rng_state())
        else:
            rng_states[0] = rng_state()
        if self.rank != 0:
            return
        _save(dict(state, rng=rng_states, world_size=self.world_size, best=best), self.latest)
        copies = ['best.pth'] if best else []
        if (epoch + 1) % save_freq == 0 or last_epoch:
            copies.append(f'ckpt_epoch_{epoch + 1}.pth')
        for name in copies:
            _link_or_copy(self.latest, os.path.join(self.output, name))
        removed = self.periodic()[:-self.keep]
        for name in removed:
            os.remove(os.path.join(self.output, name))
        _logger.info('saved %s%s%s', self.latest, ''.join(f', {name}' for name in copies),
                     f' (removed {", ".join(removed)})' if removed else '')
