"""Selective scan: chunked PyTorch path and Triton kernels against the
token-by-token reference, outputs and the gradients of every input."""
import pytest
import torch

from mila_det.ops import selective_scan
from mila_det.ops.selective_scan import (linear_recurrence,
                                         chunk_selective_scan,
                                         naive_selective_scan,
                                         chunk_selective_scan_tokens)
from tests.conftest import needs_triton, rel_err

NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias')


def make_inputs(batch=2, groups=4, per_group=6, n_state=1, length=63,
                dtype=torch.float32, with_d=True, with_bias=True):
    channels = groups * per_group
    g = torch.Generator().manual_seed(length * 31 + n_state)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    args = [randn(batch, channels, length),
            randn(batch, channels, length, scale=0.5),
            -torch.rand(channels, n_state, generator=g).to(dtype) * 2 - 0.05,
            randn(batch, groups, n_state, length),
            randn(batch, groups, n_state, length),
            randn(channels) if with_d else None,
            randn(channels, scale=0.5) if with_bias else None]
    return [a.requires_grad_() if a is not None else None for a in args]


def check_against_reference(fn, atol_rel=1e-5, **shape):
    args = make_inputs(**shape)
    want = naive_selective_scan(*args, delta_softplus=True)
    got = fn(*args, delta_softplus=True)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) < atol_rel
    dy = torch.randn_like(want)
    used = [a for a in args if a is not None]
    names = [n for n, a in zip(NAMES, args) if a is not None]
    g_want = torch.autograd.grad(want, used, dy)
    g_got = torch.autograd.grad(got, used, dy)
    for name, a, b in zip(names, g_got, g_want):
        assert rel_err(a, b) < atol_rel, name


def tokens(x, groups):
    """Channel-first ``[B, G*Dg, L]`` -> token-major ``[B, G, L, Dg]``."""
    return x.view(x.shape[0], groups, -1, x.shape[-1]).transpose(2, 3)


def scan_tokens(u, delta, A, B, C, D, bias, **kwargs):
    """:func:`chunk_selective_scan_tokens` (softplus on) on the channel-first
    arguments of :func:`make_inputs`; the result stays token-major."""
    groups = B.shape[1]
    return chunk_selective_scan_tokens(
        tokens(u, groups), tokens(delta, groups), A, B.transpose(2, 3),
        C.transpose(2, 3), D, bias, delta_softplus=True, **kwargs)


@pytest.mark.parametrize('length', [1, 7, 63, 100, 257],
                         ids=lambda n: f'L{n}')
@pytest.mark.parametrize('n_state', [1, 4], ids=lambda n: f'N{n}')
def test_chunked_scan_matches_reference(length, n_state):
    check_against_reference(chunk_selective_scan, length=length,
                            n_state=n_state)


def test_chunked_scan_without_d_and_bias():
    check_against_reference(chunk_selective_scan, with_d=False,
                            with_bias=False, length=40, n_state=2)


@pytest.mark.parametrize('chunk', [1, 3, 8, 64])
def test_linear_recurrence_any_chunk(chunk):
    a = torch.rand(50, 7)
    b = torch.randn(50, 7)
    h = torch.zeros(7)
    want = []
    for t in range(50):
        h = a[t] * h + b[t]
        want.append(h)
    torch.testing.assert_close(linear_recurrence(a, b, chunk),
                               torch.stack(want))


@pytest.mark.parametrize('chunk', [None, 4])
def test_linear_recurrence_reverse_batched_with_initial(chunk):
    """``h[t] = a[t] h[t+1] + b[t]`` from a given state, per batch row."""
    a, b = torch.rand(3, 23, 5), torch.randn(3, 23, 5)
    start = torch.randn(3, 5)
    h, want = start, torch.empty_like(b)
    for t in reversed(range(23)):
        h = a[:, t] * h + b[:, t]
        want[:, t] = h
    got = linear_recurrence(a, b, chunk, reverse=True, initial=start)
    torch.testing.assert_close(got, want)
    linear_recurrence(a, b, chunk, reverse=True, initial=start, out=b)
    torch.testing.assert_close(b, want)  # in place into b


def test_linear_recurrence_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match='share a shape'):
        linear_recurrence(torch.rand(4, 3), torch.rand(4, 2))


