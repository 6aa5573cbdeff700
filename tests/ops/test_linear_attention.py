"""MILA linear attention: RoPE table, reference, Triton kernels, precision."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from mila_det.ops import linear_attention, rope_table
from mila_det.ops.linear_attention import (apply_rope, build_rope_table,
                                           naive_linear_attention,
                                           parallel_linear_attention)
from tests.conftest import needs_triton, rel_err


def qkv(batch, n, c, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.elu(torch.randn(batch, n, c, generator=g)) + 1
    k = F.elu(torch.randn(batch, n, c, generator=g)) + 1
    v = torch.randn(batch, n, c, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def assert_close_with_grads(got, want, inputs, tol):
    """Outputs, and the gradients of every input, within ``tol`` (rel)."""
    assert rel_err(got, want) <= tol
    do = torch.randn_like(want)
    for name, a, b in zip('qkv', torch.autograd.grad(got, inputs, do),
                          torch.autograd.grad(want, inputs, do)):
        assert rel_err(a, b) <= tol, name


def test_rope_table_angles():
    h, w, c = 3, 5, 8
    table = build_rope_table(h, w, c)
    k_max = c // 4
    for y in range(h):
        for x in range(w):
            t = y * w + x
            for p in range(c // 2):
                m = p % k_max
                pos = y if p < k_max else x
                angle = pos * 10000**(-m / k_max)
                assert math.isclose(table[t, p, 0].item(), math.cos(angle),
                                    abs_tol=1e-6)
                assert math.isclose(table[t, p, 1].item(), math.sin(angle),
                                    abs_tol=1e-6)


def test_rope_rotates_channel_pairs():
    x = torch.randn(1, 6, 8)
    table = build_rope_table(2, 3, 8)
    out = apply_rope(x, table)
    cos, sin = table[..., 0], table[..., 1]
    torch.testing.assert_close(out[..., 0::2], x[..., 0::2] * cos -
                               x[..., 1::2] * sin)
    torch.testing.assert_close(out[..., 1::2], x[..., 1::2] * cos +
                               x[..., 0::2] * sin)
    # rotations keep norms of every pair
    torch.testing.assert_close(out.view(1, 6, 4, 2).norm(dim=-1),
                               x.view(1, 6, 4, 2).norm(dim=-1))


def test_reference_matches_a_dense_formula():
    """out = (rope(q) rope(k)^T / n) v / (q . mean k), per head."""
    q, k, v = qkv(1, 12, 16)
    out = naive_linear_attention(q, k, v, 2, (3, 4))
    table = build_rope_table(3, 4, 16)
    qr, kr = apply_rope(q, table), apply_rope(k, table)
    for h in range(2):
        s = slice(8 * h, 8 * h + 8)
        attn = qr[0, :, s] @ kr[0, :, s].T / 12
        z = 1 / (q[0, :, s] @ k[0, :, s].mean(0) + 1e-6)
        torch.testing.assert_close(out[0, :, s], (attn @ v[0, :, s]) *
                                   z[:, None])


def test_reference_gradcheck_float64():
    q, k, v = qkv(1, 6, 8, dtype=torch.float64)
    table = build_rope_table(2, 3, 8).double()
    assert torch.autograd.gradcheck(
        lambda a, b, c: naive_linear_attention(a, b, c, 2, table), (q, k, v))


@pytest.mark.parametrize('hw, channels, heads, batch', [
    ((7, 9), 60, 3, 2),   # odd grid, C = 60, head dim 20
    ((4, 5), 32, 4, 1),
], ids=['7x9-C60', '4x5-C32'])
def test_torch_path_matches_reference(hw, channels, heads, batch):
    n = hw[0] * hw[1]
    q, k, v = qkv(batch, n, channels, seed=n)
    want = linear_attention(q, k, v, heads, hw, backend='naive')
    got = linear_attention(q, k, v, heads, hw, backend='torch')
    assert_close_with_grads(got, want, (q, k, v), 1e-5)


def test_torch_path_strided_inputs_and_float64():
    """q and k as halves of one projection (the block's layout), and an odd
    storage offset that rules out a complex view without a copy."""
    g = torch.Generator().manual_seed(1)
    qk = torch.rand(2, 12, 33, generator=g) + 0.5
    q, k = qk[..., :16], qk[..., 17:]  # offset 17: odd
    v = torch.randn(2, 12, 16, generator=g)
    table = build_rope_table(3, 4, 16)
    torch.testing.assert_close(
        parallel_linear_attention(q, k, v, 2, table),
        naive_linear_attention(q, k, v, 2, table))
    q, k, v = qkv(1, 6, 8, dtype=torch.float64)
    table = build_rope_table(2, 3, 8).double()
    assert torch.autograd.gradcheck(
        lambda a, b, c: parallel_linear_attention(a, b, c, 2, table),
        (q, k, v))


def test_torch_path_copies_no_full_size_tensor():
    """With q and k as halves of one projection (the block's layout), the
    fast path reads its inputs and writes its result without any [B, N, C]
    copy (one once cost a full extra pass per block)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CopyLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.clone,
                                       torch.ops.aten.copy_,
                                       torch.ops.aten._to_copy):
                self.sizes.append(args[0].numel())
            return func(*args, **(kwargs or {}))

    n, c = 7 * 9, 32
    qk = F.elu(torch.randn(1, n, 2 * c)) + 1
    q, k = qk.chunk(2, dim=-1)
    v = torch.randn(1, n, c)
    table = rope_table(7, 9, c)
    with torch.no_grad(), CopyLog() as log:
        out = parallel_linear_attention(q, k, v, 4, table)
    assert out.is_contiguous()
    assert all(size < n * c for size in log.sizes), log.sizes


def test_errors_name_the_problem():
    q, k, v = qkv(1, 12, 16)
    with pytest.raises(ValueError, match='does not hold N=12'):
        linear_attention(q, k, v, 2, (3, 5))
    with pytest.raises(ValueError, match='not divisible by num_heads=3'):
        linear_attention(q, k, v, 3, (3, 4))
    with pytest.raises(ValueError, match='RoPE table'):
        linear_attention(q, k, v, 2, rope_table(4, 4, 16))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16],
                         ids=['fp16', 'bf16'])
