import copy
import json
import math

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

from classification.fat import checkpoint_filter_fn
from classification.model_table import count_flops, count_params
from classification.registry import MODELS, model_names
from conftest import assert_channels_last_autocast_trains

VARIANTS = model_names('fat')

# b3_st, b4 and b5 were never released: their sizes are those stated for the inferred configurations
# B3-ST, B4 and B5 were never released: their layouts are inferred from the paper (README, "Models"), which states
# these parameter counts (M), within 3 % of the paper's Table 1 (29.0, 52.0, 88.0)
INFERRED_PARAMS_M = {'fat_b3_st': 29.3, 'fat_b4': 51.7, 'fat_b5': 90.6}


def official_model(reference_dir, **kwargs):
    overlay = dict(file=str(reference_dir / 'fat_b0_official_format.pth'), custom_load=True)
    return timm.create_model('fat_b0', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


@pytest.mark.parametrize('size', ['224x224', '200x264'])
def test_reproduces_official_logits_in_float64(reference_dir, size):
    model = official_model(reference_dir).double().eval()
    golden = torch.load(reference_dir / 'fat_b0_io_float64.pt', weights_only=True)
    with torch.no_grad():
        logits = model(golden[f'input_{size}'])
    expected = golden[f'logits_{size}']
    assert logits.shape == expected.shape
    assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-6


@pytest.mark.parametrize('variant', VARIANTS)
def test_official_state_dict_maps_onto_every_variant(reference_dir, variant):
    shapes = json.loads((reference_dir / 'official_state_dict_shapes.json').read_text())[variant]
    model = timm.create_model(variant)
    official = {key: torch.full(shape, float(i)) for i, (key, shape) in enumerate(shapes.items())}
    mapped = checkpoint_filter_fn(official, model)
    assert len(mapped) == len(official) == len(model.state_dict())
    model.load_state_dict(mapped, strict=True)
    # every tensor arrives, none twice
    assert sorted(float(v.flatten()[0]) for v in model.state_dict().values() if v.numel()) == \
        sorted(float(i) for i, shape in enumerate(shapes.values()) if math.prod(shape))


@pytest.mark.parametrize('variant', VARIANTS)
def test_every_variant_trains_forward_and_backward(variant):
    model = timm.create_model(variant, num_classes=7).train()
    images = torch.randn(2, 3, 64, 80)
    logits = model(images)
    assert logits.shape == (2, 7)
    logits.logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize('variant', ['fat_b0', 'fat_b1', 'fat_b2', 'fat_b3'])
def test_params_within_two_percent_of_paper(variant):
    params_m = count_params(timm.create_model(variant)) / 1e6
    paper = MODELS[variant].paper
    assert abs(params_m - paper.params_m) / paper.params_m < 0.02


@pytest.mark.parametrize('variant', sorted(INFERRED_PARAMS_M))
def test_inferred_variants_are_within_three_percent_of_the_paper(variant):
    params_m = count_params(timm.create_model(variant)) / 1e6
    paper = MODELS[variant].paper
    assert abs(params_m - paper.params_m) / paper.params_m < 0.03
    assert round(params_m, 1) == INFERRED_PARAMS_M[variant]  # the README's figure


def test_fvcore_flops_match_authors_code_for_b0():
    # the authors' code measured 0.77 GFLOPs with fvcore, attention products included
    assert count_flops(timm.create_model('fat_b0')) / 1e9 == pytest.approx(0.77, abs=0.01)


@pytest.mark.parametrize('height,width', [(224, 224), (97, 131), (33, 65)])
def test_features_only_pyramid_at_any_size(height, width):
    model = timm.create_model('fat_b0', features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert model.feature_info.channels() == [32, 80, 160, 256]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        features = model(torch.randn(1, 3, height, width))
    for feature, channels, stride in zip(features, (32, 80, 160, 256), (4, 8, 16, 32)):
        assert feature.shape == (1, channels, math.ceil(height / stride), math.ceil(width / stride))


def test_features_only_subset_and_intermediates_agree(tmp_path):
    images = torch.randn(1, 3, 96, 96)
    classifier = timm.create_model('fat_b0').eval()
    torch.save(classifier.state_dict(), tmp_path / 'fat_b0.pth')
    features = timm.create_model('fat_b0', features_only=True, out_indices=(1, 3), pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / 'fat_b0.pth'))).eval()
    with torch.no_grad():
        final, intermediates = classifier.forward_intermediates(images)
        selected = features(images)
    assert [f.shape[1] for f in selected] == [80, 256]
    torch.testing.assert_close(selected[0], intermediates[1])
    torch.testing.assert_close(selected[1], intermediates[3])
    torch.testing.assert_close(final, classifier.forward_features(images))


