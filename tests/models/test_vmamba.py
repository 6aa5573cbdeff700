"""VMamba-specific behaviour: the official fixtures, the authors' keywords
and ImageNet checkpoint layout (shared behaviour is in
test_backbones_common.py)."""
import pytest
import torch
from torch.func import functional_call

from mila_det.models.backbones import MM_VSSM, VMamba
from mila_det.models.layers import Linear2d
from mila_det.models.layers.vmamba_block import SS2D
from mila_det.utils.checkpoint import load_pretrained
from tests.conftest import (official_key_listing, reference_file,
                            shape_string)


@pytest.mark.parametrize('fixture', ['vmamba_mini_r2_n1.pt',
                                     'vmamba_mini_r1_n4.pt'])
def test_reference_fixtures_reproduced(fixture):
    ref = torch.load(reference_file(fixture), weights_only=False)
    arch = ref['arch']
    model = VMamba(arch=dict(dims=arch['dims'], depths=arch['depths'],
                             ssm_ratio=arch['ssm_ratio'],
                             d_state=arch['ssm_d_state']),
                   drop_path_rate=0.0).eval()
    model.load_state_dict(ref['state_dict'], strict=True)
    assert list(model.state_dict()) == list(ref['state_dict'])
    assert ref['cases']
    with torch.no_grad():
        for case in ref['cases']:
            outs = model(case['input'])
            assert len(outs) == len(case['outputs']) == 4
            for got, want in zip(outs, case['outputs']):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_official_parameter_counts():
    """Tiny / small backbones as in the official state dicts."""
    assert sum(p.numel() for p in VMamba('tiny').parameters()) == 29_481_408
    assert sum(p.numel() for p in VMamba('small').parameters()) == 49_380_096


@pytest.mark.parametrize('arch, title', [
    ('tiny', 'VMamba-T official detection backbone state dict'),
    ('small', 'VMamba-S official detection backbone state dict')])
def test_official_key_listing(arch, title):
    """Same keys, same order, same shapes as the official state dicts."""
    listing = official_key_listing('vmamba_official_keys.txt')[title]
    ours = {k: shape_string(v) for k, v in VMamba(arch).state_dict().items()}
    assert list(ours) == list(listing)
    assert ours == listing


def test_linear2d_loads_conv_shaped_weights():
    layer = Linear2d(4, 6, bias=False)
    weight = torch.randn(6, 4, 1, 1)
    layer.load_state_dict({'weight': weight})
    torch.testing.assert_close(layer.weight, weight.flatten(1))


def test_imagenet_checkpoint_drops_classifier(tmp_path):
    arch = dict(dims=16, depths=(1, 1, 1, 1), ssm_ratio=1.0, d_state=1)
    source = VMamba(arch=arch)
    state = {k: v for k, v in source.state_dict().items()
             if not k.startswith('outnorm')}
    state['classifier.norm.weight'] = torch.ones(128)
    state['classifier.head.weight'] = torch.zeros(1000, 128)
    path = tmp_path / 'vssm_mini.pth'
    torch.save({'model': state}, path)
    model = VMamba(arch=arch)
    report = load_pretrained(model, str(path), ignore=model.ignored_keys)
    assert sorted(report.missing) == sorted(
        f'outnorm{i}.{p}' for i in range(4) for p in ('weight', 'bias'))
    assert report.unexpected == [] and len(report.ignored) == 2


def test_d_state_must_be_positive():
    with pytest.raises(ValueError, match='d_state must be >= 1'):
        VMamba(arch=dict(dims=16, depths=(1, 1, 1, 1), ssm_ratio=1.0,
                         d_state=0))


def test_mm_vssm_accepts_the_authors_config():
    """Keys of the authors' mask_rcnn_vssm_fpn_coco_tiny config."""
    model = MM_VSSM(
        out_indices=(0, 1, 2, 3), pretrained='', dims=16,
        depths=(1, 1, 1, 1), ssm_d_state=1, ssm_dt_rank='auto',
        ssm_ratio=1.0, ssm_conv=3, ssm_conv_bias=False,
        forward_type='v05_noz', mlp_ratio=4.0, downsample_version='v3',
        patchembed_version='v2', drop_path_rate=0.2, norm_layer='ln2d',
        embed_dims=96, num_heads=[3, 6, 12, 24], window_size=7)
    assert model.num_features == [16, 32, 64, 128]
    with pytest.raises(ValueError, match="forward_type='v05_noz'"):
        MM_VSSM(dims=16, depths=(1, 1, 1, 1), forward_type='v2')


@pytest.mark.parametrize('batch, d_state, ssm_ratio', [
    (2, 1, 2.0), (1, 4, 1.0)], ids=['B2-N1', 'B1-N4'])
def test_ss2d_token_major_path_matches_channel_first(batch, d_state,
                                                     ssm_ratio):
    """The CPU fast path of SS2D (token-major) against the authors' layout
    on the naive references: outputs and every parameter's gradient, on a
    7x9 map held channels-last as the backbone holds it."""
    torch.manual_seed(0)
    block = SS2D(12, d_state=d_state, ssm_ratio=ssm_ratio)
    with torch.no_grad():  # move A, D and the norm off their init values
        for p in (block.A_logs, block.Ds, block.out_norm.weight):
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(batch, 12, 7, 9).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    outs, grads = [], []
    for path in (block._scan_tokens, block._scan_channel_first):
        u = block.scan_input(x)
        y = path(u)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        params = [x] + list(block.parameters())
        outs.append(y)
        grads.append(torch.autograd.grad((y * dy).sum(), params,
                                         allow_unused=True))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    names = ['x'] + [n for n, _ in block.named_parameters()]
    for name, got, want in zip(names, *grads):
        if want is None:  # out_norm / out_proj are outside the paths
            assert got is None, name
            continue
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5,
                                   msg=name)


def test_forward_picks_the_path_by_backend(monkeypatch):
    """auto on CPU runs the token-major path; forcing naive runs the
    channel-first references; both give the same output."""
    block = SS2D(8, ssm_ratio=1.0).eval()
    calls = []
    for name in ('_scan_tokens', '_scan_channel_first'):
        original = getattr(block, name)
        monkeypatch.setattr(block, name, lambda u, f=original, n=name:
                            calls.append(n) or f(u))
    x = torch.randn(1, 8, 5, 6)
    with torch.no_grad():
        fast = block(x)
        monkeypatch.setenv('MILA_DET_BACKEND', 'naive')
        slow = block(x)
    assert calls == ['_scan_tokens', '_scan_channel_first']
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)



def test_ss2d_float64_is_float64_throughout():
    """A float64 block computes in float64, SSM parameters included:
    finite differences agree with autograd for the input, A, D and the step
    bias (fp32 rounding anywhere inside would break them)."""
    torch.manual_seed(0)
    block = SS2D(4, d_state=2, ssm_ratio=1.0).double()
    names = ('A_logs', 'Ds', 'dt_projs_bias')
    x = torch.randn(1, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    values = tuple(getattr(block, n).detach().clone().requires_grad_()
                   for n in names)

    def run(x, *values):
        return functional_call(block, dict(zip(names, values)), (x, ))

    assert torch.autograd.gradcheck(run, (x, *values), eps=1e-6, atol=1e-5)