def test_half_precision_close_to_fp32(dtype):
    """Large N: the sums and the normaliser stay fp32 inside."""
    h, w = 64, 96
    q, k, v = qkv(1, h * w, 32)
    want = linear_attention(q, k, v, 2, (h, w))
    got = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), 2, (h, w))
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert rel_err(got.float(), want) < (1e-2 if dtype == torch.bfloat16
                                         else 2e-3)


@needs_triton()
@pytest.mark.parametrize('hw, channels, heads', [
    ((7, 9), 32, 2),     # head dim 16
    ((13, 5), 64, 2),    # head dim 32
    ((7, 9), 48, 2),     # head dim 24: not a power of two
    ((5, 7), 128, 2),    # head dim 64
    ((3, 5), 256, 2),    # head dim 128: the dq kernel's two halves apart
    ((30, 41), 32, 2),   # N = 1230: 20 chunks of 64, the last one partial
], ids=['7x9-d16', '13x5-d32', '7x9-d24', '5x7-d64', '3x5-d128',
        '30x41-d16'])
def test_triton_matches_reference(hw, channels, heads):
    n = hw[0] * hw[1]
    q, k, v = qkv(2 if n < 1000 else 1, n, channels, seed=n)
    want = naive_linear_attention(q, k, v, heads, hw)
    got = linear_attention(q, k, v, heads, hw, backend='triton')
    assert_close_with_grads(got, want, (q, k, v), 1e-4)