@pytest.mark.parametrize('n_state', [1, 4], ids=lambda n: f'N{n}')
def test_token_major_layout_is_the_transposed_channel_first(n_state):
    """chunk_selective_scan_tokens on ``[B, G, L, Dg]`` = the reference on
    ``[B, G*Dg, L]``, transposed."""
    u, delta, A, B, C, D, bias = make_inputs(n_state=n_state, length=33)
    groups = B.shape[1]
    got = scan_tokens(u, delta, A, B, C, D, bias)
    want = naive_selective_scan(u, delta, A, B, C, D, bias, True)
    assert rel_err(got, tokens(want, groups)) < 1e-5
    with pytest.raises(ValueError, match='B must be'):
        chunk_selective_scan_tokens(tokens(u, groups), tokens(delta, groups),
                                    A, B, C)


@pytest.mark.parametrize('length', [1, 2, 33, 100], ids=lambda n: f'L{n}')
@pytest.mark.parametrize('n_state', [1, 4], ids=lambda n: f'N{n}')
def test_reverse_scan_is_the_scan_of_the_flipped_sequence(length, n_state):
    """``reverse=True`` equals the reference run on inputs flipped along L,
    flipped back: outputs and the gradients of every input."""
    u, delta, A, B, C, D, bias = make_inputs(n_state=n_state, length=length)
    groups = B.shape[1]
    got = scan_tokens(u, delta, A, B, C, D, bias, reverse=True)
    want = naive_selective_scan(u.flip(-1), delta.flip(-1), A, B.flip(-1),
                                C.flip(-1), D, bias, True).flip(-1)
    assert rel_err(got, tokens(want, groups)) < 1e-5
    dy = torch.randn_like(want)
    used = [u, delta, A, B, C, D, bias]
    g_got = torch.autograd.grad(got, used, tokens(dy, groups))
    g_want = torch.autograd.grad(want, used, dy)
    for name, a, b in zip(NAMES, g_got, g_want):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize('reverse', [False, True], ids=['fwd', 'rev'])
def test_token_major_scan_gradcheck_float64(reverse):
    args = make_inputs(batch=1, groups=2, per_group=2, n_state=2, length=9,
                       dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *a: scan_tokens(*a, reverse=reverse), args)


def test_public_function_uses_chunked_path_on_cpu():
    args = make_inputs(length=20)
    torch.testing.assert_close(
        selective_scan(*args, delta_softplus=True),
        chunk_selective_scan(*args, delta_softplus=True))


@pytest.mark.parametrize('backend', ['torch', 'naive'])
def test_public_function_returns_the_input_dtype(backend):
    """bf16 in, bf16 out, on every backend: the fp32 scan rounded once
    (within one bf16 step of the fp32 definition)."""
    args = make_inputs(length=12, dtype=torch.bfloat16)
    got = selective_scan(*args, delta_softplus=True, backend=backend)
    want = naive_selective_scan(*args, delta_softplus=True)
    assert got.dtype == torch.bfloat16 and want.dtype == torch.float32
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-5)


def test_public_function_rejects_bad_shapes():
    u, delta, A, B, C, D, bias = make_inputs(length=10)
    with pytest.raises(ValueError, match='B must be'):
        selective_scan(u, delta, A, B[..., :5], C, D, bias)
    with pytest.raises(ValueError, match='A must be'):
        selective_scan(u, delta, A[:3], B, C, D, bias)


@needs_triton()
@pytest.mark.parametrize('shape', [
    dict(length=63, n_state=1, per_group=6),     # 7x9 map
    dict(length=63, n_state=4, per_group=15),    # odd channels, N = 4
    dict(length=37, n_state=3, per_group=70),    # several channel blocks
    dict(length=1, n_state=2, per_group=5),
], ids=['L63-N1', 'L63-N4-odd', 'L37-N3-blocks', 'L1'])
def test_triton_scan_matches_reference(shape):
    check_against_reference(
        lambda *a, **k: selective_scan(*a, **k, backend='triton'), **shape)


@needs_triton()
def test_triton_scan_without_d_and_bias():
    check_against_reference(
        lambda *a, **k: selective_scan(*a, **k, backend='triton'),
        with_d=False, with_bias=False, length=30, n_state=2)


def test_recurrence_refuses_an_output_it_would_write_to_a_copy():
    """An ``out=`` buffer that cannot be viewed as ``[B * G, L, M]`` raises
    rather than receiving nothing (the states would go to a copy)."""
    from mila_det.ops.selective_scan.chunk import _recurrence
    a, b = torch.rand(2, 3, 5, 2, 4), torch.randn(2, 3, 5, 2, 4)
    want = _recurrence(a, b)
    scrambled = torch.empty(2, 3, 5, 4, 2).transpose(3, 4)
    with pytest.raises(RuntimeError, match='viewable'):
        _recurrence(a, b, out=scrambled)
    _recurrence(a, b, out=b)  # a view: written in place
    torch.testing.assert_close(b, want)
