"""Checkpoints: reading them without running anything they carry, and loading them into a model.

Reading (``load_checkpoint_file``). ``.safetensors`` files hold tensors only. Every other file is unpickled by
one restricted unpickler, the only one in this project: it admits tensors, containers and plain data, and
refuses every other global, so a file that smuggles a callable (an object whose ``__reduce__`` calls
``os.system``, say) fails before anything in it runs. Besides this project's own checkpoints it reads:

* the FAT authors' training checkpoints, which hold a pickled yacs ``CfgNode`` (rebuilt as a plain ``dict``;
  yacs is never imported);
* the LVT authors' timm-trainer checkpoints, which hold an ``argparse.Namespace`` of the training arguments
  (rebuilt as a plain ``dict``);
* with ``extra_globals``, what a caller admits in addition: the OpenMMLab glue admits the logging state of
  MMEngine's Runner checkpoints (``openmmlab.checkpoints``).

Loading (``load_weights``): one path from a checkpoint to a model for every caller (timm's ``pretrained``,
the trainer's ``MODEL.PRETRAINED``, resume and evaluation, the ONNX export, the detection and segmentation
backbone), with an explicit policy for the classifier. Of a training checkpoint that holds both trained and EMA
weights, it takes those the checkpoint calls best (``best_weights``, the one place that decides) unless told
which, and logs which it took.
"""
import _compat_pickle
import json
import logging
import os
import pickle
import types
from typing import Any, Collection, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import _weights_only_unpickler, nn

__all__ = ['CheckpointError', 'EMA_KEYS', 'HEAD_POLICIES', 'MODEL_KEYS', 'UnsafeCheckpointError', 'best_weights',
           'check_state_dict_fits', 'classifier_keys', 'higher_scoring', 'load_checkpoint_file', 'load_weights',
           'timm_overlay', 'unwrap_state_dict', 'weight_entries']

_logger = logging.getLogger(__name__)

HEAD_POLICIES = ('keep', 'drop', 'fail')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint references code this project refuses to load."""


class _ConfigNode(dict):
    """Stands in for yacs' CfgNode while unpickling: its items, nothing else."""

    def __setstate__(self, state):
        # CfgNode pickles its bookkeeping flags (__immutable__, ...) as instance state: drop them
        pass


class _Namespace(dict):
    """Stands in for argparse's Namespace while unpickling: its attributes, as items."""

    def __setstate__(self, state):
        self.update(state)


# what torch's own ``weights_only`` unpickler admits (tensors, dtypes, devices, containers: torch's maintained list),
# and the stand-ins for the records that the authors' checkpoints carry
_ALLOWED_GLOBALS = {
    **{tuple(name.rsplit('.', 1)): obj for name, obj in _weights_only_unpickler._get_allowed_globals().items()},
    ('builtins', 'frozenset'): frozenset,
    ('yacs.config', 'CfgNode'): _ConfigNode,
    ('argparse', 'Namespace'): _Namespace,
}


def _restricted_pickle_module(extra_globals: Mapping[Tuple[str, str], Any]) -> types.SimpleNamespace:
    allowed = {**_ALLOWED_GLOBALS, **extra_globals}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            # pickle protocols 0-2 name modules as Python 2 did (``__builtin__``)
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            try:
                return allowed[(module, name)]
            except KeyError:
                raise UnsafeCheckpointError(
                    f"refusing to load '{module}.{name}': the checkpoint references code, and only tensors, "
                    'containers and plain data are accepted') from None

    # torch.load unpickles with ``pickle_module.Unpickler`` (resolving its own storage types first)
    return types.SimpleNamespace(Unpickler=RestrictedUnpickler, load=None, __name__='restricted_pickle')


def _to_plain(obj: Any) -> Any:
    """``obj`` with the stand-ins for yacs configs and argparse namespaces turned into plain dicts."""
    if isinstance(obj, (_ConfigNode, _Namespace)):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _to_plain(value)
    elif isinstance(obj, list):
        obj[:] = [_to_plain(value) for value in obj]
    elif type(obj) is tuple:
        return tuple(_to_plain(value) for value in obj)
    return obj


