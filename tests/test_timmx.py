"""timm's maintained exporter, timmx, over our registered models as it calls every timm model: by name, built in
training mode, fused with ``timm.utils.reparameterize_model`` before ``eval()`` (which FAT's fusion once refused),
with a checkpoint read by timm's own loader, static at one 64-pixel image. The full models in ONNX and OpenVINO; in
ExecuTorch, whose lowering grows with the graph, the shallow ones (conftest.SHALLOW_MODELS, every module type) of
the ablation model and of LVT, whose lowering is tested here only. FAT-B0's is lowered twice elsewhere, which a third
lowering here would repeat: our bounded dynamic program, checked against PyTorch (tests/test_deploy.py), and timmx's
ExecuTorch exporter by name from the training form, quantized (tests/test_int8.py). Then the export command's formats
that timmx writes for it (``export.TIMMX_FORMATS``)."""
import re

import pytest
import timm
import torch

from classification import export
from conftest import build_shallow_by_name, randomize_norms, skip_without_runtime

timmx = pytest.importorskip('timmx', reason='timmx is not installed (make setup-extras)')

pytestmark = pytest.mark.slow  # each test exports a model


@pytest.mark.parametrize('name, fmt', [(name, fmt) for name in ('fat_b0', 'fat_b0_cat', 'lvt_cls')
                                         for fmt in export.FORMATS if (name, fmt) != ('fat_b0', 'executorch')])
def test_timmx_exports_the_model_by_name_and_its_runtime_agrees_with_pytorch(name, fmt, tmp_path, monkeypatch):
    skip_without_runtime(fmt)
    if fmt == 'executorch':
        build_shallow_by_name(monkeypatch, [name])
    model = randomize_norms(timm.create_model(name))  # statistics that a forgotten fusion would show
    checkpoint = tmp_path / f'{name}.pth'
    torch.save(model.state_dict(), checkpoint)
    # timmx writes OpenVINO weights in fp16 by default; the comparison below holds float32 to float rounding
    options = dict(fp16=False) if fmt == 'openvino' else {}
    output = timmx.export_model(fmt, name, checkpoint=checkpoint, input_size=(3, 64, 64),
                                output=tmp_path / f'{name}{export.FORMATS[fmt]}', **options)
    errors = export.verify(model, output, fmt, [(1, 3, 64, 64)])
    assert max(errors) <= 1e-4, errors


def test_export_command_through_timmx_with_the_projects_loader(tmp_path, capsys, shallow_fat_b0):
    """torch.export (any batch, checked here within 1e-4) from a checkpoint of another classifier, written twice
    to one path, and Core ML (converted; its runtime needs macOS), each leaving only its output. The command is under
    test: FAT-B0 at conftest.SHALLOW_FAT_B0_DEPTHS (the full models are exported above)."""
    torch.manual_seed(0)
    checkpoint = tmp_path / 'fat_b0_3_classes.pth'  # the trainer's layout, which timm's own loader would not map
    torch.save(dict(model=randomize_norms(timm.create_model('fat_b0', num_classes=3)).state_dict(),
                    classes=['a', 'b', 'c']), checkpoint)
    out = tmp_path / 'out'
    program = out / 'fat_b0.pt2'
    for _ in range(2):
        export.main(['--model', 'fat_b0', '--checkpoint', str(checkpoint), '--format', 'torch-export', '--output',
                     str(program), '--img-size', '64'])
        printed = capsys.readouterr().out
        assert re.search(rf'wrote {program} \(fat_b0, torch-export through timmx [\d.]+, inference form, 64x64 '
                         r'images, any batch\)', printed), printed
        errors = [float(line.rsplit(' ', 1)[1]) for line in printed.splitlines() if 'relative error' in line]
        assert len(errors) == 2 and max(errors) <= 1e-4
    assert torch.export.load(str(program)).module()(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    package = out / 'fat_b0.mlpackage'
    export.main(['--model', 'fat_b0', '--checkpoint', str(checkpoint), '--format', 'coreml', '--output', str(package),
                 '--img-size', '64'])
    assert f'wrote {package} (fat_b0, coreml through timmx' in capsys.readouterr().out
    assert (package / 'Manifest.json').is_file()
    assert sorted(path.name for path in out.iterdir()) == ['fat_b0.mlpackage', 'fat_b0.pt2']
