"""FAT as an OpenMMLab backbone: the classification model's stride 4, 8, 16, 32 pyramid.

One class serves MMDetection and MMSegmentation; ``detection`` and ``segmentation`` register it as ``FAT`` in
their model registries. It wraps the model of ``classification.fat`` (no second implementation) and reads
ImageNet checkpoints through ``classification.checkpoint_io``: this project's trainer checkpoints, plain state
dicts and the authors' training checkpoints, never unpickling anything but tensors and plain data.
"""
import copy
from typing import Dict, Optional, Sequence, Tuple, Union

import timm
import torch
from mmcv.cnn import build_norm_layer
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmengine.runner.checkpoint import load_state_dict
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from classification.checkpoint_io import CheckpointError, load_checkpoint_file, unwrap_state_dict
from classification.fat import FAT, checkpoint_filter_fn

__all__ = ['FATBackbone', 'PretrainedCheckpointError']


class PretrainedCheckpointError(ValueError):
    """The pretrained checkpoint holds no weights of this backbone's FAT variant."""


def _fat_variants() -> Sequence[str]:
    """The FAT variants registered with timm: fat_b0 ... fat_b5."""
    return timm.list_models(module='fat')


def _create_fat(arch: Union[str, Dict], drop_path_rate: Optional[float]) -> FAT:
    """A FAT without classifier: a registered variant by name, or a layout given as FAT's arguments."""
    kwargs = dict(num_classes=0)
    if drop_path_rate is not None:
        kwargs['drop_path_rate'] = drop_path_rate
    if isinstance(arch, str):
        if arch not in _fat_variants():
            raise ValueError(f"unknown FAT arch {arch!r}: use one of {', '.join(_fat_variants())}, "
                             'or a dict of FAT arguments (embed_dims, depths, num_heads, ...)')
        return timm.create_model(arch, **kwargs)
    return FAT(**dict(arch), **kwargs)


class FATBackbone(BaseModule):
    """FAT's pyramid features for dense prediction.

    Args:
        arch: a FAT variant (``'fat_b0'`` ... ``'fat_b5'``), or a dict of ``classification.fat.FAT``
            arguments for another layout (``embed_dims``, ``depths``, ``num_heads``, ...).
        out_indices: stages whose outputs are returned: 0, 1, 2, 3 are strides 4, 8, 16, 32. Stages after the
            last one are dropped, as are the classifier and the final norm.
        frozen_stages: -1 trains everything; 0 freezes the stem; n >= 1 the stem and stages 0 ... n-1
            (parameters fixed, in eval mode).
        norm_eval: keep every BatchNorm in eval mode while training, i.e. its running statistics fixed.
        drop_path_rate: stochastic depth, linear in block order up to this rate; None keeps the variant's
            ImageNet rate (0 for a layout given as a dict).
        norm_cfg: a norm layer (MMCV config, e.g. ``dict(type='GN', num_groups=1)``) added on each returned
            feature, freshly initialised; None adds none.
        init_cfg: None (random initialisation) or ``dict(type='Pretrained', checkpoint=PATH)``, an ImageNet
            checkpoint of the same variant in any format ``classification`` reads.
    """

    def __init__(
            self,
            arch: Union[str, Dict] = 'fat_b0',
            out_indices: Sequence[int] = (0, 1, 2, 3),
            frozen_stages: int = -1,
            norm_eval: bool = False,
            drop_path_rate: Optional[float] = None,
            norm_cfg: Optional[Dict] = None,
            init_cfg: Optional[Dict] = None,
    ):
        if init_cfg is not None and (not isinstance(init_cfg, dict) or init_cfg.get('type') != 'Pretrained'
                                     or not init_cfg.get('checkpoint')):
            raise ValueError(f"FAT backbone: init_cfg must be None or dict(type='Pretrained', checkpoint=PATH), "
                             f'got {init_cfg}')
        super().__init__(init_cfg=init_cfg)
        self.arch = copy.deepcopy(arch)
        self.fat = _create_fat(arch, drop_path_rate)

        num_stages = len(self.fat.stages)
        out_indices = tuple(out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or not all(
                0 <= i < num_stages for i in out_indices):
            raise ValueError(f'FAT backbone: out_indices must be increasing stage indices in 0..{num_stages - 1}, '
                             f'got {out_indices}')
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'FAT backbone: frozen_stages must be in -1..{num_stages}, got {frozen_stages}')
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.out_channels = [self.fat.feature_info[i]['num_chs'] for i in out_indices]
        self.fat.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
        self.out_norms = None if norm_cfg is None else nn.ModuleList(
            build_norm_layer(norm_cfg, channels)[1] for channels in self.out_channels)
        self._freeze_stages()

    def _freeze_stages(self):
        if self.frozen_stages < 0:
            return
        for module in [self.fat.stem, *self.fat.stages[:self.frozen_stages]]:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'FATBackbone':
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
            logger.warning(f'FAT backbone {self.arch}: no pretrained checkpoint (init_cfg is None), '
                           'training starts from random weights')
            return
        path = self.init_cfg['checkpoint']
        try:
            state_dict = unwrap_state_dict(load_checkpoint_file(path))
            # the key names are mapped onto the whole model, then loaded into the pruned one
            state_dict = checkpoint_filter_fn(state_dict, _create_fat(self.arch, drop_path_rate=None))
        except CheckpointError as error:
            raise PretrainedCheckpointError(
                f'pretrained checkpoint {path} does not fit the FAT backbone {self.arch}: {error}') from None
        logger.info(f'FAT backbone {self.arch}: loading pretrained weights from {path} (the weights of what the '
                    'backbone drops, the classifier, the final norm and any stage after out_indices, are '
                    'reported as unexpected keys)')
        load_state_dict(self.fat, state_dict, strict=False, logger=logger)
        self._is_init = True

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = self.fat.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
        if self.out_norms is not None:
            features = [norm(feature) for norm, feature in zip(self.out_norms, features)]
        return tuple(features)
