"""MMEngine's checkpoints, read without unrestricted unpickling.

MMEngine reads local checkpoints (``load_from``, ``--resume``, ``init_cfg=dict(type='Pretrained')``) with a
bare ``torch.load``. Under torch >= 2.6 that is ``weights_only=True``, which refuses the Runner's own
checkpoints: their ``message_hub`` holds MMEngine ``HistoryBuffer`` objects, numpy arrays and scalars, and
the buffers' statistic methods (pickled as ``getattr(HistoryBuffer, 'mean')``).

``use_restricted_loading()`` makes MMEngine read local files with torch's ``weights_only`` unpickler admitting
exactly those objects in addition: ``HistoryBuffer``, numpy arrays and scalars of numeric dtypes (not object
arrays), and a ``getattr`` that resolves nothing but the four statistic methods of ``HistoryBuffer``. Every
other global, ``builtins.getattr`` on anything else included, is refused before anything in the file runs.
"""
import os.path as osp
import pickle
from typing import Any

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader

from classification.checkpoint_io import UnsafeCheckpointError

__all__ = ['RUNNER_CHECKPOINT_GLOBALS', 'load_from_local_restricted', 'use_restricted_loading']

_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_statistic(owner: Any, name: str):
    """Stands in for ``getattr`` while unpickling: only ``HistoryBuffer``'s statistic methods resolve."""
    if owner is HistoryBuffer and name in _HISTORY_BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise UnsafeCheckpointError(f'refusing getattr({owner!r}, {name!r}): only the statistic methods of '
                                'mmengine.logging.HistoryBuffer are accepted')


# the functions numpy pickles arrays and scalars with, under their numpy 2 and numpy 1 names
_reconstruct_array = np.empty(0).__reduce__()[0]
_reconstruct_scalar = np.float64(0).__reduce__()[0]
# the classes of the dtypes they restore: bool, integer, floating point and complex
_NUMERIC_DTYPE_CLASSES = sorted(
    {type(np.dtype(code)) for code in '?' + np.typecodes['AllInteger'] + np.typecodes['AllFloat']},
    key=lambda cls: cls.__name__)

RUNNER_CHECKPOINT_GLOBALS = [
    HistoryBuffer,
    np.ndarray,
    np.dtype,
    *_NUMERIC_DTYPE_CLASSES,
    (_reconstruct_array, 'numpy._core.multiarray._reconstruct'),
    (_reconstruct_array, 'numpy.core.multiarray._reconstruct'),
    (_reconstruct_scalar, 'numpy._core.multiarray.scalar'),
    (_reconstruct_scalar, 'numpy.core.multiarray.scalar'),
    (_history_buffer_statistic, 'builtins.getattr'),
]


def load_from_local_restricted(filename: str, map_location: Any = None) -> Any:
    """Read a local checkpoint: tensors, plain data and the Runner's logging state, nothing that runs code.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file references a global outside ``RUNNER_CHECKPOINT_GLOBALS``.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint not found: {filename}')
    try:
        with torch.serialization.safe_globals(RUNNER_CHECKPOINT_GLOBALS):
            return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch wraps the unpickler's reason in advice to load with weights_only=False: report the reason
        reason = error.__context__ if isinstance(error.__context__, pickle.UnpicklingError) else error
        raise UnsafeCheckpointError(f'refusing to load {filename}: {reason}') from None


def use_restricted_loading():
    """Make MMEngine read every local checkpoint with ``load_from_local_restricted``."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local_restricted, force=True)