def load_checkpoint_file(path: Union[str, os.PathLike], map_location: Any = 'cpu',
                         extra_globals: Optional[Mapping[Tuple[str, str], Any]] = None) -> Any:
    """Read a checkpoint file (.pth / .pt / .bin or .safetensors) as tensors and plain data, or a folder of weights
    published the timm way (``classification.publish``: ``model.safetensors`` and ``config.json``) as
    ``{'model': weights, 'classes': label names, 'pretrained_cfg': ..., 'architecture': ...}``.

    Args:
        path: the file, or the folder.
        map_location: as for ``torch.load``.
        extra_globals: ``{(module, name): object}`` admitted in addition to tensors, containers and plain data;
            ``object`` is what the name resolves to while unpickling (a stand-in that checks its arguments, say).

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file references code (a class or function outside the admitted ones).
        CheckpointError: the file is not a readable checkpoint.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_published_folder(path, map_location)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        import safetensors.torch
        try:
            return safetensors.torch.load_file(path, device=str(map_location or 'cpu'))
        except Exception as error:
            raise CheckpointError(f'{path} is not a readable safetensors file: {error}') from error
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False,
                                pickle_module=_restricted_pickle_module(extra_globals or {}))
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(f'{path}: {error}') from None
    except Exception as error:
        raise CheckpointError(f'{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})') \
            from error
    return _to_plain(checkpoint)


def _load_published_folder(path: str, map_location: Any) -> Dict[str, Any]:
    files = {name: os.path.join(path, name) for name in ('config.json', 'model.safetensors')}
    missing = [name for name, file in files.items() if not os.path.isfile(file)]
    if missing:
        raise FileNotFoundError(f'{path} is a folder without {" and ".join(missing)}: not weights published the '
                                'timm way (python -m classification.publish writes them)')
    try:
        with open(files['config.json']) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f'{files["config.json"]} is not readable JSON: {error}') from None
    return dict(model=load_checkpoint_file(files['model.safetensors'], map_location),
                classes=config.get('label_names'), pretrained_cfg=config.get('pretrained_cfg', {}),
                architecture=config.get('architecture'))


MODEL_KEYS = ('model', 'state_dict')  # the trained weights: this trainer's and the FAT authors' / timm trainer's
EMA_KEYS = ('model_ema', 'state_dict_ema')  # their exponential moving average, where the run kept one


def _entry(checkpoint: Mapping[str, Any], keys: Sequence[str]) -> Optional[str]:
    return next((key for key in keys if isinstance(checkpoint.get(key), Mapping)), None)


def weight_entries(checkpoint: Any) -> Tuple[Optional[str], Optional[str]]:
    """The entries of a training checkpoint that hold the trained weights and their EMA, ``(model, ema)``;
    ``(None, None)`` for a plain state dict, ``ema`` None when the run kept no EMA."""
    if not isinstance(checkpoint, Mapping):
        return None, None
    return _entry(checkpoint, MODEL_KEYS), _entry(checkpoint, EMA_KEYS)


def higher_scoring(scores: Mapping[str, float], model: str = 'model', ema: str = 'model_ema') -> str:
    """Of the trained weights and their EMA, the entry whose validation score is higher; the trained weights on a
    tie or when ``scores`` has no EMA score."""
    return ema if ema in scores and scores[ema] > scores[model] else model


def best_weights(checkpoint: Any) -> Tuple[Optional[str], str]:
    """Which weights a checkpoint calls best, and why: ``(entry, reason)``, ``entry`` None for a plain state dict.
    The one place this is decided, so that every loader takes the same weights.

    * this trainer's checkpoints record the validation accuracy of both (``scores``): the higher wins, the
      trained weights on a tie (its older checkpoints recorded the winner of a best epoch, ``best``);
    * a timm trainer's (the LVT authors'): its ``state_dict_ema`` when it kept one, since that trainer ranks its
      checkpoints by the EMA's accuracy (and timm's own loader takes it);
    * otherwise the trained weights: nothing says that an EMA beside them scored higher.
    """
    model, ema = weight_entries(checkpoint)
    if model is None and ema is None:
        return None, 'a state dict'
    if ema is None:
        return model, f'the trained weights, {model!r} (no EMA weights beside them)'
    if model is None:
        return ema, f'the EMA weights, {ema!r} (the only weights)'
    scores = checkpoint.get('scores')
    if isinstance(scores, Mapping) and isinstance(scores.get(ema), (int, float)) \
            and isinstance(scores.get(model), (int, float)):
        winner = higher_scoring(scores, model, ema)
        loser = ema if winner == model else model
        metric = scores.get('metric', 'acc1')
        return winner, (f'{"the EMA weights" if winner == ema else "the trained weights"}, {winner!r}: {metric} '
                        f'{scores[winner]:.2f} against {scores[loser]:.2f} for {loser!r} at epoch '
                        f'{scores.get("epoch", "?")}')
    best = checkpoint.get('best')
    if isinstance(best, Mapping) and best.get('weights') in ('ema', 'model'):
        winner = ema if best['weights'] == 'ema' else model
        return winner, (f'{"the EMA weights" if winner == ema else "the trained weights"}, {winner!r}, which won '
                        f'{best.get("metric", "acc1")} {best.get("value", float("nan")):.2f} at epoch '
                        f'{best.get("epoch", "?")}')
    if ema == 'state_dict_ema':
        return ema, f"the EMA weights, {ema!r}: a timm trainer ranks its checkpoints by its EMA's accuracy"
    return model, f'the trained weights, {model!r} (nothing records that the EMA, {ema!r}, scored higher)'


def unwrap_state_dict(checkpoint: Mapping[str, Any], key: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The model weights of a checkpoint: its ``key`` entry if given, else those it calls best (``best_weights``)
    if it is a training checkpoint, else itself; a DistributedDataParallel ``module.`` prefix is removed.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'expected a checkpoint dict, got {type(checkpoint).__name__}')
    if key is None:
        key, _ = best_weights(checkpoint)
    if key is not None:
        if not isinstance(checkpoint.get(key), Mapping):
            raise CheckpointError(f'the checkpoint has no {key!r} weights (it has: {", ".join(map(str, checkpoint))})')
        checkpoint = checkpoint[key]
    state_dict = {}
    for name, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f'not a state dict: entry {name!r} is a {type(value).__name__}, not a tensor')
        state_dict[name[len('module.'):] if name.startswith('module.') else name] = value
    return state_dict


def classifier_keys(model: nn.Module) -> Tuple[str, ...]:
    """The state-dict keys of the classifier(s) that ``model.pretrained_cfg['classifier']`` names (FAT's
    ``head.fc``; LVT-cls's ``head`` and ``aux_head``), whether or not the model has them now."""
    names = getattr(model, 'pretrained_cfg', {}).get('classifier') or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f'{name}.{param}' for name in names for param in ('weight', 'bias'))


