"""Selective scan: chunked PyTorch path and Triton kernels against the
token-by-token reference, outputs and the gradients of every input."""
import importlib

import pytest
import torch

from mila_det.ops import HAS_TRITON, selective_scan
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


def check_against_reference(fn, atol_rel=1e-5, scale_input=True, **shape):
    args = make_inputs(**shape)
    want = naive_selective_scan(*args, delta_softplus=True,
                                scale_input=scale_input)
    got = fn(*args, delta_softplus=True, scale_input=scale_input)
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


@pytest.mark.parametrize('scale_input', [True, False],
                         ids=['scaled', 'unscaled'])
@pytest.mark.parametrize('shape', [
    dict(n_state=4, groups=2, per_group=3, length=37),
    dict(n_state=32, groups=3, per_group=32, length=19, batch=1),
], ids=['N4', 'N32-G3-C96'])
def test_chunked_scan_scale_input(shape, scale_input):
    """``scale_input=False`` (``h_t = a_t h_{t-1} + B_t u_t``) against the
    reference, and N = 32 with one group per head (C = 96, G = 3)."""
    check_against_reference(chunk_selective_scan, scale_input=scale_input,
                            **shape)


def test_reference_scale_input_drops_the_step_from_the_input():
    """The reference itself: with zero decay (A very negative) the state is
    the last input term, ``B_t u_t`` unscaled vs ``delta_t B_t u_t``."""
    u, delta, A, B, C = [a.detach() for a in make_inputs(
        batch=1, groups=1, per_group=2, n_state=1, length=5)[:5]]
    delta = delta.abs() + 0.5
    A = torch.full_like(A, -1e4)
    y_plain = naive_selective_scan(u, delta, A, B, C, scale_input=False)
    y_scaled = naive_selective_scan(u, delta, A, B, C)
    torch.testing.assert_close(y_plain, B[:, 0] * C[:, 0] * u)
    torch.testing.assert_close(y_scaled, delta * B[:, 0] * C[:, 0] * u)


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


@pytest.mark.parametrize('reverse', [False, True], ids=['fwd', 'rev'])
def test_linear_recurrence_carry_over_many_chunks(reverse):
    """Past ``CARRY_LOOP_MAX`` chunks the carry between chunks is itself a
    chunked recurrence (two levels here: 151 chunks of 2, plus a tail)."""
    from mila_det.ops.selective_scan.recurrence import CARRY_LOOP_MAX
    length = 303
    assert length // 2 > CARRY_LOOP_MAX
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, length, 4, generator=g, dtype=torch.float64)
    b = torch.randn(2, length, 4, generator=g, dtype=torch.float64)
    start = torch.randn(2, 4, generator=g, dtype=torch.float64)
    h, want = start, torch.empty_like(b)
    for t in (reversed(range(length)) if reverse else range(length)):
        h = a[:, t] * h + b[:, t]
        want[:, t] = h
    got = linear_recurrence(a, b, 2, reverse=reverse, initial=start)
    torch.testing.assert_close(got, want)


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


# Triton's interpreter runs the kernels' own tl.associative_scan, which
# calls the combine function once per element (about 0.1 ms each): the
# Triton tests keep (batch x channels x N x tokens) to a few thousand, and
# the launch wrappers size the tiles to the shapes.
@needs_triton()
@pytest.mark.parametrize('shape', [
    dict(length=21, n_state=3, per_group=5, groups=2),  # odd channels
    dict(length=13, n_state=2, per_group=18, groups=1, batch=1),  # blocks
    dict(length=1, n_state=2, per_group=5, groups=2),
], ids=['L21-N3-odd', 'L13-N2-blocks', 'L1'])
def test_triton_scan_matches_reference(shape):
    """Odd channel counts, several channel blocks per group (18 channels:
    two blocks of the forward's 16, three of the backward's 8), one
    token."""
    check_against_reference(
        lambda *a, **k: selective_scan(*a, **k, backend='triton'), **shape)


@pytest.mark.parametrize('scale_input', [True, False],
                         ids=['scaled', 'unscaled'])
def test_public_function_passes_scale_input(scale_input):
    check_against_reference(
        lambda *a, **k: selective_scan(*a, **k, backend='torch'),
        scale_input=scale_input, length=20, n_state=2)


@needs_triton()
def test_triton_scan_without_d_and_bias():
    check_against_reference(
        lambda *a, **k: selective_scan(*a, **k, backend='triton'),
        with_d=False, with_bias=False, length=30, n_state=2, groups=2,
        per_group=3)


def triton_scan(block_t):
    """The Triton path with ``block_t`` tokens per segment."""
    from mila_det.ops.selective_scan.triton import triton_selective_scan

    def run(*args, **kwargs):
        return triton_selective_scan(*args, **kwargs, block_t=block_t)

    return run


@needs_triton()
@pytest.mark.parametrize('shape,block_t,scale_input', [
    (dict(batch=1, groups=2, per_group=3, n_state=1, length=100), 32,
     True),
    (dict(batch=1, groups=2, per_group=3, n_state=1, length=100), 32,
     False),
    (dict(batch=2, groups=2, per_group=3, n_state=2, length=45), 8,
     True),
    (dict(batch=1, groups=1, per_group=2, n_state=32, length=10), 8,
     False),
], ids=['L100-N1-seg32', 'L100-N1-seg32-unscaled', 'L45-N2-seg8',
        'L10-N32-seg8-unscaled'])
def test_triton_scan_over_several_segments(shape, block_t, scale_input):
    """Segments carried across by the segment scan (L not a multiple of the
    segment), outputs and every gradient against the reference."""
    check_against_reference(triton_scan(block_t), scale_input=scale_input,
                            **shape)


