"""Install with `make setup` (see README): mmcv must be compiled against the pinned torch first."""
import os
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


def cuda_extensions():
    """The extension modules and build_ext command of kernels/: the CUDA depthwise convolution, built when
    FORCE_CUDA=1 (no GPU needed, only the CUDA toolkit) or when a toolkit and a GPU are both present."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if os.environ.get('FORCE_CUDA') == '1':
            raise
        return [], {}
    if not (os.environ.get('FORCE_CUDA') == '1' or (CUDA_HOME is not None and torch.cuda.is_available())):
        return [], {}
    os.environ.setdefault('TORCH_CUDA_ARCH_LIST', '8.0;9.0+PTX')  # A100 and H100 / H200, PTX for newer GPUs
    sources = ['kernels/csrc/depthwise_conv_ops.cpp', 'kernels/csrc/depthwise_conv_kernels.cu']
    extension = CUDAExtension(
        'kernels._dwconv_cuda', sources,
        extra_compile_args={'cxx': ['-O3'], 'nvcc': ['-O3']},
        depends=['kernels/csrc/depthwise_conv.h', 'kernels/csrc/depthwise_conv_kernels.cuh'],
    )
    return [extension], {'build_ext': BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name='fat-vit',
    version='0.1.0',
    description='FAT (Lightweight Vision Transformer with Bidirectional Interaction) and LVT (Lite Vision '
                'Transformer): models, ImageNet training, COCO detection and ADE20K segmentation',
    long_description=(ROOT / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['classification', 'classification.*', 'openmmlab', 'openmmlab.*', 'detection',
                                    'detection.*', 'segmentation', 'segmentation.*', 'kernels', 'kernels.*']),
    install_requires=pinned('torch', 'torchvision', 'timm', 'pillow', 'yacs', 'tlt', 'safetensors', 'fvcore', 'tqdm',
                            'tensorboard'),
    extras_require={
        'detection': pinned('mmcv', 'mmengine', 'mmdet', 'pycocotools'),
        'segmentation': pinned('mmcv', 'mmengine', 'mmsegmentation', 'ftfy', 'regex'),
        'onnx': pinned('onnx', 'onnxscript', 'onnxruntime'),
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
