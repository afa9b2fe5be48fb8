"""FAT image classification: importing this package registers the FAT models with timm."""
from .fat import FAT
