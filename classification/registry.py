"""Every model this repository registers with timm, with the figures its paper publishes, and the peers of the
FAT paper's comparisons: the one list that the model table, the benchmark, the trainer's config, the ONNX
export and the detection / segmentation backbone read.

Adding a model: define and ``@register_model`` it in its family's file (``fat.py``, ``lvt.py``), then add its
entry here.
"""
from typing import Dict, NamedTuple, Optional, Tuple

__all__ = ['MODELS', 'PEERS', 'ModelEntry', 'PaperFigures', 'Peer', 'compared_models', 'counterpart', 'model_names',
           'published_top1']


class PaperFigures(NamedTuple):
    params_m: float
    gflops: float
    top1: float  # ImageNet-1K top-1 (%), 224x224
    gpu_throughput: Optional[float] = None  # img/s, the FAT paper's GPU throughput comparison


class ModelEntry(NamedTuple):
    name: str
    family: str  # the module of classification/ that defines it
    paper: Optional[PaperFigures] = None
    published: bool = True  # False: never released, its layout inferred from the paper
    counterpart: Optional[str] = None  # for another family's model: the FAT model it is compared with
    token_labelling: bool = False  # has per-token predictions to train with token labelling


class Peer(NamedTuple):
    """A timm model the FAT paper compares with."""
    top1: float  # ImageNet-1K top-1 (%) published by the model's own paper
    counterpart: str  # the model of this repository of similar accuracy it is compared with


def _entries(*entries: ModelEntry) -> Dict[str, ModelEntry]:
    return {entry.name: entry for entry in entries}


MODELS = _entries(
    # FAT, Table 1 of its paper (ImageNet-1K, 224x224) and its GPU throughput comparison
    ModelEntry('fat_b0', 'fat', PaperFigures(4.5, 0.7, 77.6, gpu_throughput=1932)),
    ModelEntry('fat_b1', 'fat', PaperFigures(7.8, 1.2, 80.1)),
    ModelEntry('fat_b2', 'fat', PaperFigures(13.5, 2.0, 81.9, gpu_throughput=1064)),
    ModelEntry('fat_b3', 'fat', PaperFigures(29.0, 4.4, 83.6)),
    ModelEntry('fat_b3_st', 'fat', PaperFigures(29.0, 4.7, 83.0), published=False),
    ModelEntry('fat_b4', 'fat', PaperFigures(52.0, 9.3, 84.8), published=False),
    ModelEntry('fat_b5', 'fat', PaperFigures(88.0, 15.1, 85.2), published=False),
    # LVT: the backbone with a pooled classifier, and the paper's ImageNet model (its Table 1, and the FAT paper's
    # GPU throughput comparison)
    ModelEntry('lvt', 'lvt'),
    ModelEntry('lvt_cls', 'lvt', PaperFigures(5.5, 0.9, 74.8, gpu_throughput=1265), counterpart='fat_b0',
               token_labelling=True),
)

PEERS = {
    'mobilevit_xs': Peer(74.8, 'fat_b0'),
    'edgenext_x_small': Peer(75.0, 'fat_b0'),
    'edgenext_small': Peer(79.4, 'fat_b1'),
    'efficientnet_b1': Peer(79.1, 'fat_b1'),
    'pvt_v2_b1': Peer(78.7, 'fat_b1'),
    'efficientnet_b3': Peer(81.6, 'fat_b2'),
    'swin_tiny_patch4_window7_224': Peer(81.3, 'fat_b3'),
    'convnext_small': Peer(83.1, 'fat_b3'),
}


def model_names(family: Optional[str] = None, published_only: bool = False) -> Tuple[str, ...]:
    """The registered models, of one family if given, only those released by their authors if asked."""
    return tuple(name for name, entry in MODELS.items()
                 if (family is None or entry.family == family) and (entry.published or not published_only))


def compared_models() -> Tuple[str, ...]:
    """The models of this repository in its papers' comparisons: released, with published figures."""
    return tuple(name for name, entry in MODELS.items() if entry.published and entry.paper)


def counterpart(name: str) -> Optional[str]:
    """The FAT model that a model of another family or a peer is compared with (None for FAT's own)."""
    if name in MODELS:
        return MODELS[name].counterpart
    return PEERS[name].counterpart if name in PEERS else None


def published_top1(name: str) -> Optional[float]:
    """The ImageNet-1K top-1 its paper publishes for a model of this repository or a peer (None if none)."""
    if name in MODELS:
        return MODELS[name].paper.top1 if MODELS[name].paper else None
    return PEERS[name].top1 if name in PEERS else None