def check_state_dict_fits(state_dict: Mapping[str, torch.Tensor], model: nn.Module):
    """Raise CheckpointError naming the first mismatch if ``state_dict`` is not of ``model``'s architecture.
    The classifier is not compared: another number of classes is a policy question, not another model."""
    expected = model.state_dict()
    classifier = set(classifier_keys(model))
    body = [k for k in expected if k not in classifier]
    missing = [k for k in body if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and k not in classifier]
    mismatched = [k for k in body if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        details = []
        if mismatched:
            k = mismatched[0]
            details.append(f'{len(mismatched)} shape mismatches, first {k}: checkpoint '
                           f'{tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}')
        if missing:
            details.append(f'{len(missing)} missing keys, first {missing[0]}')
        if unexpected:
            details.append(f'{len(unexpected)} unexpected keys, first {unexpected[0]}')
        name = getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
        raise CheckpointError(f'checkpoint does not fit {name} (is it of another variant?): ' + '; '.join(details))


def load_weights(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, Any]], head: str,
                 key: Optional[str] = None, ignore_keys: Collection[str] = (),
                 logger: Optional[logging.Logger] = None, name: Optional[str] = None) -> nn.Module:
    """Load a checkpoint's weights into ``model``, strictly, and log which weights it took.

    Args:
        model: a model of this project (its ``remap_checkpoint`` maps the authors' key names onto its own) or
            any other timm model.
        checkpoint: a file in any format ``load_checkpoint_file`` reads, or its content already read.
        head: what happens to the classifier (``classifier_keys``):

            * ``'keep'``: the model takes the checkpoint's classifier, resized to its number of classes;
            * ``'drop'``: the checkpoint's classifier is loaded when it fits the model's and dropped otherwise
              (the model keeps its own, freshly initialised one, or none);
            * ``'fail'``: a classifier that does not fit the model's is an error.
        key: the entry that holds the weights (``'model_ema'``, say); by default the weights the checkpoint
            calls best (``best_weights``), or the checkpoint itself when it is a state dict.
        ignore_keys: keys of the model's full architecture that this model no longer has (what
            ``prune_intermediate_layers`` removed); the checkpoint's weights for them are skipped.
        logger: where the line saying which weights were taken goes (this module's logger by default).
        name: how messages name a checkpoint given already read (its file, say); a file is named by its path.

    Raises:
        CheckpointError: the checkpoint is of another architecture, or its classifier does not fit (``'fail'``).
    """
    if head not in HEAD_POLICIES:
        raise ValueError(f'head must be one of {HEAD_POLICIES}, got {head!r}')
    source = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else name
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_checkpoint_file(source)
    try:
        if key is None:
            key, taken = best_weights(checkpoint)
        else:
            taken = f'its {key!r} weights'
        state_dict = unwrap_state_dict(checkpoint, key)
        remap = getattr(model, 'remap_checkpoint', None)
        if remap is not None:
            state_dict = remap(state_dict)
        state_dict = {k: v for k, v in state_dict.items() if k not in ignore_keys}
        check_state_dict_fits(state_dict, model)
        classifier = _apply_head_policy(state_dict, model, head)
    except CheckpointError as error:
        raise CheckpointError(f'{source}: {error}' if source else str(error)) from None
    model.load_state_dict(state_dict)
    (logger or _logger).info('loaded %s%s%s', f'{source}: ' if source else '', taken,
                             f'; {classifier}' if classifier else '')
    return model


