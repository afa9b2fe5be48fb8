"""Image classification: importing this package registers the FAT and LVT models with timm."""
from .fat import FAT
from .lvt import LVT, LVTCls

__all__ = ['FAT', 'LVT', 'LVTCls']
