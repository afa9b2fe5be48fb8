"""The fat-vit distribution: the repository's packages under one import name, ``fat_vit``.

A checkout runs its folders as top-level packages (``python -m classification.train``, ``import classification``):
``make setup`` installs only the pinned dependencies (requirements.txt) for that. ``pip install .`` installs them as
``fat_vit.classification``, ``fat_vit.openmmlab``, ``fat_vit.detection``, ``fat_vit.segmentation`` and
``fat_vit.kernels``, so that nothing generic lands on the user's path (``kernels`` is also Hugging Face's package):
the build copies each module under ``fat_vit/`` and points its imports of the other packages there
(``nest_imports``), writes ``fat_vit/__init__.py`` (the version; importing it registers the models with timm), and
copies ``configs/`` to ``fat_vit/configs/`` with the OpenMMLab configs' ``custom_imports`` pointed there too
(``nest_custom_imports``). The commands are entry points (``fat-train``, ``fat-det-train``, ...). An editable install
cannot do that rewriting, so it is refused with directions.
"""
import ast
import os
import re
import textwrap
from pathlib import Path
from typing import List, Tuple

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop
from setuptools.command.editable_wheel import editable_wheel

ROOT = Path(__file__).parent
VERSION = '0.1.0'
DISTRIBUTION_PACKAGE = 'fat_vit'
PROJECT_PACKAGES = ('classification', 'openmmlab', 'detection', 'segmentation', 'kernels')
# name: module:function, each command the README teaches
ENTRY_POINTS = {
    'fat-train': 'classification.train:main',
    'fat-eval': 'classification.train:evaluate_main',
    'fat-predict': 'classification.predict:main',
    'fat-publish': 'classification.publish:main',
    'fat-visualize': 'classification.visualize:main',
    'fat-export': 'classification.export:main',
    'fat-benchmark': 'classification.benchmark:main',
    'fat-pack-dataset': 'classification.pack_dataset:main',
    'fat-model-table': 'classification.model_table:main',
    'fat-trainer-benchmark': 'classification.trainer_benchmark:main',
    'fat-det-train': 'detection.train:main',
    'fat-det-test': 'detection.test:main',
    'fat-seg-train': 'segmentation.train:main',
    'fat-seg-test': 'segmentation.test:main',
}
PACKAGE_INIT = textwrap.fill(
    '"""FAT and LVT: the models (registered with timm on import), their ImageNet trainer, exporter and benchmark, and '
    'their detection and segmentation backbones for MMDetection and MMSegmentation. Commands: '
    f'{", ".join(ENTRY_POINTS)}; configs under fat_vit/configs/."""', width=117, break_on_hyphens=False) + f'''
__version__ = {VERSION!r}

from . import classification  # noqa: F401,E402  (registers the models with timm)
'''


def _inserted(lines: List[str], edits: List[Tuple[int, int, str]]) -> str:
    """``lines`` joined, with each ``(line index, column, text)`` of ``edits`` inserted."""
    for index, column, text in sorted(edits, reverse=True):
        lines[index] = lines[index][:column] + text + lines[index][column:]
    return ''.join(lines)


def nest_imports(source: str, filename: str) -> str:
    """``source`` with its absolute imports of the project's packages pointed into ``fat_vit``:
    ``from classification.x import y`` becomes ``from fat_vit.classification.x import y`` and ``import openmmlab``
    becomes ``from fat_vit import openmmlab`` (the same name bound). Any other form of such an import (``import a.b``,
    several modules in one statement) is refused, since it cannot be rewritten to bind the same names."""
    lines = source.splitlines(keepends=True)
    edits = []  # (line index, column, text inserted there)
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split('.')[0] in PROJECT_PACKAGES:
            keyword = re.compile(r'from\s+').match(lines[node.lineno - 1], node.col_offset)
            edits.append((node.lineno - 1, keyword.end(), f'{DISTRIBUTION_PACKAGE}.'))
        elif isinstance(node, ast.Import) and any(a.name.split('.')[0] in PROJECT_PACKAGES for a in node.names):
            if len(node.names) > 1 or '.' in node.names[0].name:
                raise SystemExit(f'{filename}:{node.lineno}: write this import of the project\'s packages as '
                                 '`from PACKAGE.MODULE import NAME` or `import PACKAGE`, alone on its statement')
            edits.append((node.lineno - 1, node.col_offset, f'from {DISTRIBUTION_PACKAGE} '))
    return _inserted(lines, edits)


def nest_custom_imports(source: str, filename: str) -> str:
    """An MMEngine config ``source`` with the project's packages in its ``custom_imports`` pointed into ``fat_vit``:
    ``custom_imports = dict(imports=['detection'])`` becomes ``imports=['fat_vit.detection']``."""
    lines = source.splitlines(keepends=True)
    edits = []
    for node in ast.parse(source, filename).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == 'custom_imports'
                                                for t in node.targets):
            for constant in ast.walk(node.value):
                if isinstance(constant, ast.Constant) and isinstance(constant.value, str) and \
                        constant.value.split('.')[0] in PROJECT_PACKAGES:
                    edits.append((constant.lineno - 1, constant.col_offset + 1, f'{DISTRIBUTION_PACKAGE}.'))
    return _inserted(lines, edits)


