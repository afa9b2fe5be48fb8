"""MMEngine's checkpoints, read by this project's restricted unpickler (``classification.checkpoint_io``).

MMEngine reads local checkpoints (``load_from``, ``--resume``, ``init_cfg=dict(type='Pretrained')``) with a bare
``torch.load``. Under torch >= 2.6 that is ``weights_only=True``, which refuses the Runner's own checkpoints:
their ``message_hub`` holds MMEngine ``HistoryBuffer`` objects, numpy arrays and scalars, and the buffers'
statistic methods (pickled as ``getattr(HistoryBuffer, 'mean')``).

``use_restricted_loading()`` makes MMEngine read local files with ``load_checkpoint_file``, admitting exactly those
objects beyond tensors and plain data: ``HistoryBuffer``, numpy arrays and scalars of numeric dtypes (not object
arrays), and a ``getattr`` that resolves nothing but the four statistic methods of ``HistoryBuffer``. Every other
global, ``builtins.getattr`` on anything else included, is refused before anything in the file runs.

``dense_prediction_backbone`` takes the backbone's weights out of a detector's or segmentor's checkpoint.
"""
import os.path as osp
from typing import Any, Dict, Optional

import numpy as np
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader

from classification.checkpoint_io import UnsafeCheckpointError, load_checkpoint_file

__all__ = ['RUNNER_CHECKPOINT_GLOBALS', 'dense_prediction_backbone', 'load_from_local_restricted',
           'use_restricted_loading']

_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_statistic(owner: Any, name: str):
    """Stands in for ``getattr`` while unpickling: only ``HistoryBuffer``'s statistic methods resolve."""
    if owner is HistoryBuffer and name in _HISTORY_BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise UnsafeCheckpointError(f'refusing getattr({owner!r}, {name!r}): only the statistic methods of '
                                'mmengine.logging.HistoryBuffer are accepted')


def _numeric_dtype(*args) -> np.dtype:
    """Stands in for ``numpy.dtype`` while unpickling: bool, integer, floating point and complex dtypes only."""
    dtype = np.dtype(*args)
    if dtype.kind not in 'biufc':
        raise UnsafeCheckpointError(f'refusing numpy dtype {dtype}: only numeric dtypes are accepted')
    return dtype


# the functions numpy pickles arrays and scalars with, under their numpy 2 and numpy 1 module names
_reconstruct_array = np.empty(0).__reduce__()[0]
_reconstruct_scalar = np.float64(0).__reduce__()[0]

RUNNER_CHECKPOINT_GLOBALS = {
    (HistoryBuffer.__module__, HistoryBuffer.__qualname__): HistoryBuffer,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): _numeric_dtype,
    ('numpy._core.multiarray', '_reconstruct'): _reconstruct_array,
    ('numpy.core.multiarray', '_reconstruct'): _reconstruct_array,
    ('numpy._core.multiarray', 'scalar'): _reconstruct_scalar,
    ('numpy.core.multiarray', 'scalar'): _reconstruct_scalar,
    ('builtins', 'getattr'): _history_buffer_statistic,
}


def load_from_local_restricted(filename: str, map_location: Any = None) -> Any:
    """Read a local checkpoint: tensors, plain data and the Runner's logging state, nothing that runs code.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file references a global outside ``RUNNER_CHECKPOINT_GLOBALS``.
    """
    return load_checkpoint_file(osp.expanduser(filename), map_location=map_location,
                                extra_globals=RUNNER_CHECKPOINT_GLOBALS)


def use_restricted_loading():
    """Make MMEngine read every local checkpoint with ``load_from_local_restricted``."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local_restricted, force=True)


# the modules beside the backbone in MMDetection's and MMSegmentation's models (0.x / 2.x and 1.x / 3.x alike)
_DENSE_PREDICTION_MODULES = ('neck.', 'decode_head.', 'auxiliary_head.', 'rpn_head.', 'roi_head.', 'bbox_head.',
                             'mask_head.', 'semantic_head.', 'panoptic_head.', 'panoptic_fusion_head.')


def dense_prediction_backbone(checkpoint: Any) -> Optional[Dict[str, Any]]:
    """The backbone's weights, without their ``backbone.`` prefix, if ``checkpoint`` is a detector's or segmentor's
    (MMEngine's, or MMCV 1.x's: a ``state_dict`` whose ``backbone.*`` keys lie beside a neck's or head's); None
    for any other checkpoint, such as a classifier whose own modules are named ``backbone`` (LVT's)."""
    state_dict = checkpoint.get('state_dict') if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        return None
    keys = {key[len('module.'):] if key.startswith('module.') else key: key for key in state_dict}
    if not any(key.startswith(_DENSE_PREDICTION_MODULES) for key in keys):
        return None
    return {key[len('backbone.'):]: state_dict[saved] for key, saved in keys.items() if key.startswith('backbone.')}
