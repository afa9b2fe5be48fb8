"""What a command says when the optional stack it needs is missing: the make target (and the pip extra) that installs
it, in one line, not an ImportError from deep inside. Runs without the optional stacks themselves."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from classification import export
from classification.dependencies import MissingDependency, require
from conftest import REPO_ROOT


def without(tmp_path: Path, package: str) -> dict:
    """An environment in which ``package`` fails to import as a broken install does (its compiled part missing)."""
    (tmp_path / package).mkdir()
    (tmp_path / package / '__init__.py').write_text("raise ImportError(\"No module named 'mmcv._ext'\")\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT)]))


# the train and test commands of a task import the same package first: one of each task
@pytest.mark.slow  # a process of its own
@pytest.mark.parametrize('command, package, what', [('detection.train', 'mmdet', 'Detection'),
                                                    ('segmentation.test', 'mmseg', 'Segmentation')])
def test_a_dense_command_without_its_stack_names_the_make_target(tmp_path, command, package, what):
    result = subprocess.run([sys.executable, '-m', command, 'config.py'], cwd=REPO_ROOT, capture_output=True,
                            text=True, env=without(tmp_path, package), timeout=300)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {what} needs {package}.registry, which does not import (No module named 'mmcv._ext'): "
        f"`make setup-dense` installs it in the checkout's environment (installed as a package: pip install "
        f"\"fat-vit[{what.lower()}]\")"]


def test_importing_a_missing_stack_raises_an_import_error_naming_the_make_target(monkeypatch):
    monkeypatch.setitem(sys.modules, 'mmengine', None)  # importing it fails, as where it is not installed
    with pytest.raises(MissingDependency, match=r'needs mmengine, which does not import .*`make setup-dense`') as error:
        require('mmengine', 'openmmlab', 'Detection and segmentation')
    assert isinstance(error.value, ImportError) and error.value.name == 'mmengine'


def test_an_export_without_its_runtime_names_the_make_target(monkeypatch):
    monkeypatch.setitem(sys.modules, 'openvino', None)
    with pytest.raises(export.RuntimeMissing, match=r'--format openvino needs openvino, which does not import .*'
                                                    r'`make setup-extras` .*pip install "fat-vit\[deploy\]"'):
        export.require('openvino')


def test_an_int8_export_without_nncf_names_the_make_target(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'nncf', None)
    with pytest.raises(SystemExit):
        export.main(['--model', 'fat_b0', '--format', 'openvino', '--output', 'x.xml', '--int8', '--calibration-data',
                     '.'])
    assert re.search(r'--int8 needs nncf, which does not import .*`make setup-extras` .*'
                     r'pip install "fat-vit\[deploy\]"', capsys.readouterr().err)


def test_a_timmx_format_without_its_converter_names_what_installs_it(monkeypatch, capsys):
    pytest.importorskip('timmx', reason='timmx is not installed (make setup-extras)')
    monkeypatch.setitem(sys.modules, 'coremltools', None)
    with pytest.raises(SystemExit):
        export.main(['--model', 'fat_b0', '--format', 'coreml', '--output', 'x.mlpackage'])
    assert "error: --format coreml needs coremltools, which timmx converts with: pip install 'timmx[coreml]'" in \
        capsys.readouterr().err
