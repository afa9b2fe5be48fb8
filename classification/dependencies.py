"""The optional dependency stacks and what installs each: a missing one is named with its make target (in the
checkout) and its pip extra (installed as a package), never left to an ImportError from deep inside.

``make setup`` installs classification's core (requirements.txt); ``make setup-extras`` the deployment runtimes,
dataset readers and test tools (requirements-extras.txt); ``make setup-dense`` the OpenMMLab stack
(requirements-dense.txt) that detection and segmentation run on.
"""
import importlib
import os
import sys
from types import ModuleType

__all__ = ['MissingDependency', 'refuse_second_copy', 'require']

# what a stack's packages serve: (the make target that installs them in the checkout, the pip command for an
# installed fat-vit)
STACKS = {
    'detection': ('make setup-dense', 'pip install "fat-vit[detection]"'),
    'segmentation': ('make setup-dense', 'pip install "fat-vit[segmentation]"'),
    'openmmlab': ('make setup-dense', 'pip install "fat-vit[detection]" or "fat-vit[segmentation]"'),
    'deploy': ('make setup-extras', 'pip install "fat-vit[deploy]"'),
    'data': ('make setup-extras', 'pip install "fat-vit[data]"'),
    'plots': ('make setup-extras', 'pip install "fat-vit[plots]"'),
}
# the packages whose command lines end with one line, not a traceback, when their stack is missing
_ENTRY_POINT_PACKAGES = ('detection', 'segmentation')


class MissingDependency(ImportError):
    """A package of an optional stack is not installed (or does not import)."""


def _running_an_entry_point() -> bool:
    """Whether this process was started as one of the detection or segmentation commands (``python -m``, from the
    checkout or installed under ``fat_vit``, or an installed entry point), whose packages import the stack while
    Python finds the command."""
    argv = getattr(sys, 'orig_argv', [])
    if len(argv) > 1 and os.path.basename(argv[1]).startswith(('fat-det-', 'fat-seg-')):  # an installed entry point
        return True
    if '-m' not in argv[:-1]:
        return False
    package = argv[argv.index('-m') + 1].rpartition('.')[0]
    return package.rpartition('.')[2] in _ENTRY_POINT_PACKAGES


def require(module: str, stack: str, purpose: str) -> ModuleType:
    """Import ``module``, a package of ``stack`` that ``purpose`` needs. Where it is missing: MissingDependency naming
    what installs the stack, or, in a detection or segmentation command, an exit with that one line."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        target, pip = STACKS[stack]
        message = (f'{purpose} needs {module}, which does not import ({error}): `{target}` installs it in the '
                   f'checkout\'s environment (installed as a package: {pip})')
        if _running_an_entry_point():
            raise SystemExit(f'error: {message}') from None
        raise MissingDependency(message, name=module) from error


def refuse_second_copy(registry: str, name: str, registered_by: str, this_copy: str):
    """Raise ImportError: ``name`` is in ``registry`` already, from the module ``registered_by``, where this
    project's module ``this_copy`` would register it: two copies of the project (the checkout's packages and the
    installed ``fat_vit``) in one process."""
    where = getattr(sys.modules.get(registered_by), '__file__', None)
    raise ImportError(f'{this_copy} would register {name} in {registry}, which has it already from {registered_by}'
                      f'{f" ({where})" if where else ""}: two copies of this project in one process. Import one: '
                      'the checkout\'s packages (classification, detection, segmentation) or the installed fat_vit.')
