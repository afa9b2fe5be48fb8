"""The models of ``classification`` as OpenMMLab backbones: their stride 4, 8, 16, 32 pyramids.

One wrapper serves MMDetection and MMSegmentation (``detection`` and ``segmentation`` register it in their model
registries) and every model family of this repository. It wraps the classification model itself (no second
implementation) and reads checkpoints through ``classification.checkpoint_io``: this project's trainer
checkpoints, plain state dicts, the authors' checkpoints and the backbones of detectors and segmentors, never
unpickling anything but tensors and plain data.

FAT's backbone is, by default, the authors' dense-prediction backbone (their segmentation code): the pyramid taken
inside the stride-2 blocks (``FAT(pyramid='dense')``) and a GroupNorm(1, C) on each returned feature.
"""
import copy
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
from mmcv.cnn import build_norm_layer
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from classification.checkpoint_io import CheckpointError, load_weights, unwrap_state_dict
from classification.fat import FAT, PYRAMIDS
from classification.lvt import LVT
from classification.registry import model_names

from .checkpoints import dense_prediction_backbone, load_from_local_restricted

__all__ = ['BACKBONES', 'BackboneConfigError', 'FATBackbone', 'LVTBackbone', 'PretrainedCheckpointError',
           'PyramidBackbone']


class BackboneConfigError(ValueError):
    """A backbone argument of the config that this wrapper cannot use."""


class PretrainedCheckpointError(CheckpointError):
    """The pretrained checkpoint holds no weights of this backbone's model."""