def test_stride4_feature_is_input_of_first_downsampling_block():
    model = timm.create_model('fat_b0').eval()
    captured = {}
    model.stages[1].downsample.register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    with torch.no_grad():
        intermediates = model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    torch.testing.assert_close(intermediates[0], captured['x'])


def test_timm_model_interface():
    model = timm.create_model('fat_b0', num_classes=10, in_chans=1, drop_path_rate=0.2, global_pool='max')
    assert model.stem.conv1.conv.in_channels == 1
    assert model.stages[3].blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    images = torch.randn(2, 1, 64, 64)
    features = model.forward_features(images)
    assert features.shape == (2, 256, 2, 2)
    assert model.forward_head(features, pre_logits=True).shape == (2, 256)
    assert model(images).shape == (2, 10)
    model.reset_classifier(0)
    assert model(images).shape == (2, 256)
    model.reset_classifier(5, global_pool='avg')
    assert model.get_classifier().out_features == 5
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bicubic'
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD


def test_batchnorm_inside_converts_to_syncbatchnorm():
    """The trainer's conversion (DDP on GPUs) reaches every BatchNorm of FAT, and the converted model computes what
    the model did: no norm is a subclass whose conversion would drop part of it (an activation fused in, say)."""
    model = timm.create_model('fat_b0').eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # statistics and affine weights other than the identity
                for tensor in (module.running_mean, module.running_var, module.weight, module.bias):
                    tensor.copy_(torch.rand_like(tensor) + 0.5)
    batch_norms = [name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert batch_norms and [name for name, m in converted.named_modules()
                            if isinstance(m, torch.nn.SyncBatchNorm)] == batch_norms
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, torch.nn.SyncBatchNorm)
                   for m in converted.modules())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted(images), model(images), rtol=0, atol=0)


def test_gradient_checkpointing_gives_same_gradients():
    images = torch.randn(2, 3, 64, 64)
    model = timm.create_model('fat_b0').train()
    gradients = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)  # same drop path draws
        model(images).sum().backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*gradients):
        torch.testing.assert_close(plain, checkpointed)


def test_no_weight_decay_on_norms_and_biases():
    model = timm.create_model('fat_b0')
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    decay = {id(p) for g in optimizer.param_groups if g['weight_decay'] > 0 for p in g['params']}
    for name, param in model.named_parameters():
        assert (id(param) in decay) == (param.ndim > 1), name


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_channels_last_autocast_forward_backward(dtype):
    assert_channels_last_autocast_trains('fat_b0', dtype)


@pytest.mark.slow
def test_torch_compile_matches_eager_forward_and_backward():
    """torch.compile captures the whole forward in one graph (no graph break) and AOTAutograd its backward; the
    backend is aot_eager, which runs the captured graphs as they are: Inductor's C++ code generation takes minutes on
    a small CPU (Inductor compiles FAT on a GPU in make gpu-check's model_benchmark_compiled step)."""
    # a shallower FAT-B0 has every module type of the full one and compiles in a fraction of the time
    model = timm.create_model('fat_b0', depths=(2, 2, 2, 1), drop_path_rate=0.).train()
    images = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    outputs = []
    for forward in (model, compiled):
        model.zero_grad()
        logits = forward(images)
        logits.logsumexp(1).sum().backward()
        outputs.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (eager, eager_grads), (compiled_logits, compiled_grads) = outputs
    torch.testing.assert_close(compiled_logits, eager, rtol=1e-4, atol=1e-4)
    for eager_grad, compiled_grad in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-3, atol=1e-4)


def test_registry_lists_exactly_the_registered_models():
    families = sorted({entry.family for entry in MODELS.values()})
    assert sorted(model_names(ablations=True)) == sorted(timm.list_models(module=families))


def test_every_peer_is_a_timm_model_compared_with_a_registered_model():
    from classification.registry import PEERS, published_top1

    fat_models = [entry.name for entry in MODELS.values() if entry.family == 'fat' and entry.paper and entry.published]
    for name, peer in PEERS.items():
        assert timm.is_model(name), name
        assert MODELS[peer.counterpart].paper is not None, name
        # the FAT paper pairs its peers in its tables; a CPU-first peer goes with the FAT model nearest in top-1
        if peer.cpu_first:
            assert peer.counterpart == min(fat_models, key=lambda fat: abs(MODELS[fat].paper.top1 - peer.top1)), name
        assert published_top1(name) == peer.top1
    cpu_first = sorted(name for name, peer in PEERS.items() if peer.cpu_first)
    assert cpu_first == sorted(['cpubone_b0_bfrobust', 'cpubone_b1_bfrobust', 'repvit_m0_9', 'repvit_m1_0',
                                'fastvit_t8', 'fastvit_t12', 'efficientformerv2_s0', 'efficientformerv2_s1',
                                'mobilenetv4_conv_medium'])
