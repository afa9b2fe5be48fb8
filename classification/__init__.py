"""Image classification: importing this package registers the FAT and LVT models with timm.

One copy of this project per process: the checkout's packages (``classification``) or the installed ones
(``fat_vit.classification``). Importing the second is refused, naming the first, where timm would silently take the
models of whichever came last.
"""
import timm

from .dependencies import refuse_second_copy

if timm.is_model('fat_b0'):
    refuse_second_copy('timm', 'fat_b0', timm.models.model_entrypoint('fat_b0').__module__, f'{__name__}.fat')

from .fat import FAT  # noqa: E402  (after the check for another copy)
from .lvt import LVT, LVTCls  # noqa: E402

__all__ = ['FAT', 'LVT', 'LVTCls']