class PyramidBackbone(BaseModule):
    """The pyramid features of a model of this repository, for dense prediction.

    A subclass names the family (``family``, the registry's) and the class that builds a layout given as a dict
    (``model_class``).

    Args:
        arch: a registered model of the family (``'fat_b0'``, ...), or a dict of ``model_class`` arguments for
            another layout.
        out_indices: stages whose outputs are returned: 0, 1, 2, 3 are strides 4, 8, 16, 32. Stages after the
            last one are dropped, as are the classifier and the final norm.
        frozen_stages: -1 trains everything; 0 freezes the stem (if the model has one); n >= 1 also stages
            0 ... n-1 and their output norms ``norm0`` ... ``norm{n-1}``, as MMDetection's Swin does (parameters
            fixed, in eval mode); for FAT's dense pyramid these are the authors' stages, each ending with the
            stride-2 block that follows it.
        norm_eval: keep every BatchNorm in eval mode while training, i.e. its running statistics fixed.
        drop_path_rate: stochastic depth, linear in block order up to this rate; None keeps the registered
            model's rate (0 for a layout given as a dict).
        norm_cfg: a norm layer (MMCV config, e.g. ``dict(type='GN', num_groups=1)``) on each returned feature:
            ``norm{i}`` for level i, as in OpenMMLab's own backbones; None adds none.
        init_cfg: None (random initialisation) or ``dict(type='Pretrained', checkpoint=PATH)``: a checkpoint of
            the same model in any format ``classification`` reads (an ImageNet checkpoint, whose lack of output norms
            leaves them freshly initialised), or a detector's or segmentor's checkpoint (MMEngine's or MMCV 1.x's),
            whose backbone weights, output norms included, are taken.
        model_kwargs: further arguments of the model (a subclass's options, such as FAT's ``pyramid``).
    """
    family: str
    model_class: type

    def __init__(
            self,
            arch: Union[str, Dict],
            out_indices: Sequence[int] = (0, 1, 2, 3),
            frozen_stages: int = -1,
            norm_eval: bool = False,
            drop_path_rate: Optional[float] = None,
            norm_cfg: Optional[Dict] = None,
            init_cfg: Optional[Dict] = None,
            model_kwargs: Optional[Dict] = None,
    ):
        kind = type(self).__name__
        if init_cfg is not None and (not isinstance(init_cfg, dict) or init_cfg.get('type') != 'Pretrained'
                                     or not init_cfg.get('checkpoint')):
            raise BackboneConfigError(f"{kind}: init_cfg must be None or dict(type='Pretrained', checkpoint=PATH), "
                                      f'got {init_cfg}')
        super().__init__(init_cfg=init_cfg)
        self.arch = copy.deepcopy(arch)
        self.model = self._create_model(arch, drop_path_rate, model_kwargs or {})

        num_stages = len(self.model.stages)
        out_indices = tuple(out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or not all(
                0 <= i < num_stages for i in out_indices):
            raise BackboneConfigError(f'{kind}: out_indices must be increasing stage indices in 0..{num_stages - 1}, '
                                      f'got {out_indices}')
        if not -1 <= frozen_stages <= num_stages:
            raise BackboneConfigError(f'{kind}: frozen_stages must be in -1..{num_stages}, got {frozen_stages}')
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.out_channels = [self.model.feature_info[i]['num_chs'] for i in out_indices]
        full_keys = set(self.model.state_dict())
        self.model.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
        # the pretrained checkpoint's weights of what was pruned are skipped; every other weight must fit
        self._pruned_keys = full_keys - set(self.model.state_dict())
        self.norm_names = [] if norm_cfg is None else [f'norm{i}' for i in out_indices]
        for name, channels in zip(self.norm_names, self.out_channels):
            self.add_module(name, build_norm_layer(norm_cfg, channels)[1])
        self._freeze_stages()

    def _create_model(self, arch: Union[str, Dict], drop_path_rate: Optional[float], model_kwargs: Dict) -> nn.Module:
        kwargs = dict(num_classes=0, **model_kwargs)
        if drop_path_rate is not None:
            kwargs['drop_path_rate'] = drop_path_rate
        if isinstance(arch, str):
            names = model_names(self.family, ablations=True)
            if arch not in names:
                raise BackboneConfigError(
                    f"{type(self).__name__}: unknown arch {arch!r}: use one of {', '.join(names)}, or a dict of "
                    f'{self.model_class.__name__} arguments')
            return timm.create_model(arch, **kwargs)
        return self.model_class(**dict(arch), **kwargs)

    def _frozen_modules(self) -> List[nn.Module]:
        stem = [self.model.stem] if hasattr(self.model, 'stem') else []
        return stem + list(self.model.stages[:self.frozen_stages])

    def _frozen_output_norms(self) -> List[nn.Module]:
        return [getattr(self, f'norm{i}') for i in range(self.frozen_stages) if f'norm{i}' in self.norm_names]

    def _freeze_stages(self):
        if self.frozen_stages < 0:
            return
        for module in self._frozen_modules() + self._frozen_output_norms():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'PyramidBackbone':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def init_weights(self):
        logger = MMLogger.get_current_instance()
        if self.init_cfg is None:
            logger.warning(f'{type(self).__name__} {self.arch}: no pretrained checkpoint (init_cfg is None), '
                           'training starts from random weights')
            return
        path = self.init_cfg['checkpoint']
        try:
            model_weights, norm_weights = self._split_checkpoint(load_from_local_restricted(path), path)
            load_weights(self.model, model_weights, head='drop', ignore_keys=self._pruned_keys, logger=logger,
                         name=path)
            self._load_norms(norm_weights)
        except CheckpointError as error:
            raise PretrainedCheckpointError(
                f'pretrained checkpoint {path} does not fit the {type(self).__name__} {self.arch}: {error}') from None
        logger.info(f'{type(self).__name__} {self.arch}: loaded pretrained weights from {path} (without the '
                    'classifier, the final norm and any stage after out_indices, which the backbone drops)')
        fresh = [name for name in self.norm_names if not any(k.startswith(name + '.') for k in norm_weights)]
        if fresh:
            logger.info(f'{type(self).__name__} {self.arch}: the output norms {", ".join(fresh)} start freshly '
                        f'initialised: {path} has no weights for them (an ImageNet checkpoint has none)')
        unused = sorted({k.split('.')[0] for k in norm_weights} - set(self.norm_names))
        if unused:
            logger.warning(f'{type(self).__name__} {self.arch}: {path} holds output norms {", ".join(unused)}, which '
                           f'this backbone does not have (norm_cfg, out_indices): they are not used')
        self._is_init = True

    def _split_checkpoint(self, checkpoint: Any, path: str) -> Tuple[Any, Dict[str, torch.Tensor]]:
        """The model's weights and the output norms' (``norm{i}.*``) of a checkpoint. A classification checkpoint is
        returned whole as the model's, for the loader to pick its weights. A checkpoint of this wrapper has what it
        records of itself checked (``_check_record``)."""
        state_dict = dense_prediction_backbone(checkpoint)
        if state_dict is None:
            state_dict = unwrap_state_dict(checkpoint)
            if not any(_WRAPPER_KEY.match(k) for k in state_dict):
                return checkpoint, {}
        state_dict = dict(state_dict)
        if _PYRAMID_KEY in state_dict:
            self._check_record(state_dict.pop(_PYRAMID_KEY), path)
        state_dict = self._rename_own_layout(state_dict)
        norm_weights = {k: v for k, v in state_dict.items() if _OUTPUT_NORM_KEY.match(k)}
        return {k: v for k, v in state_dict.items() if k not in norm_weights}, norm_weights

    def _load_norms(self, norm_weights: Mapping[str, torch.Tensor]):
        for name in self.norm_names:
            weights = {k[len(name) + 1:]: v for k, v in norm_weights.items() if k.startswith(name + '.')}
            if weights:
                try:
                    getattr(self, name).load_state_dict(weights)
                except RuntimeError as error:
                    raise CheckpointError(f'output norm {name}: {error}') from None

    def _rename_own_layout(self, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The keys of this wrapper's state dict (``model.*``, ``norm{i}.*``, or a former layout) as those of its
        model and its output norms; other keys (the authors' layouts) pass unchanged."""
        renamed = {self._present_key(key): value for key, value in state_dict.items()}
        return {k[len('model.'):] if k.startswith('model.') else k: v for k, v in renamed.items()}

    def _present_key(self, key: str) -> str:
        """A key of this wrapper's state dict as it was saved by former versions, as it is now."""
        for former, present in self._former_prefixes():
            if key.startswith(former):
                return present + key[len(former):]
        return key

    def _former_prefixes(self) -> List[Tuple[str, str]]:
        # the norm of the j-th returned feature was ``out_norms.j``
        return [(f'out_norms.{position}.', f'{name}.') for position, name in enumerate(self.norm_names)]

    def _check_record(self, record: Any, path: str):
        """Raise if what a checkpoint of this wrapper records of itself does not fit it."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            present = prefix + self._present_key(key[len(prefix):])
            if present != key:
                state_dict[present] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = self.model.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
        if self.norm_names:
            features = [getattr(self, name)(feature) for name, feature in zip(self.norm_names, features)]
        return tuple(features)


# the buffer in which FATBackbone records its pyramid, and the codes it saves
_PYRAMID_KEY = 'pyramid_code'
_PYRAMID_CODES = {'stages': 1, 'dense': 2}
_PYRAMID_OF_CODE = {code: pyramid for pyramid, code in _PYRAMID_CODES.items()}
# the output norms' keys of this wrapper and of the FAT authors' segmentation backbone
_OUTPUT_NORM_KEY = re.compile(r'^norm\d+\.')
# the keys of a state dict of this wrapper, or of the FAT authors' segmentation backbone, that no model has
_WRAPPER_KEY = re.compile(r'^(model|norm\d+|out_norms|fat)\.')


class FATBackbone(PyramidBackbone):
    """FAT's pyramid (see ``PyramidBackbone``); ``arch`` a FAT model or a dict of ``FAT`` arguments.

    By default it is the authors' dense-prediction backbone: ``pyramid='dense'`` (``FAT``'s taps of their
    segmentation code) and a GroupNorm(1, C) on each feature. Their segmentation backbone's weights (``patch_embed.*``,
    ``layers.*``, ``norm0.*`` ...), plain or inside their MMSegmentation 0.x segmentor's checkpoint, load as
    ``init_cfg``; so do ImageNet checkpoints, leaving the output norms freshly initialised.
    """
    family = 'fat'
    model_class = FAT

    def __init__(
            self,
            arch: Union[str, Dict],
            out_indices: Sequence[int] = (0, 1, 2, 3),
            frozen_stages: int = -1,
            norm_eval: bool = False,
            drop_path_rate: Optional[float] = None,
            pyramid: str = 'dense',
            norm_cfg: Optional[Dict] = dict(type='GN', num_groups=1),
            init_cfg: Optional[Dict] = None,
    ):
        if pyramid not in PYRAMIDS:
            raise BackboneConfigError(f"FATBackbone: pyramid must be one of {', '.join(PYRAMIDS)}, got {pyramid!r}")
        super().__init__(arch, out_indices, frozen_stages, norm_eval, drop_path_rate, norm_cfg, init_cfg,
                         model_kwargs=dict(pyramid=pyramid))
        self.register_buffer(_PYRAMID_KEY, torch.tensor(_PYRAMID_CODES[pyramid]))

    def _frozen_modules(self) -> List[nn.Module]:
        if self.model.pyramid != 'dense':
            return super()._frozen_modules()
        # the authors' stage i: our stage i's blocks and the stride-2 block that opens our stage i + 1
        stages = self.model.stages
        modules = [self.model.stem]
        for i in range(min(self.frozen_stages, len(stages))):
            modules.append(stages[i].blocks)
            if i + 1 < len(stages):
                modules.append(stages[i + 1].downsample)
        return modules

    def _former_prefixes(self) -> List[Tuple[str, str]]:
        # detectors and segmentors saved before the wrapper served other models held it as ``backbone.fat``
        return super()._former_prefixes() + [('fat.', 'model.')]

    # The pyramid is saved with the weights (a buffer, so that whatever walks a state dict finds tensors only): the
    # two take their features at other places and the default changed (stage pyramid, then the authors' dense one),
    # while MMEngine's load_from and --resume load non-strictly.

    def _check_record(self, record: Any, path: str):
        saved = _PYRAMID_OF_CODE.get(int(record)) if torch.is_tensor(record) and record.numel() == 1 else None
        if saved != self.model.pyramid:
            raise BackboneConfigError(
                f"{path} holds a FAT backbone trained with pyramid={saved!r}; this config's has pyramid="
                f"{self.model.pyramid!r}, whose features are taken elsewhere: set model.backbone.pyramid={saved!r} "
                'to use it, or start from ImageNet weights')

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + _PYRAMID_KEY
        if key in state_dict:
            self._check_record(state_dict[key], 'the checkpoint')
        else:
            MMLogger.get_current_instance().warning(
                'FATBackbone: the checkpoint records no pyramid (saved before it was recorded): its weights are '
                f"loaded as pyramid={self.model.pyramid!r}, this config's; if it was trained with the other pyramid, "
                'its features are taken elsewhere')
            state_dict[key] = self.get_buffer(_PYRAMID_KEY).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LVTBackbone(PyramidBackbone):
    """LVT's pyramid (see ``PyramidBackbone``); ``arch`` 'lvt' or 'lvt_cls' (their ImageNet checkpoints, or the
    authors' downstream backbone files, load alike) or a dict of ``LVT`` arguments."""
    family = 'lvt'
    model_class = LVT


# the backbones and the type names under which ``detection`` and ``segmentation`` register them
BACKBONES = {'FAT': FATBackbone, 'LVT': LVTBackbone}
