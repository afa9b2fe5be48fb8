"""Reading checkpoint files without running anything they carry.

Every checkpoint this project reads goes through ``load_checkpoint_file``:

* ``.safetensors`` files hold tensors only.
* Other files are first read with ``torch.load(weights_only=True)``: this project's own checkpoints hold
  only tensors and plain data.
* The authors' training checkpoints also hold a pickled yacs ``CfgNode``, which ``weights_only`` refuses.
  They are read by an unpickler that admits tensors, containers and the yacs config (rebuilt as a plain
  ``dict``, yacs is never imported) and refuses every other global, so a file that smuggles a callable
  (an object whose ``__reduce__`` calls ``os.system``, say) fails before anything in it runs.
"""
import collections
import os
import pickle
import types
from typing import Any, Dict, Mapping

import torch

__all__ = ['CheckpointError', 'UnsafeCheckpointError', 'load_checkpoint_file', 'unwrap_state_dict']


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint references code this project refuses to load."""


class _ConfigNode(dict):
    """Stands in for yacs' CfgNode while unpickling: its items, nothing else."""

    def __setstate__(self, state):
        # CfgNode pickles its bookkeeping flags (__immutable__, ...) as instance state: drop them
        pass


_ALLOWED_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('__builtin__', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('__builtin__', 'frozenset'): frozenset,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch', 'Size'): torch.Size,
    ('yacs.config', 'CfgNode'): _ConfigNode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load '{module}.{name}': the checkpoint references code, and only tensors, "
                f"containers and yacs configs are accepted") from None


# torch.load unpickles with ``pickle_module.Unpickler`` (resolving its own storage types first)
_restricted_pickle = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=None, __name__='restricted_pickle')


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, _ConfigNode):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, dict):
        return type(obj)((k, _to_plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(v) for v in obj)
    return obj


def load_checkpoint_file(path: str, map_location: Any = 'cpu') -> Any:
    """Read a checkpoint file (.pth / .pt / .bin or .safetensors) as tensors and plain data.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file references code (a class or function other than tensors,
            containers and yacs configs).
        CheckpointError: the file is not a readable checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        import safetensors.torch
        return safetensors.torch.load_file(path, device=str(map_location))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass  # it references globals beyond weights_only's; the restricted unpickler decides
    except Exception as error:
        raise CheckpointError(f'{path} is not a readable PyTorch checkpoint: {error}') from error
    try:
        checkpoint = torch.load(path, map_location=map_location, pickle_module=_restricted_pickle,
                                weights_only=False)
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(f'{path}: {error}') from None
    except Exception as error:
        raise CheckpointError(f'{path} is not a readable PyTorch checkpoint: {error}') from error
    return _to_plain(checkpoint)


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint: its ``model`` / ``state_dict`` entry if it is a training
    checkpoint, itself if it is a state dict; a DistributedDataParallel ``module.`` prefix is removed.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'expected a checkpoint dict, got {type(checkpoint).__name__}')
    for key in ('model', 'state_dict'):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state_dict = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f'not a state dict: entry {key!r} is a {type(value).__name__}, not a tensor')
        state_dict[key[len('module.'):] if key.startswith('module.') else key] = value
    return state_dict
