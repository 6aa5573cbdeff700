"""VMamba-specific behaviour: the official fixtures and key listing, the
SS2D block against its definition, float64 (shared behaviour is in
test_backbones_common.py, checkpoint loading in
tests/utils/test_checkpoint.py)."""
import pytest
import torch
from torch.func import functional_call

from mila_det.models.backbones import VMamba
from mila_det.models.layers import TokenLinear
from mila_det.models.layers.vmamba_block import SS2D
from tests.conftest import (official_key_listing, reference_file,
                            shape_string)
from tests.models.reference import assert_reproduces


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
    assert_reproduces(model, ref['cases'])


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


def test_token_linear_loads_conv_shaped_weights():
    layer = TokenLinear(4, 6, bias=False)
    weight = torch.randn(6, 4, 1, 1)
    layer.load_state_dict({'weight': weight})
    torch.testing.assert_close(layer.weight, weight.flatten(1))


def test_d_state_must_be_positive():
    with pytest.raises(ValueError, match='d_state must be >= 1'):
        VMamba(arch=dict(dims=16, depths=(1, 1, 1, 1), ssm_ratio=1.0,
                         d_state=0))


def test_ss2d_is_the_operator_between_its_projections(monkeypatch):
    """SS2D = out_proj(out_norm(cross_selective_scan(SiLU(conv(in_proj(x))))))
    written out on the naive references, against the block under ``auto``
    (the chunked path on CPU): outputs and every parameter's gradient, on a
    7x9 map with batch 2."""
    from mila_det.ops.cross_selective_scan import naive_cross_selective_scan
    torch.manual_seed(0)
    block = SS2D(12, d_state=2, ssm_ratio=1.5)
    with torch.no_grad():  # move A, D and the norm off their init values
        for p in (block.A_logs, block.Ds, block.out_norm.weight):
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 7, 9, 12, requires_grad=True)

    def by_hand(x):
        u = torch.nn.functional.conv2d(
            (x @ block.in_proj.weight.T).permute(0, 3, 1, 2),
            block.conv2d.weight, None, 1, 1, 1, block.d_inner)
        y = naive_cross_selective_scan(
            torch.nn.functional.silu(u), block.x_proj_weight,
            block.dt_projs_weight, block.dt_projs_bias, block.A_logs,
            block.Ds)
        return block.out_proj.weight @ block.out_norm(y)[..., None]

    params = [x] + list(block.parameters())
    want = by_hand(x)[..., 0]
    got = block(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dy = torch.randn(got.shape)
    for name, a, b in zip(['x'] + [n for n, _ in block.named_parameters()],
                          torch.autograd.grad(got, params, dy),
                          torch.autograd.grad(want, params, dy)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_ss2d_float64_is_float64_throughout():
    """A float64 block computes in float64, SSM parameters included:
    finite differences agree with autograd for the input, A, D and the step
    bias (fp32 rounding anywhere inside would break them)."""
    torch.manual_seed(0)
    block = SS2D(4, d_state=2, ssm_ratio=1.0).double()
    names = ('A_logs', 'Ds', 'dt_projs_bias')
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    values = tuple(getattr(block, n).detach().clone().requires_grad_()
                   for n in names)

    def run(x, *values):
        return functional_call(block, dict(zip(names, values)), (x, ))

    assert torch.autograd.gradcheck(run, (x, *values), eps=1e-6, atol=1e-5)


def test_construction_gives_the_authors_init():
    """Built, the backbone holds VMamba's init: Mamba's step and decay
    rates and ``D = 1`` (set by SS2D when built, not drawn again by the
    backbone), ``x_proj`` within ``+-Di^-0.5``, trunc-normal(0.02) linears
    without bias, unit LayerNorms."""
    torch.manual_seed(0)
    model = VMamba(arch=dict(dims=16, depths=(1, 1), ssm_ratio=2.0,
                             d_state=4), out_indices=(0, 1))
    for block in (model.layers[0].blocks[0], model.layers[1].blocks[0]):
        op = block.op
        torch.testing.assert_close(
            op.A_logs, torch.arange(1.0, 5.0).log().expand_as(op.A_logs))
        assert (op.Ds == 1).all()
        step = torch.nn.functional.softplus(op.dt_projs_bias)
        assert (step > 0.9e-3).all() and (step < 0.11).all()
        bound = op.d_inner**-0.5
        assert op.x_proj_weight.abs().max() <= bound
        assert op.dt_projs_weight.abs().max() <= op.dt_rank**-0.5
        assert op.in_proj.bias is None
        assert 0.015 < op.in_proj.weight.std() < 0.025
        assert (op.out_norm.weight == 1).all()
        assert (op.out_norm.bias == 0).all()
