"""VMamba's four-route scan as one operator: the token-major chunked path
and the Triton kernels against the composition of the references (cross
scan, selective scan with D, cross merge), outputs and every input's
gradient."""
import pytest
import torch

from mila_det.ops import cross_selective_scan
from mila_det.ops.cross_scan import naive_cross_merge, naive_cross_scan
from mila_det.ops.cross_selective_scan import (chunk_cross_selective_scan,
                                               naive_cross_selective_scan)
from mila_det.ops.selective_scan import naive_selective_scan
from tests.conftest import needs_triton, rel_err

NAMES = ('x', 'x_proj_weight', 'dt_projs_weight', 'dt_projs_bias', 'A_logs',
         'Ds')


def make_inputs(batch=2, inner=6, h=7, w=9, n_state=1, rank=2,
                dtype=torch.float32, channels_last=True):
    g = torch.Generator().manual_seed(h * 100 + w * 10 + n_state)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x = randn(batch, inner, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = [x, randn(4, rank + 2 * n_state, inner, scale=0.5),
            randn(4, inner, rank, scale=0.5), randn(4, inner, scale=0.5),
            (torch.rand(4 * inner, n_state, generator=g) * 2 - 1).to(dtype),
            randn(4 * inner)]
    return [a.requires_grad_() for a in args]


def by_definition(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs,
                  Ds):
    """The operator written out route by route from the references, with
    no shared helper of the package."""
    b, inner, h, w = x.shape
    n_state, rank = A_logs.shape[1], dt_projs_weight.shape[2]
    xs = naive_cross_scan(x)
    ys = []
    for k in range(4):
        u = xs[:, k]  # [B, Di, L]
        proj = torch.einsum('cd,bdl->bcl', x_proj_weight[k], u)
        dt_low, B, C = proj.split([rank, n_state, n_state], dim=1)
        delta = torch.einsum('dr,brl->bdl', dt_projs_weight[k], dt_low)
        part = slice(k * inner, (k + 1) * inner)
        ys.append(naive_selective_scan(
            u, delta, -A_logs[part].exp(), B[:, None], C[:, None], Ds[part],
            dt_projs_bias[k], delta_softplus=True))
    y = naive_cross_merge(torch.stack(ys, 1), h, w)
    return y.view(b, inner, h, w).permute(0, 2, 3, 1)


def check(fn, tol=1e-5, **shape):
    args = make_inputs(**shape)
    want = by_definition(*args)
    got = fn(*args)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) < tol
    dy = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    g_want = torch.autograd.grad(want, args, dy)
    g_got = torch.autograd.grad(got, args, dy)
    for name, a, b in zip(NAMES, g_got, g_want):
        assert rel_err(a, b) < tol, name


def test_reference_is_the_route_by_route_definition():
    check(naive_cross_selective_scan, n_state=3)


@pytest.mark.parametrize('batch,n_state,h,w', [
    (2, 1, 7, 9), (1, 4, 7, 9), (2, 2, 1, 1), (1, 1, 2, 13), (1, 1, 24, 24)
], ids=['7x9-N1', '7x9-N4', '1x1', '2x13', '24x24'])
def test_chunk_path_matches_the_definition(batch, n_state, h, w):
    check(chunk_cross_selective_scan, batch=batch, n_state=n_state, h=h, w=w)


def test_chunk_path_on_channel_first_memory():
    check(chunk_cross_selective_scan, channels_last=False, n_state=2)


def test_public_function_runs_the_chunk_path_on_cpu(monkeypatch):
    args = make_inputs(batch=1, h=4, w=5)
    fast = cross_selective_scan(*args)
    torch.testing.assert_close(fast, chunk_cross_selective_scan(*args))
    slow = cross_selective_scan(*args, backend='naive')
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('path', [chunk_cross_selective_scan,
                                  naive_cross_selective_scan],
                         ids=['chunk', 'naive'])
def test_bf16_step_bias_is_added_in_fp32(path):
    """bf16 projections, fp32 SSM parameters (as under autocast): the step
    bias must join the bf16 step in fp32. A bias of 2.005 rounds to 2 in
    bf16, which moves softplus(step + bias) by about 0.004. Inputs are small
    multiples of 1/2, so every bf16 product here is exact and only the
    bias can round."""
    args = [a.detach() for a in make_inputs(batch=1, h=3, w=4)]
    x, x_proj, dt_w, bias, A_logs, Ds = args
    x, x_proj = x.round().clamp(-2, 2), x_proj.sign() * 0.5
    bias = torch.full_like(bias, 2.005)
    dt_w = torch.zeros_like(dt_w)  # step = bias exactly
    bf = [t.bfloat16() for t in (x, x_proj, dt_w)]
    got = path(*bf, bias, A_logs, Ds)
    want = by_definition(*[t.float() for t in bf], bias, A_logs, Ds)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_float64_gradcheck():
    args = make_inputs(batch=1, inner=2, h=2, w=3, n_state=2, rank=1,
                       dtype=torch.float64)
    assert torch.autograd.gradcheck(cross_selective_scan, args)
    with pytest.raises(RuntimeError, match='float64'):
        cross_selective_scan(*args, backend='triton')


def test_bad_shapes_are_named():
    args = make_inputs(batch=1, h=3, w=3)
    with pytest.raises(ValueError, match='x_proj_weight'):
        cross_selective_scan(args[0], args[1][:, :3], *args[2:])
    with pytest.raises(ValueError, match='A_logs'):
        cross_selective_scan(*args[:4], args[4][:5], args[5])
    with pytest.raises(ValueError, match=r'\[B, Di, H, W\]'):
        cross_selective_scan(args[0][0], *args[1:])


@needs_triton()
@pytest.mark.parametrize('n_state,h,w', [(1, 7, 9), (4, 3, 5)],
                         ids=['7x9-N1', '3x5-N4'])
def test_triton_path_matches_the_definition(n_state, h, w):
    check(lambda *a: cross_selective_scan(*a, backend='triton'), tol=1e-4,
          batch=1, n_state=n_state, h=h, w=w)
