"""The models of ``classification`` as OpenMMLab backbones: their stride 4, 8, 16, 32 pyramids.

One wrapper serves MMDetection and MMSegmentation (``detection`` and ``segmentation`` register it in their model
registries) and every model family of this repository. It wraps the classification model itself (no second
implementation) and reads ImageNet checkpoints through ``classification.checkpoint_io``: this project's trainer
checkpoints, plain state dicts and the authors' checkpoints, never unpickling anything but tensors and plain data.
"""
import copy
from typing import Dict, Optional, Sequence, Tuple, Union

import timm
import torch
from mmcv.cnn import build_norm_layer
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from classification.checkpoint_io import CheckpointError, load_weights
from classification.fat import FAT
from classification.lvt import LVT
from classification.registry import model_names

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
            0 ... n-1 (parameters fixed, in eval mode).
        norm_eval: keep every BatchNorm in eval mode while training, i.e. its running statistics fixed.
        drop_path_rate: stochastic depth, linear in block order up to this rate; None keeps the registered
            model's rate (0 for a layout given as a dict).
        norm_cfg: a norm layer (MMCV config, e.g. ``dict(type='GN', num_groups=1)``) added on each returned
            feature, freshly initialised; None adds none.
        init_cfg: None (random initialisation) or ``dict(type='Pretrained', checkpoint=PATH)``, an ImageNet
            checkpoint of the same model in any format ``classification`` reads.
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
    ):
        kind = type(self).__name__
        if init_cfg is not None and (not isinstance(init_cfg, dict) or init_cfg.get('type') != 'Pretrained'
                                     or not init_cfg.get('checkpoint')):
            raise BackboneConfigError(f"{kind}: init_cfg must be None or dict(type='Pretrained', checkpoint=PATH), "
                                      f'got {init_cfg}')
        super().__init__(init_cfg=init_cfg)
        self.arch = copy.deepcopy(arch)
        self.model = self._create_model(arch, drop_path_rate)

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
        self.out_norms = None if norm_cfg is None else nn.ModuleList(
            build_norm_layer(norm_cfg, channels)[1] for channels in self.out_channels)
        self._freeze_stages()

    def _create_model(self, arch: Union[str, Dict], drop_path_rate: Optional[float]) -> nn.Module:
        kwargs = dict(num_classes=0)
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

    def _freeze_stages(self):
        if self.frozen_stages < 0:
            return
        stem = [self.model.stem] if hasattr(self.model, 'stem') else []
        for module in stem + list(self.model.stages[:self.frozen_stages]):
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
            load_weights(self.model, path, head='drop', ignore_keys=self._pruned_keys, logger=logger)
        except CheckpointError as error:
            raise PretrainedCheckpointError(
                f'pretrained checkpoint {path} does not fit the {type(self).__name__} {self.arch}: {error}') from None
        logger.info(f'{type(self).__name__} {self.arch}: loaded pretrained weights from {path} (without the '
                    'classifier, the final norm and any stage after out_indices, which the backbone drops)')
        self._is_init = True

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = self.model.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
        if self.out_norms is not None:
            features = [norm(feature) for norm, feature in zip(self.out_norms, features)]
        return tuple(features)


class FATBackbone(PyramidBackbone):
    """FAT's pyramid (see ``PyramidBackbone``); ``arch`` a FAT model or a dict of ``FAT`` arguments."""
    family = 'fat'
    model_class = FAT

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # detectors and segmentors saved before the wrapper served other models held it as ``backbone.fat``
        legacy = prefix + 'fat.'
        for key in [k for k in state_dict if k.startswith(legacy)]:
            state_dict[prefix + 'model.' + key[len(legacy):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LVTBackbone(PyramidBackbone):
    """LVT's pyramid (see ``PyramidBackbone``); ``arch`` 'lvt' or 'lvt_cls' (their ImageNet checkpoints, or the
    authors' downstream backbone files, load alike) or a dict of ``LVT`` arguments."""
    family = 'lvt'
    model_class = LVT


# the backbones and the type names under which ``detection`` and ``segmentation`` register them
BACKBONES = {'FAT': FATBackbone, 'LVT': LVTBackbone}