if HAS_TRITON:
    import triton
    import triton.language as tl

    _combine = importlib.import_module(
        'mila_det.ops.selective_scan.triton')._combine

    @triton.jit
    def scan_kernel(a, b, pa, pb, ROWS: tl.constexpr, T: tl.constexpr,
                    REVERSE: tl.constexpr):
        o = tl.arange(0, ROWS)[:, None] * T + tl.arange(0, T)[None, :]
        b_pa, b_pb = tl.associative_scan((tl.load(a + o), tl.load(b + o)), 1,
                                         _combine, reverse=REVERSE)
        tl.store(pa + o, b_pa)
        tl.store(pb + o, b_pb)


@needs_triton()
@pytest.mark.parametrize('reverse', [False, True], ids=['fwd', 'rev'])
def test_triton_segment_carry_over_several_blocks(reverse):
    """The scan over segments, in blocks of 8 segments: ``out_s`` is the
    carry entering segment s (from the left, or from the right)."""
    from mila_det.ops.selective_scan.triton import _carry
    decays, values = torch.rand(3, 37), torch.randn(3, 37)
    want = torch.zeros_like(values)
    c = torch.zeros(3)
    order = range(36, 0, -1) if reverse else range(36)
    for s in order:
        c = decays[:, s] * c + values[:, s]
        want[:, s - 1 if reverse else s + 1] = c
    torch.testing.assert_close(_carry(decays, values, reverse, block_s=8),
                               want)


@needs_triton()
def test_triton_scan_bf16_inputs_fp32_states():
    """bf16 u / delta / B / C, states in fp32: within bf16 rounding of the
    fp32 reference run on the same (rounded) inputs."""
    args = make_inputs(batch=1, groups=2, per_group=4, n_state=2,
                       length=40, dtype=torch.bfloat16)
    want = naive_selective_scan(*args, delta_softplus=True)
    got = triton_scan(16)(*args, delta_softplus=True)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 1e-3
    dy = torch.randn_like(want)
    g_want = torch.autograd.grad(want, args, dy)
    g_got = torch.autograd.grad(got, args, dy)
    for name, a, b in zip(NAMES, g_got, g_want):
        assert a.dtype == torch.bfloat16, name
        assert rel_err(a, b) < 2e-2, name


def saved_bytes(fn):
    """Bytes the autograd graph of ``fn()`` keeps beyond its inputs' own
    storage, and the number of tensors saved."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@needs_triton()
def test_triton_scan_keeps_one_state_per_segment_and_none_without_grad():
    args = make_inputs(batch=2, groups=1, per_group=3, n_state=2,
                       length=40)
    block_t = 16
    n_seg = -(-40 // block_t)
    scan = triton_scan(block_t)
    inputs = {a.untyped_storage().data_ptr() for a in args}
    saved, y = saved_bytes(lambda: scan(*args, delta_softplus=True))
    extra = sum(t.numel() * t.element_size() for t in saved
                if t.untyped_storage().data_ptr() not in inputs)
    batch, channels, n_state = 2, 3, 2
    assert 0 < extra <= batch * channels * n_state * n_seg * 4
    y.sum().backward()  # and the backward runs on what was kept
    assert all(a.grad is not None for a in args)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            saved, y = saved_bytes(lambda: scan(*args, delta_softplus=True))
        assert saved == [] and not y.requires_grad, mode.__name__


@needs_triton()
def test_triton_scan_refuses_a_tensor_on_another_device():
    u, delta, A, B, C, D, bias = make_inputs(length=10)
    with pytest.raises(ValueError, match='B is on meta'):
        selective_scan(u, delta, A, B.to('meta'), C, D, bias,
                       backend='triton')
    with pytest.raises(ValueError, match='delta_bias is on meta'):
        selective_scan(u, delta, A, B, C, D, bias.to('meta'),
                       backend='triton')


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


@needs_triton()
@pytest.mark.parametrize('reverse', [False, True], ids=['forward', 'reverse'])
def test_in_tile_associative_scan_is_the_recurrence(reverse):
    """The kernels' in-tile scan (``tl.associative_scan`` with ``_combine``)
    solves ``h_t = a_t h_{t-1} + b_t`` from a zero start, right to left when
    reversed: on its own, on one tile."""
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 8, generator=g) + 0.2
    b = torch.randn(2, 8, generator=g)
    pa, pb = torch.empty_like(a), torch.empty_like(b)
    scan_kernel[(1, )](a, b, pa, pb, 2, 8, reverse)
    want_b = torch.zeros_like(b)
    want_a = torch.ones_like(a)
    steps = range(7, -1, -1) if reverse else range(8)
    h, prod = torch.zeros(2), torch.ones(2)
    for t in steps:
        h = a[:, t] * h + b[:, t]
        prod = prod * a[:, t]
        want_b[:, t], want_a[:, t] = h, prod
    torch.testing.assert_close(pb, want_b)
    torch.testing.assert_close(pa, want_a)


@needs_triton()
def test_tiles_follow_the_shapes():
    """The launch wrappers size the tiles: a short sequence runs one
    segment of its length rounded up to a power of 2, a narrow group a
    channel block of its width rounded up; the carry kernel takes one of the
    row counts the kernel report compiles."""
    from mila_det.ops.selective_scan import triton as ss
    assert ss._segments(20, None) == (32, 1)
    assert ss._segments(1, None) == (1, 1)
    assert ss._segments(1000, None) == (ss.BLOCK_T, 8)
    assert ss._segments(1000, 64) == (64, 16)
    assert ss._block_d(ss.FWD_BLOCK_D, 5) == 8
    assert ss._block_d(ss.FWD_BLOCK_D, 96) == ss.FWD_BLOCK_D
    assert {ss._carry_rows(r) for r in range(1, 70000, 97)} == set(
        ss.CARRY_ROWS)