@needs_triton()
def test_triton_unsupported_inputs_run_in_pytorch_under_auto(monkeypatch):
    """An odd head width, a head wider than 128 and float64 have no Triton
    kernel: forcing Triton says why; ``auto`` (on a device where it would pick Triton) runs PyTorch
    instead of raising."""
    from mila_det.ops import _dispatch
    q, k, v = qkv(1, 12, 12)
    with pytest.raises(RuntimeError, match='head width must be even'):
        linear_attention(q, k, v, 4, (3, 4), backend='triton')
    wide = qkv(1, 12, 260)
    with pytest.raises(RuntimeError, match='up to 128 channels wide'):
        linear_attention(*wide, 1, (3, 4), backend='triton')
    q64, k64, v64 = qkv(1, 12, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match='float64'):
        linear_attention(q64, k64, v64, 2, (3, 4), backend='triton')
    # Pretend the tensors are on CUDA, where auto would pick Triton.
    la = importlib.import_module('mila_det.ops.linear_attention')
    monkeypatch.setattr(_dispatch, 'HAS_TRITON', True)
    monkeypatch.setattr(_dispatch, '_TRIED', {})
    monkeypatch.setattr(torch.Tensor, 'is_cuda', property(lambda t: True))
    ran = []
    naive = la.IMPLS['naive']
    monkeypatch.setitem(la.IMPLS, 'triton',
                        lambda *a: ran.append('triton') or naive(*a))
    monkeypatch.setitem(la.IMPLS, 'torch',
                        lambda *a: ran.append('torch') or naive(*a))
    for args in ((q, k, v, 4), (*wide, 1), (q64, k64, v64, 2)):
        linear_attention(*args, (3, 4))
    assert ran == ['torch', 'torch', 'torch']
    linear_attention(*qkv(1, 12, 8), 2, (3, 4))  # even, fp32: the kernel
    assert ran[-1] == 'triton'


@needs_triton()
def test_triton_chunks_of_several_tiles(monkeypatch):
    """Fewer programs wanted: chunks of 512 tokens (32 tiles each), the
    second one partial."""
    from mila_det.ops.linear_attention import triton as la_triton
    monkeypatch.setattr(la_triton, 'TARGET_PROGRAMS', 4)
    hw = (20, 39)  # N = 780
    assert la_triton._config(780, 2, 32).chunk == 512
    q, k, v = qkv(1, 780, 64, seed=3)
    want = naive_linear_attention(q, k, v, 2, hw)
    got = linear_attention(q, k, v, 2, hw, backend='triton')
    assert_close_with_grads(got, want, (q, k, v), 1e-4)


@needs_triton()
def test_triton_reads_strided_halves_without_copies():
    """q and k as halves of one [B, N, 2C] projection and a strided output
    gradient go to the kernels as they are (through their strides); a
    tensor without unit channel stride is copied, and all are right."""
    from mila_det.ops.linear_attention import triton as la_triton
    g = torch.Generator().manual_seed(5)
    hw, c = (7, 9), 64
    n = hw[0] * hw[1]
    qk = (F.elu(torch.randn(2, n, 2 * c, generator=g)) + 1).requires_grad_()
    q, k = qk[..., :c], qk[..., c:]
    v = torch.randn(2, c, n, generator=g).transpose(1, 2).requires_grad_()
    for t in (q, k):
        assert la_triton._strides(t)[0] is t
    assert la_triton._strides(v)[0] is not v  # channel stride n: a copy
    want = naive_linear_attention(q, k, v, 2, hw)
    got = linear_attention(q, k, v, 2, hw, backend='triton')
    assert rel_err(got, want) <= 1e-4
    do = torch.randn(2, n, 3 * c, generator=g)[..., c:2 * c]
    assert la_triton._strides(do)[0] is do
    for name, a, b in zip(('qk', 'v'), torch.autograd.grad(got, (qk, v), do),
                          torch.autograd.grad(want, (qk, v), do)):
        assert rel_err(a, b) <= 1e-4, name


