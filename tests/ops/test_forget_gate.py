"""Forget-gate linear attention: every path (chunked PyTorch, Triton under
the interpreter, the public function on each backend) against the
token-by-token reference, outputs and the gradients of every input."""
import functools

import pytest
import torch
import torch.nn.functional as F

from mila_det.ops import forget_gate_attention as exported
from mila_det.ops.forget_gate import (IMPLS, chunk_forget_gate_attention,
                                      forget_gate_attention,
                                      naive_forget_gate_attention)
from tests.conftest import needs_triton, rel_err

NAMES = ('q', 'k', 'v', 'delta', 'A')
# (length, heads, dk, dv); 56x56 keeps the width small for the chunked
# path's many chunks; 3x7 (odd sizes) and 'segments' (three of the Triton
# kernels' 128-token segments, the last one short) are the Triton shapes:
# Triton's interpreter runs the kernels' own scan one element at a time.
SHAPES = {
    'L1': (1, 2, 4, 6),
    'L2': (2, 2, 4, 6),
    '3x7': (21, 2, 3, 3),
    '7x9': (63, 3, 5, 4),
    'segments': (260, 1, 2, 2),
    '56x56': (56 * 56, 1, 4, 4),
}
TRITON_SHAPES = ('L1', 'L2', '3x7', 'segments')


def make_inputs(length, heads, d_k, d_v, batch=2, dtype=torch.float32,
                zero_decay=False):
    """Positive q, k (elu + 1), positive steps, A = -exp(A_log) with A_log
    near log(1..dk) as the backbone initialises it."""
    g = torch.Generator().manual_seed(length * 131 + heads * 7 + d_k)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q = F.elu(randn(batch, length, heads * d_k)) + 1
    k = F.elu(randn(batch, length, heads * d_k)) + 1
    v = randn(batch, length, heads * d_v)
    # steps around 0.02-0.2: memories from a few to ~50 tokens, so states
    # are carried across the chunk boundaries of the fast paths
    delta = F.softplus(randn(batch, length, heads * d_v) - 3)
    a_log = torch.arange(1, d_k + 1, dtype=torch.float64).log().expand(
        heads * d_v, d_k) + 0.1 * randn(heads * d_v, d_k)
    A = torch.zeros_like(a_log) if zero_decay else -a_log.exp()
    return [t.to(dtype).requires_grad_() for t in (q, k, v, delta, A)]


@functools.lru_cache(maxsize=None)
def reference(shape, normalize, scale_input):
    """The naive result and its input gradients for a random upstream
    gradient (computed once per case, shared by all paths)."""
    args = make_inputs(*SHAPES[shape])
    heads = SHAPES[shape][1]
    out = naive_forget_gate_attention(*args, heads, normalize=normalize,
                                      scale_input=scale_input)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, args, dy)
    return args, heads, out.detach(), dy, grads


def err(got, want) -> float:
    """Max abs error relative to the reference's scale, floored at 1 (with
    one token and the normaliser on, ``y = v`` exactly, so the gradients of
    q and k are rounding noise around zero)."""
    scale = max(want.double().abs().max().item(), 1.0)
    return (got.double() - want.double()).abs().max().item() / scale


def triton_path(*args, **kwargs):
    from mila_det.ops.forget_gate.triton import triton_forget_gate_attention
    return triton_forget_gate_attention(*args, **kwargs)


PATHS = {
    'chunk': chunk_forget_gate_attention,
    'triton': triton_path,
    'public-naive': functools.partial(forget_gate_attention,
                                      backend='naive'),
    'public-torch': functools.partial(forget_gate_attention,
                                      backend='torch'),
    'public-triton': functools.partial(forget_gate_attention,
                                       backend='triton'),
}


COMBOS = [(True, False), (True, True), (False, False), (False, True)]
# The Triton paths cost seconds a call in the interpreter: every
# normalize / scale_input combination on the odd map, two elsewhere (the
# default, normalised and unscaled, and its opposite).
TRITON_COMBOS = {'3x7': COMBOS}


def cases():
    for path in PATHS:
        marks = needs_triton() if 'triton' in path else ()
        for shape in SHAPES:
            combos = COMBOS
            if path == 'triton':
                combos = (TRITON_COMBOS.get(shape, COMBOS[::3])
                          if shape in TRITON_SHAPES else [])
            elif path == 'public-triton':
                combos = COMBOS[::3] if shape == '3x7' else []
            elif path == 'public-naive' and shape == '56x56':
                combos = []  # the reference itself, seconds a call
            for normalize, scale_input in combos:
                yield pytest.param(
                    path, shape, normalize, scale_input, marks=marks,
                    id=f'{path}-{shape}-{"norm" if normalize else "nonorm"}'
                    f'-{"scaled" if scale_input else "unscaled"}')


@pytest.mark.parametrize('path,shape,normalize,scale_input', cases())
def test_matches_reference(path, shape, normalize, scale_input):
    args, heads, want, dy, g_want = reference(shape, normalize, scale_input)
    got = PATHS[path](*args, heads, normalize=normalize,
                      scale_input=scale_input)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert err(got, want) < 2e-5
    g_got = torch.autograd.grad(got, args, dy)
    for name, a, b in zip(NAMES, g_got, g_want):
        assert a.shape == b.shape, name
        assert err(a, b) < 5e-5, name


