"""Every model this repository registers with timm, with the figures its paper publishes, and the peers of the
FAT paper's comparisons: the one list that the model table, the benchmark, the trainer's config, the ONNX
export and the detection / segmentation backbone read.

Adding a model: define and ``@register_model`` it in its family's file (``fat.py``, ``lvt.py``), then add its
entry here.
"""
from typing import Dict, NamedTuple, Optional, Tuple

__all__ = ['ABLATIONS', 'MODELS', 'PEERS', 'AblationRow', 'ModelEntry', 'PaperFigures', 'Peer', 'compared_models',
           'counterpart', 'model_names', 'paper_gpu_throughput', 'published_top1']


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
    ablation: bool = False  # a row of the FAT paper's ablation study (see ABLATIONS)


class AblationRow(NamedTuple):
    """A row of the FAT paper's ablation tables (FAT-B0 frame, ImageNet-1K 300 epochs; the first table also
    COCO Mask R-CNN 1x and ADE20K Semantic FPN)."""
    group: str
    row: str
    model: str
    params_m: float
    gflops: float  # the paper's count, without the attention matrix products
    top1: float
    box_ap: Optional[float] = None
    mask_ap: Optional[float] = None
    miou: Optional[float] = None
    deviation: Optional[str] = None  # why our reading cannot match the paper's params / FLOPs to its rounding


class Peer(NamedTuple):
    """A timm model that FAT is compared with: in the FAT paper's comparisons, or a CPU-first model."""
    top1: float  # ImageNet-1K top-1 (%) published by the model's own authors, for the weights timm ships by default
    counterpart: str  # the model of this repository of similar accuracy it is compared with
    gpu_throughput: Optional[float] = None  # img/s, the FAT paper's GPU throughput comparison
    cpu_first: bool = False  # a model designed or chosen for CPU inference, not in the FAT paper


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

_INTERACTION = 'interaction of the two branches'
_DOWNSAMPLING = 'key/value downsampling'
_POSITION = 'position encoding'
_MIXER = 'token mixer in place of FASA'
_DENSE_REDUCTION = ("timm's {} reduces keys and values by a dense conv of kernel = stride = the ratio; at FAT's window "
                    "schedule (8, 4, 2, 1) these convs hold {} M, where the paper's figure leaves room for a reduction "
                    "with almost no parameters (such as pooling)")
_POSITION_TERMS = ("FAT's frame with plain attention holds 4.34 M; {} (0.02 M) bring it to 4.36 M, 0.01 M above what "
                   "rounds to 4.3 (without the frame's CPE, 4.26 M)")
ABLATIONS = (
    AblationRow(_INTERACTION, 'add+linear', 'fat_b0_add', 4.5, 0.72, 76.2, 39.0, 35.8, 39.6),
    AblationRow(_INTERACTION, 'cat+linear', 'fat_b0_cat', 4.8, 0.77, 76.6, 39.6, 36.3, 40.2),
    AblationRow(_INTERACTION, 'mul+linear', 'fat_b0_mul', 4.5, 0.72, 77.1, 40.3, 37.1, 40.9),
    AblationRow(_INTERACTION, 'interaction (FAT)', 'fat_b0', 4.5, 0.72, 77.6, 40.8, 37.7, 41.5),
    AblationRow(_DOWNSAMPLING, 'pool down', 'fat_b0_pool_down', 4.4, 0.71, 77.2, 40.2, 36.9, 40.6),
    AblationRow(_DOWNSAMPLING, 'conv w/o overlap', 'fat_b0_conv_down', 4.4, 0.71, 77.2, 40.3, 36.9, 40.8),
    AblationRow(_DOWNSAMPLING, 'conv w/ overlap', 'fat_b0_overlap_down', 4.5, 0.71, 77.3, 40.5, 37.3, 40.9),
    AblationRow(_DOWNSAMPLING, 'refined down (FAT)', 'fat_b0', 4.5, 0.72, 77.6, 40.8, 37.7, 41.5),
    AblationRow(_POSITION, 'w/o conv. pos', 'fat_b0_no_cpe', 4.4, 0.70, 77.4, 40.5, 37.3, 41.2),
    AblationRow(_POSITION, 'conv. pos (FAT)', 'fat_b0', 4.5, 0.72, 77.6, 40.8, 37.7, 41.5),
    AblationRow(_MIXER, 'Max-SA', 'fat_b0_maxsa', 4.3, 0.8, 75.7,
                deviation=_POSITION_TERMS.format("MaxViT's relative position bias tables")),
    AblationRow(_MIXER, 'WSA / S-WSA', 'fat_b0_swin', 4.3, 0.8, 76.1,
                deviation=_POSITION_TERMS.format("Swin's relative position bias tables")),
    AblationRow(_MIXER, 'SRA', 'fat_b0_sra', 4.4, 0.7, 76.2,
                deviation=_DENSE_REDUCTION.format('PVT-v2 SRA (every block)', '0.95')),
    AblationRow(_MIXER, 'LSA / GSA', 'fat_b0_twins', 4.3, 0.7, 76.6,
                deviation=_DENSE_REDUCTION.format('Twins GSA (every other block)', '0.48')),
    AblationRow(_MIXER, 'CSWSA', 'fat_b0_cswin', 4.3, 0.8, 76.8,
                deviation=_POSITION_TERMS.format("CSWin's LePE convs")),
    AblationRow(_MIXER, 'FASA', 'fat_b0', 4.5, 0.7, 77.6),
)
MODELS.update(_entries(*(ModelEntry(row.model, 'fat', ablation=True) for row in ABLATIONS if row.model not in MODELS)))