@needs_triton()
def test_triton_bf16_close_to_fp32_reference():
    """bf16 in and out; the sums, the normaliser and the products stay fp32
    inside."""
    hw = (9, 14)
    n = hw[0] * hw[1]
    q, k, v = qkv(2, n, 64, seed=7)
    q16, k16, v16 = (t.detach().bfloat16().requires_grad_()
                     for t in (q, k, v))
    want = naive_linear_attention(q16.float(), k16.float(), v16.float(), 2,
                                  hw)
    got = linear_attention(q16, k16, v16, 2, hw, backend='triton')
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), want) <= 1e-2
    do = torch.randn(2, n, 64)
    grads = torch.autograd.grad(got, (q16, k16, v16), do.bfloat16())
    q32, k32, v32 = (t.detach().float().requires_grad_()
                     for t in (q16, k16, v16))
    ref = torch.autograd.grad(
        naive_linear_attention(q32, k32, v32, 2, hw), (q32, k32, v32), do)
    for name, a, b in zip('qkv', grads, ref):
        assert a.dtype == torch.bfloat16, name
        assert rel_err(a.float(), b) <= 2e-2, name


@needs_triton()
def test_triton_refuses_tensors_on_another_device():
    from mila_det.ops.linear_attention import triton as la_triton
    q, k, v = qkv(1, 12, 16)
    table = build_rope_table(3, 4, 16)
    with pytest.raises(ValueError, match='rope is on meta'):
        linear_attention(q, k, v, 2, table.to('meta'), backend='triton')
    with pytest.raises(ValueError, match='v is on meta'):
        la_triton.linear_attention_fwd(q, k, v.to('meta'), 2, table, 1e-6)
    _, kv, kmean = la_triton.linear_attention_fwd(q, k, v, 2, table, 1e-6)
    with pytest.raises(ValueError, match='do is on meta'):
        la_triton.linear_attention_bwd(q, k, v, 2, table, 1e-6, kv, kmean,
                                       torch.empty(1, 12, 16, device='meta'))


@needs_triton()
def test_triton_report_declares_every_launch():
    """The report's launches at MILA-T stage 1 (1x3x800x1280) fill a 132-SM
    GPU twice over and run declared variants; every MILA head width (32)
    is declared."""
    from mila_det.models.backbones.mila import MILA
    from mila_det.ops.linear_attention import triton as la_triton
    variants = {(v.kernel, v.detail) for v in la_triton.report_variants()}
    launches = la_triton.report_launches()
    assert {x.model for x in launches} == {'MILA-T b1', 'MILA-T b2'}
    for x in launches:
        assert (x.kernel, x.detail) in variants
        assert x.programs >= 264, x
        cfg = la_triton._config(64000, 2 * int(x.model[-1]), 32)
        assert x.programs == triton_cdiv(64000, cfg.chunk) * 2 * int(
            x.model[-1])
    for arch in MILA.arch_zoo.values():
        for i, heads in enumerate(arch['num_heads']):
            width = arch['embed_dims'] * 2**i // heads
            assert width in la_triton.HEAD_WIDTHS
            for dt in ('fp32', 'bf16', 'fp16'):
                assert ('linear_attention_kv_fwd_kernel',
                        f'{dt} d{width}') in variants


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@needs_triton()
def test_triton_eps_zero_keeps_padded_rows_out_of_the_gradients():
    """With ``eps = 0`` the rows of the last token tile past N would give
    ``1 / 0``; they must not reach dk and dv (5 tokens: one partial tile)."""
    q, k, v = qkv(1, 5, 32, seed=5)
    want = naive_linear_attention(q, k, v, 1, (1, 5), eps=0.0)
    got = linear_attention(q, k, v, 1, (1, 5), eps=0.0, backend='triton')
    assert_close_with_grads(got, want, (q, k, v), 1e-4)