class BuildPy(build_py):
    """Copies the modules under ``fat_vit/`` with their imports of one another pointed there, writes
    ``fat_vit/__init__.py`` and copies the configs to ``fat_vit/configs/``."""

    def build_module(self, module, module_file, package):
        outfile, copied = super().build_module(module, module_file, package)
        path = Path(outfile)
        path.write_text(nest_imports(path.read_text(), module_file))
        return outfile, copied

    def run(self):
        super().run()
        package = Path(self.build_lib) / DISTRIBUTION_PACKAGE
        (package / '__init__.py').write_text(PACKAGE_INIT)
        for source in sorted((ROOT / 'configs').rglob('*')):
            if source.suffix not in ('.py', '.yaml'):
                continue
            target = package / source.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            text = source.read_text()
            target.write_text(nest_custom_imports(text, str(source)) if source.suffix == '.py' else text)


class NoEditableInstall(editable_wheel):
    def run(self):
        raise SystemExit(
            'fat-vit has no editable install: its code imports the repository\'s folders as top-level packages, as a '
            'checkout runs them, and an installed copy lives under fat_vit. Work in the checkout (`make setup` '
            'installs the dependencies, then python -m classification.train ... from its root), or `pip install .` '
            'to use fat_vit.classification etc. from elsewhere.')


class NoDevelop(develop):
    run = NoEditableInstall.run


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
        f'{DISTRIBUTION_PACKAGE}.kernels._dwconv_cuda', sources,
        extra_compile_args={'cxx': ['-O3'], 'nvcc': ['-O3']},
        depends=['kernels/csrc/depthwise_conv.h', 'kernels/csrc/depthwise_conv_kernels.cuh'],
    )
    return [extension], {'build_ext': BuildExtension}


ext_modules, cmdclass = cuda_extensions()

# Ranges of what the code needs; requirements.txt pins the versions tested. torch 2.6 (torchvision 0.21) brought
# torch.compiler.is_exporting (every FAT and LVT forward) and torch.nn.utils.get_total_norm (the trainer), after
# torch.library's register_fake / register_kernel / register_autograd (kernels/ops.py, 2.4). timm 1.0.31: the suite
# fails on each earlier release tried (1.0.16, 1.0.17, 1.0.25, 1.0.26, 1.0.28, 1.0.30). 1.0.31 brought
# update_summary's writing summary.csv's header by itself and onnx_export's asking torch for the TorchScript exporter
# (dynamo=False, no longer torch's default from 2.9); 1.0.26 a pretrained-file loader that unpickles weights only
# (1.0.25 runs the code that a checkpoint given as pretrained_cfg_overlay carries); 1.0.17
# timm.layers.register_notrace_module. Pillow 13 rejects posterize(bits=0), which timm's RandAugment of the recipe
# (rand-...-inc1) produces. The OpenMMLab stack and the runtimes start at the versions tested: MMDetection 3.3 and
# MMSegmentation 1.2 take mmcv 2.0-2.1.
setup(
    name='fat-vit',
    version=VERSION,
    description='FAT (Lightweight Vision Transformer with Bidirectional Interaction) and LVT (Lite Vision '
                'Transformer): models, ImageNet training, COCO detection and ADE20K segmentation, deployment',
    long_description=(ROOT / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    package_dir={DISTRIBUTION_PACKAGE: '.'},
    packages=[f'{DISTRIBUTION_PACKAGE}.{name}' for name in find_packages(include=[
        f'{package}{suffix}' for package in PROJECT_PACKAGES for suffix in ('', '.*')])],
    install_requires=['torch>=2.6', 'torchvision>=0.21', 'timm>=1.0.31,<2', 'numpy', 'pillow<13', 'pyyaml',
                      'yacs>=0.1.8', 'safetensors', 'fvcore', 'tqdm', 'tensorboard'],
    extras_require={
        'detection': ['mmcv>=2.0,<2.2', 'mmengine>=0.10.7,<1', 'mmdet>=3.3,<4', 'pycocotools'],
        'segmentation': ['mmcv>=2.0,<2.2', 'mmengine>=0.10.7,<1', 'mmsegmentation>=1.2.2,<2', 'ftfy', 'regex'],
        # the readers of timm's dataset factory for WebDataset shards and Hugging Face datasets (README, Data layouts)
        'data': ['webdataset>=1.0', 'datasets>=3'],
        'deploy': ['onnx>=1.23', 'onnxscript>=0.7', 'onnxruntime>=1.31', 'openvino>=2026.4', 'executorch>=1.5',
                   'nncf>=3.4', 'timmx>=0.10.1', 'onnxslim'],
        # the benchmark's plot and visualize's colour maps
        'plots': ['matplotlib'],
    },
    entry_points={'console_scripts': [f'{name} = {DISTRIBUTION_PACKAGE}.{target}'
                                      for name, target in ENTRY_POINTS.items()]},
    ext_modules=ext_modules,
    cmdclass={**cmdclass, 'build_py': BuildPy, 'editable_wheel': NoEditableInstall, 'develop': NoDevelop},
)