def _apply_head_policy(state_dict: Dict[str, torch.Tensor], model: nn.Module, head: str) -> Optional[str]:
    """Apply ``head`` to a checkpoint's classifier; what was done when it did not fit the model's."""
    expected = model.state_dict()
    keys = [k for k in classifier_keys(model) if k in state_dict or k in expected]
    fits = all(k in state_dict and k in expected and state_dict[k].shape == expected[k].shape for k in keys)
    if fits:
        return None
    theirs = state_dict.get(keys[0]).shape[0] if keys and keys[0] in state_dict else 0
    ours = expected[keys[0]].shape[0] if keys and keys[0] in expected else 0
    if head == 'fail':
        raise CheckpointError(f'the checkpoint classifies {theirs} classes, the model {ours}')
    if head == 'keep':
        model.reset_classifier(theirs)
        return f'the model now classifies the checkpoint\'s {theirs} classes'
    # 'drop': the model's own classifier, if it has one, stays
    for k in keys:
        state_dict.pop(k, None)
    state_dict.update({k: expected[k] for k in keys if k in expected})
    return f"the checkpoint's classifier ({theirs} classes) does not fit the model's ({ours}): the model keeps its own"


def timm_overlay(pretrained_cfg_overlay: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """timm's ``pretrained_cfg_overlay`` for a model of this project: a checkpoint ``file`` loads through the
    model's ``load_pretrained`` (``load_weights``), not through timm's own loader, unless ``custom_load`` is given.
    timm's own loader would take other weights than every other loader of this project: the EMA weights whenever a
    checkpoint has some, whichever scored higher; no classifier unless it has 1000 classes, even one that fits the
    model; and none of the FAT authors' checkpoints (it refuses their pickled config)."""
    if pretrained_cfg_overlay is None or not pretrained_cfg_overlay.get('file') \
            or 'custom_load' in pretrained_cfg_overlay:
        return pretrained_cfg_overlay
    return dict(pretrained_cfg_overlay, custom_load=True)
