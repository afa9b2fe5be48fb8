"""Install with `make setup` (see README): mmcv must be compiled against the pinned torch first."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def pinned(*names):
    """The requirement lines of requirements.txt for these packages: the pins live there only."""
    lines = [line.strip() for line in (ROOT / 'requirements.txt').read_text().splitlines()]
    requirements = {}
    for line in lines:
        if line and not line.startswith('#'):
            name = line.split(';')[0]
            for separator in '=<>!~[':
                name = name.split(separator)[0]
            requirements[name.strip().lower()] = line
    return [requirements[name] for name in names]


setup(
    name='fat-vit',
    version='0.1.0',
    description='FAT (Lightweight Vision Transformer with Bidirectional Interaction): models, ImageNet training, '
                'COCO detection and ADE20K segmentation',
    long_description=(ROOT / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['classification', 'classification.*', 'detection', 'detection.*',
                                    'segmentation', 'segmentation.*', 'kernels', 'kernels.*']),
    install_requires=pinned('torch', 'torchvision', 'timm', 'yacs', 'safetensors', 'fvcore'),
    extras_require={
        'detection': pinned('mmcv', 'mmengine', 'mmdet', 'pycocotools'),
        'segmentation': pinned('mmcv', 'mmengine', 'mmsegmentation', 'ftfy', 'regex'),
    },
)
