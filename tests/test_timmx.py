"""timm's maintained exporter, timmx, over our registered models as it calls every timm model: by name, built in
training mode, fused with ``timm.utils.reparameterize_model`` before ``eval()`` (which FAT's fusion once refused),
with a checkpoint read by timm's own loader. The full models, static at one 64-pixel image: ExecuTorch's lowering of
the ablation model and of LVT is tested here only (tests/test_deploy.py lowers FAT-B0's bounded dynamic program)."""
import pytest
import timm
import torch

from classification import export
from conftest import randomize_norms, skip_without_runtime

timmx = pytest.importorskip('timmx', reason='timmx is not installed (make setup-extras)')

pytestmark = pytest.mark.slow  # each test exports a full model


@pytest.mark.parametrize('fmt', tuple(export.FORMATS))
@pytest.mark.parametrize('name', ('fat_b0', 'fat_b0_cat', 'lvt_cls'))
def test_timmx_exports_the_model_by_name_and_its_runtime_agrees_with_pytorch(name, fmt, tmp_path):
    skip_without_runtime(fmt)
    model = randomize_norms(timm.create_model(name))  # statistics that a forgotten fusion would show
    checkpoint = tmp_path / f'{name}.pth'
    torch.save(model.state_dict(), checkpoint)
    # timmx writes OpenVINO weights in fp16 by default; the comparison below holds float32 to float rounding
    options = dict(fp16=False) if fmt == 'openvino' else {}
    output = timmx.export_model(fmt, name, checkpoint=checkpoint, input_size=(3, 64, 64),
                                output=tmp_path / f'{name}{export.FORMATS[fmt]}', **options)
    errors = export.verify(model, output, fmt, [(1, 3, 64, 64)])
    assert max(errors) <= 1e-4, errors