def test_reference_definition():
    """The reference itself, unrolled by hand for two tokens of one head."""
    q, k, v, delta, A = (t.detach() for t in make_inputs(2, 1, 3, 2))
    for scale_input in (False, True):
        w = delta * v if scale_input else v
        s1 = k[:, 0, :, None] * w[:, 0, None, :]  # [B, dk, dv]
        decay = torch.exp(delta[:, 1, None, :] * A.t())  # [B, dk, dv]
        s2 = decay * s1 + k[:, 1, :, None] * w[:, 1, None, :]
        z1, z2 = k[:, 0], k[:, 0] + k[:, 1]
        y = torch.stack([
            torch.einsum('bs,bsc->bc', q[:, 0], s1) /
            ((q[:, 0] * z1).sum(-1, keepdim=True) + 1e-6),
            torch.einsum('bs,bsc->bc', q[:, 1], s2) /
            ((q[:, 1] * z2).sum(-1, keepdim=True) + 1e-6)], 1)
        got = naive_forget_gate_attention(q, k, v, delta, A, 1,
                                          scale_input=scale_input)
        torch.testing.assert_close(got, y)


@pytest.mark.parametrize('scale_input', [False, True],
                         ids=['unscaled', 'scaled'])
@pytest.mark.parametrize('normalize', [True, False],
                         ids=['norm', 'nonorm'])
@pytest.mark.parametrize('fn', [naive_forget_gate_attention,
                                chunk_forget_gate_attention],
                         ids=['naive', 'chunk'])
def test_gradcheck_float64(fn, normalize, scale_input):
    args = [t.detach().double().requires_grad_()
            for t in make_inputs(5, 2, 2, 3, batch=1)]
    assert torch.autograd.gradcheck(
        lambda *a: fn(*a, 2, normalize=normalize, scale_input=scale_input),
        args)


def quadratic_linear_attention(q, k, v, heads, normalize, eps=1e-6):
    """Causal linear attention the quadratic way, per head."""
    batch, length = q.shape[:2]
    q4 = q.reshape(batch, length, heads, -1).transpose(1, 2).double()
    k4 = k.reshape(batch, length, heads, -1).transpose(1, 2).double()
    v4 = v.reshape(batch, length, heads, -1).transpose(1, 2).double()
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    scores = (q4 @ k4.transpose(-1, -2)) * mask
    out = scores @ v4
    if normalize:
        out = out / (scores.sum(-1, keepdim=True) + eps)
    return out.transpose(1, 2).reshape(batch, length, -1)


@pytest.mark.parametrize('normalize', [True, False],
                         ids=['norm', 'nonorm'])
@pytest.mark.parametrize('backend', [
    'naive', 'torch', pytest.param('triton', marks=needs_triton())])
def test_no_decay_is_causal_linear_attention(backend, normalize):
    """With A = 0 nothing decays: plain causal linear attention."""
    q, k, v, delta, A = (t.detach() for t in
                         make_inputs(21, 2, 3, 3, zero_decay=True))
    got = forget_gate_attention(q, k, v, delta, A, 2, normalize=normalize,
                                backend=backend)
    want = quadratic_linear_attention(q, k, v, 2, normalize)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16],
                         ids=['bf16', 'fp16'])
def test_half_inputs_return_their_dtype(dtype):
    args = [t.detach().to(dtype) for t in make_inputs(63, 3, 5, 4)]
    got = forget_gate_attention(*args, 3, backend='torch')
    assert got.dtype == dtype
    want = naive_forget_gate_attention(*[t.float() for t in args], 3)
    assert rel_err(got, want) < 1e-2


def test_float64_stays_float64_and_triton_refuses_it():
    args = [t.detach().double() for t in make_inputs(7, 2, 2, 3)]
    got = forget_gate_attention(*args, 2, backend='torch')
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, naive_forget_gate_attention(*args, 2))
    with pytest.raises(RuntimeError, match='float64'):
        forget_gate_attention(*args, 2, backend='triton')


def test_exports():
    assert exported is forget_gate_attention
    assert set(IMPLS) == {'naive', 'torch', 'triton'}
    assert IMPLS['torch'] is chunk_forget_gate_attention
    assert IMPLS['naive'] is naive_forget_gate_attention


def _bad(**changes):
    """Valid arguments (2 heads of dk = 4, dv = 3) with some replaced."""
    args = dict(zip(NAMES, (t.detach() for t in make_inputs(6, 2, 4, 3))))
    args['num_heads'] = 2
    args.update(changes)
    return args


@pytest.mark.parametrize('args,match', [
    (_bad(q=torch.rand(2, 6)), r'\bq\b'),
    (_bad(k=torch.rand(2, 6, 7)), r'\bk\b'),
    (_bad(v=torch.rand(2, 5, 6)), r'\bv\b'),
    (_bad(v=torch.rand(6, 6)), r'\bv\b'),
    (_bad(delta=torch.rand(2, 6, 4)), r'\bdelta\b'),
    (_bad(A=torch.rand(6, 3)), r'\bA\b'),
    (_bad(A=torch.rand(6)), r'\bA\b'),
    (_bad(num_heads=3), 'num_heads'),
    (_bad(num_heads=0), 'num_heads'),
    (_bad(q=torch.ones(2, 6, 8, dtype=torch.int64)), 'int64'),
    (_bad(delta=torch.ones(2, 6, 6, dtype=torch.int32)), 'int32'),
    (_bad(A=torch.zeros(6, 4, dtype=torch.complex64)), 'complex64'),
], ids=['q-2d', 'k-shape', 'v-length', 'v-2d', 'delta-shape', 'A-shape',
        'A-1d', 'heads-not-dividing', 'heads-zero', 'q-int64',
        'delta-int32', 'A-complex'])
def test_bad_input_raises(args, match):
    with pytest.raises(ValueError, match=match):
        forget_gate_attention(**args)


def test_num_heads_dividing_q_but_not_v():
    args = _bad(v=torch.rand(2, 6, 5), delta=torch.rand(2, 6, 5),
                A=torch.rand(5, 4))
    with pytest.raises(ValueError, match='num_heads=2 must divide'):
        forget_gate_attention(**args)