PEERS = {
    'mobilevit_xs': Peer(74.8, 'fat_b0', gpu_throughput=1367),
    'edgenext_x_small': Peer(75.0, 'fat_b0'),
    'edgenext_small': Peer(79.4, 'fat_b1'),
    'efficientnet_b1': Peer(79.1, 'fat_b1'),
    'pvt_v2_b1': Peer(78.7, 'fat_b1'),
    'efficientnet_b3': Peer(81.6, 'fat_b2', gpu_throughput=624),
    'swin_tiny_patch4_window7_224': Peer(81.3, 'fat_b3'),
    'convnext_small': Peer(83.1, 'fat_b3'),
    # the CPU-first models at FAT-B0's and FAT-B1's accuracy; top-1 from the authors' README or paper, for timm's
    # default weights of each: CPUBone's README (the Xeon / ONNX Runtime models), RepViT's README (distilled, 300
    # epochs), FastViT's README (without distillation, at 256), EfficientFormerV2's paper (distilled), MobileNetV4's
    # paper (MNv4-Conv-M)
    'cpubone_b0_bfrobust': Peer(77.6, 'fat_b0', cpu_first=True),
    'cpubone_b1_bfrobust': Peer(78.7, 'fat_b0', cpu_first=True),
    'repvit_m0_9': Peer(78.7, 'fat_b0', cpu_first=True),
    'repvit_m1_0': Peer(80.0, 'fat_b1', cpu_first=True),
    'fastvit_t8': Peer(76.2, 'fat_b0', cpu_first=True),
    'fastvit_t12': Peer(79.3, 'fat_b1', cpu_first=True),
    'efficientformerv2_s0': Peer(75.7, 'fat_b0', cpu_first=True),
    'efficientformerv2_s1': Peer(79.0, 'fat_b1', cpu_first=True),
    'mobilenetv4_conv_medium': Peer(79.9, 'fat_b1', cpu_first=True),
}


def model_names(family: Optional[str] = None, published_only: bool = False, ablations: bool = False) -> Tuple[str, ...]:
    """The registered models, of one family if given, only those released by their authors if asked, the ablation
    study's models only if asked."""
    return tuple(name for name, entry in MODELS.items()
                 if (family is None or entry.family == family) and (entry.published or not published_only)
                 and (ablations or not entry.ablation))


def compared_models() -> Tuple[str, ...]:
    """The models of this repository in its papers' comparisons: released, with published figures."""
    return tuple(name for name, entry in MODELS.items() if entry.published and entry.paper)


def counterpart(name: str) -> Optional[str]:
    """The FAT model that a model of another family or a peer is compared with (None for FAT's own)."""
    if name in MODELS:
        return MODELS[name].counterpart
    return PEERS[name].counterpart if name in PEERS else None


def paper_gpu_throughput(name: str) -> Optional[float]:
    """The img/s of the FAT paper's GPU throughput comparison for a model of this repository or a peer (None if
    the comparison leaves it out)."""
    if name in MODELS:
        return MODELS[name].paper.gpu_throughput if MODELS[name].paper else None
    return PEERS[name].gpu_throughput if name in PEERS else None


def published_top1(name: str) -> Optional[float]:
    """The ImageNet-1K top-1 its paper publishes for a model of this repository or a peer (None if none)."""
    if name in MODELS:
        return MODELS[name].paper.top1 if MODELS[name].paper else None
    return PEERS[name].top1 if name in PEERS else None
