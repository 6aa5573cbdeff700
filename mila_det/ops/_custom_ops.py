"""The operators as ``torch.library`` custom ops (namespace ``mila_det``), so
that ``torch.compile``, ``torch.export`` and the ONNX exporter see one node
per operator instead of tracing into Python autograd Functions and Triton
launches.

Eager code is untouched: the public functions (``linear_attention``,
``cross_selective_scan``, ``cross_scan``, ``cross_merge``,
``forget_gate_attention``) call
:func:`~mila_det.ops._dispatch.dispatch` directly, and only while a graph is
being captured (``torch.compiler.is_compiling()``) do they call
``torch.ops.mila_det.<op>`` instead. Each op here has

- a real implementation: the same dispatch (Triton on CUDA, the PyTorch
  paths elsewhere), so a compiled model runs the same kernels;
- a fake implementation: the output's shape and dtype, for tracing;
- an autograd registration whose backward is a second op,
  ``<op>_backward``, that recomputes the forward under autograd and returns
  ``torch.autograd.grad`` of it (one node in a compiled backward graph too).

For export to plain ONNX, :func:`export_decompositions` maps every op to a
traceable PyTorch composition without complex numbers and without Python
loops over symbolic sizes (``ExportedProgram.run_decompositions``); the one
op those compositions keep, ``mila_det::linear_recurrence`` over chunks, is
lowered to an ONNX ``Scan`` by ``tools/deploy/export_onnx.py`` (see
``docs/deploy.md`` for the resulting graph and its cost). The same
compositions are registered as the ops' decompositions for the stock
``torch.onnx.export(..., dynamo=True)`` (see the end of this module), with
the recurrence over chunks unrolled (:func:`unrolled_recurrence`).
"""
import contextlib
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import dispatch
from .cross_scan import MERGE_IMPLS, SCAN_IMPLS
from .cross_scan.naive import naive_cross_merge, naive_cross_scan
from .cross_selective_scan import dispatch_cross_selective_scan
from .cross_selective_scan.naive import (compose_cross_selective_scan,
                                         scan_parameters)
from .forget_gate import dispatch_forget_gate_attention
from .forget_gate.naive import causal_normaliser
from .linear_attention import dispatch_linear_attention
from .linear_attention.naive import linear_attention_fp32
from .selective_scan.chunk import linear_recurrence as chunk_recurrence

__all__ = ['export_decompositions', 'chunked_recurrence', 'EXPORT_CHUNK']

_C = torch._C
# The keys torch.library's autograd wrapper excludes while an op runs.
_AUTOGRAD_KEYS = (_C.DispatchKeySet(_C.DispatchKey.AutogradFunctionality)
                  | _C.DispatchKeySet(_C.DispatchKey.AutogradOther)
                  | _C.DispatchKeySet(_C.DispatchKey.AutogradNestedTensor))


@contextlib.contextmanager
def _autograd_enabled() -> Iterator[None]:
    """Record autograd inside an op's implementation.

    ``torch.library`` runs an op's implementation below the autograd
    dispatch keys; a backward op that recomputes its forward needs them back
    (autocast stays excluded, so the recomputation matches the forward).
    """
    exclude = _C._dispatch_tls_local_exclude_set() - _AUTOGRAD_KEYS
    with _C._ForceDispatchKeyGuard(_C._dispatch_tls_local_include_set(),
                                   exclude), torch.enable_grad():
        yield


def _recompute_grads(run: Callable[..., Tensor], grad: Tensor,
                     inputs: List[Tensor], rest: tuple) -> List[Tensor]:
    """Gradients of ``run(*inputs, *rest)`` against ``inputs`` for the
    output gradient ``grad`` (zeros where an input does not contribute)."""
    with _autograd_enabled():
        leaves = [t.detach().requires_grad_(t.is_floating_point())
                  for t in inputs]
        out = run(*leaves, *rest)
        wrt = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad.to(out.dtype),
                                         allow_unused=True))
    result = []
    for t in leaves:
        g = next(grads) if t.requires_grad else None
        result.append(torch.zeros_like(t) if g is None else g.detach())
    return result


# ---------------------------------------------------------------------------
# linear_attention(q, k, v, rope, num_heads, eps, backend) -> [B, N, C]
# ---------------------------------------------------------------------------
@torch.library.custom_op('mila_det::linear_attention', mutates_args=())
def linear_attention_op(q: Tensor, k: Tensor, v: Tensor, rope: Tensor,
                        num_heads: int, eps: float,
                        backend: Optional[str] = None) -> Tensor:
    """MILA linear attention (see :func:`mila_det.ops.linear_attention`);
    ``rope: [N, C/2, 2]``."""
    return dispatch_linear_attention(q, k, v, num_heads, rope, eps,
                                     backend).contiguous()


@linear_attention_op.register_fake
def _(q, k, v, rope, num_heads, eps, backend=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op('mila_det::linear_attention_backward',
                         mutates_args=())
def linear_attention_backward_op(grad: Tensor, q: Tensor, k: Tensor,
                                 v: Tensor, rope: Tensor, num_heads: int,
                                 eps: float, backend: Optional[str] = None
                                 ) -> List[Tensor]:
    """``[dq, dk, dv]`` of :func:`linear_attention_op` (the table is a
    constant of the grid and gets none)."""

    def run(q, k, v, rope, num_heads, eps, backend):
        return dispatch_linear_attention(q, k, v, num_heads, rope, eps,
                                         backend)

    return _recompute_grads(run, grad, [q, k, v],
                            (rope, num_heads, eps, backend))


@linear_attention_backward_op.register_fake
def _(grad, q, k, v, rope, num_heads, eps, backend=None):
    return [torch.empty_like(t) for t in (q, k, v)]


def _linear_attention_setup(ctx, inputs, output) -> None:
    q, k, v, rope, num_heads, eps, backend = inputs
    ctx.save_for_backward(q, k, v, rope)
    ctx.args = (num_heads, eps, backend)


def _linear_attention_backward(ctx, grad):
    q, k, v, rope = ctx.saved_tensors
    dq, dk, dv = torch.ops.mila_det.linear_attention_backward(
        grad, q, k, v, rope, *ctx.args)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd('mila_det::linear_attention',
                                _linear_attention_backward,
                                setup_context=_linear_attention_setup)


# ---------------------------------------------------------------------------
# cross_selective_scan(x, x_proj_weight, dt_projs_weight, dt_projs_bias,
#                      A_logs, Ds, backend) -> [B, H, W, Di]
# ---------------------------------------------------------------------------
def _scan_dtype(x: Tensor, A_logs: Tensor) -> torch.dtype:
    """The scan's output dtype: fp32, or fp64 for float64 inputs."""
    return torch.promote_types(torch.promote_types(x.dtype, A_logs.dtype),
                               torch.float32)


@torch.library.custom_op('mila_det::cross_selective_scan', mutates_args=())
def cross_selective_scan_op(x: Tensor, x_proj_weight: Tensor,
                            dt_projs_weight: Tensor, dt_projs_bias: Tensor,
                            A_logs: Tensor, Ds: Tensor,
                            backend: Optional[str] = None) -> Tensor:
    """VMamba's four-route selective scan (see
    :func:`mila_det.ops.cross_selective_scan`)."""
    y = dispatch_cross_selective_scan(x, x_proj_weight, dt_projs_weight,
                                      dt_projs_bias, A_logs, Ds, backend)
    return y.to(_scan_dtype(x, A_logs)).contiguous()


@cross_selective_scan_op.register_fake
def _(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
      backend=None):
    b, inner, h, w = x.shape
    return x.new_empty((b, h, w, inner), dtype=_scan_dtype(x, A_logs))


@torch.library.custom_op('mila_det::cross_selective_scan_backward',
                         mutates_args=())
def cross_selective_scan_backward_op(grad: Tensor, x: Tensor,
                                     x_proj_weight: Tensor,
                                     dt_projs_weight: Tensor,
                                     dt_projs_bias: Tensor, A_logs: Tensor,
                                     Ds: Tensor,
                                     backend: Optional[str] = None
                                     ) -> List[Tensor]:
    """Gradients of :func:`cross_selective_scan_op` for its six tensors."""
    return _recompute_grads(
        dispatch_cross_selective_scan, grad,
        [x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds],
        (backend, ))


@cross_selective_scan_backward_op.register_fake
def _(grad, x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds,
      backend=None):
    return [torch.empty_like(t) for t in (x, x_proj_weight, dt_projs_weight,
                                           dt_projs_bias, A_logs, Ds)]


def _cross_selective_scan_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:6])
    ctx.backend = inputs[6]


def _cross_selective_scan_backward(ctx, grad):
    grads = torch.ops.mila_det.cross_selective_scan_backward(
        grad, *ctx.saved_tensors, ctx.backend)
    return (*grads, None)


torch.library.register_autograd('mila_det::cross_selective_scan',
                                _cross_selective_scan_backward,
                                setup_context=_cross_selective_scan_setup)


# ---------------------------------------------------------------------------
# forget_gate_attention(q, k, v, delta, A, num_heads, eps, normalize,
#                       scale_input, backend) -> [B, L, H*dv]
# ---------------------------------------------------------------------------
@torch.library.custom_op('mila_det::forget_gate_attention', mutates_args=())
def forget_gate_attention_op(q: Tensor, k: Tensor, v: Tensor, delta: Tensor,
                             A: Tensor, num_heads: int, eps: float,
                             normalize: bool, scale_input: bool,
                             backend: Optional[str] = None) -> Tensor:
    """Causal linear attention with Mamba's forget gate (see
    :func:`mila_det.ops.forget_gate_attention`)."""
    return dispatch_forget_gate_attention(q, k, v, delta, A, num_heads, eps,
                                          normalize, scale_input,
                                          backend).to(q.dtype).contiguous()


@forget_gate_attention_op.register_fake
def _(q, k, v, delta, A, num_heads, eps, normalize, scale_input,
      backend=None):
    return torch.empty_like(v, dtype=q.dtype,
                            memory_format=torch.contiguous_format)


@torch.library.custom_op('mila_det::forget_gate_attention_backward',
                         mutates_args=())
def forget_gate_attention_backward_op(grad: Tensor, q: Tensor, k: Tensor,
                                      v: Tensor, delta: Tensor, A: Tensor,
                                      num_heads: int, eps: float,
                                      normalize: bool, scale_input: bool,
                                      backend: Optional[str] = None
                                      ) -> List[Tensor]:
    """Gradients of :func:`forget_gate_attention_op` for its five
    tensors."""
    return _recompute_grads(dispatch_forget_gate_attention, grad,
                            [q, k, v, delta, A],
                            (num_heads, eps, normalize, scale_input,
                             backend))


@forget_gate_attention_backward_op.register_fake
def _(grad, q, k, v, delta, A, num_heads, eps, normalize, scale_input,
      backend=None):
    return [torch.empty_like(t) for t in (q, k, v, delta, A)]


def _forget_gate_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:5])
    ctx.args = inputs[5:]


def _forget_gate_backward(ctx, grad):
    grads = torch.ops.mila_det.forget_gate_attention_backward(
        grad, *ctx.saved_tensors, *ctx.args)
    return (*grads, None, None, None, None, None)


torch.library.register_autograd('mila_det::forget_gate_attention',
                                _forget_gate_backward,
                                setup_context=_forget_gate_setup)


# ---------------------------------------------------------------------------
# cross_scan(x) -> [B, 4, C, L] and cross_merge(y, H, W) -> [B, C, L]: each
# the other's adjoint, so each one's backward is the other op.
# ---------------------------------------------------------------------------
@torch.library.custom_op('mila_det::cross_scan', mutates_args=())
def cross_scan_op(x: Tensor, backend: Optional[str] = None) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, 4, C, H*W]`` (see
    :func:`mila_det.ops.cross_scan`)."""
    return dispatch('cross_scan', x, backend, SCAN_IMPLS)(x).contiguous()


@cross_scan_op.register_fake
def _(x, backend=None):
    b, c, h, w = x.shape
    return x.new_empty((b, 4, c, h * w))


@torch.library.custom_op('mila_det::cross_merge', mutates_args=())
def cross_merge_op(y: Tensor, height: int, width: int,
                   backend: Optional[str] = None) -> Tensor:
    """``[B, 4, C, H*W]`` -> ``[B, C, H*W]`` (see
    :func:`mila_det.ops.cross_merge`)."""
    run = dispatch('cross_merge', y, backend, MERGE_IMPLS)
    return run(y, height, width).contiguous()


@cross_merge_op.register_fake
def _(y, height, width, backend=None):
    return y.new_empty((y.shape[0], y.shape[2], y.shape[3]))


def _cross_scan_setup(ctx, inputs, output) -> None:
    ctx.hw, ctx.backend = inputs[0].shape[2:], inputs[1]


def _cross_scan_backward(ctx, grad):
    h, w = ctx.hw
    dx = torch.ops.mila_det.cross_merge(grad, h, w, ctx.backend)
    return dx.view(dx.shape[0], dx.shape[1], h, w), None


def _cross_merge_setup(ctx, inputs, output) -> None:
    ctx.hw, ctx.backend = inputs[1:3], inputs[3]


def _cross_merge_backward(ctx, grad):
    h, w = ctx.hw
    grad = grad.reshape(grad.shape[0], grad.shape[1], h, w)
    return torch.ops.mila_det.cross_scan(grad, ctx.backend), None, None, None


torch.library.register_autograd('mila_det::cross_scan', _cross_scan_backward,
                                setup_context=_cross_scan_setup)
torch.library.register_autograd('mila_det::cross_merge',
                                _cross_merge_backward,
                                setup_context=_cross_merge_setup)


# ---------------------------------------------------------------------------
# linear_recurrence(a, b) -> h with h[t] = a[t] * h[t-1] + b[t] along dim 0:
# the sequential core of the exported scan (an ONNX Scan in the graph).
# ---------------------------------------------------------------------------
@torch.library.custom_op('mila_det::linear_recurrence', mutates_args=())
def linear_recurrence_op(a: Tensor, b: Tensor) -> Tensor:
    """``h[t] = a[t] * h[t-1] + b[t]`` from ``h[-1] = 0``, for ``a, b: [T,
    M]``, by the chunked recurrence of
    :func:`mila_det.ops.selective_scan.linear_recurrence`."""
    return chunk_recurrence(a.contiguous(), b.contiguous())


@linear_recurrence_op.register_fake
def _(a, b):
    return torch.empty_like(b, memory_format=torch.contiguous_format)


def _linear_recurrence_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output)


def _linear_recurrence_backward(ctx, grad):
    a, h = ctx.saved_tensors
    # g[t] = grad[t] + a[t+1] g[t+1]: the same recurrence, run backwards.
    a_next = torch.cat([a[1:], a.new_zeros(1, *a.shape[1:])])
    g = torch.ops.mila_det.linear_recurrence(a_next.flip(0), grad.flip(0))
    g = g.flip(0)
    h_prev = torch.cat([h.new_zeros(1, *h.shape[1:]), h[:-1]])
    return g * h_prev, g


torch.library.register_autograd('mila_det::linear_recurrence',
                                _linear_recurrence_backward,
                                setup_context=_linear_recurrence_setup)


# ---------------------------------------------------------------------------
# Export: plain-PyTorch decompositions and the ONNX lowering of the scan.
# ---------------------------------------------------------------------------
# Tokens per chunk of the exported recurrence: the graph unrolls two passes
# of this many steps, and the ONNX Scan runs over L / EXPORT_CHUNK chunks.
EXPORT_CHUNK = 16


def chunked_recurrence(a: Tensor, b: Tensor, chunk: int = EXPORT_CHUNK,
                       carry: Optional[Callable] = None) -> Tensor:
    """``h[t] = a[t] * h[t-1] + b[t]`` along dim 0 of ``a, b: [L, M]``,
    traceable for a symbolic ``L``.

    The tokens are padded to whole chunks of ``chunk`` (a constant); a pass
    unrolled over the ``chunk`` steps gives every chunk's end state from a
    zero start and the product of its decays (all chunks at once); the
    states entering the chunks come from ``carry`` over the chunks
    (default :func:`linear_recurrence_op`, an ONNX ``Scan`` of
    ``ceil(L / chunk)`` steps); a second unrolled pass gives every state.
    Only products of decays in ``(0, 1]`` and sums of bounded terms appear:
    no division, no exp of a sum.

    Returns:
        Tensor: ``[L, M]``.
    """
    carry = carry or torch.ops.mila_det.linear_recurrence
    length, width = a.shape
    n_chunks = (length + chunk - 1) // chunk
    pad = n_chunks * chunk - length
    a_steps = F.pad(a, (0, 0, 0, pad), value=1.0).view(
        n_chunks, chunk, width).unbind(1)
    b_steps = F.pad(b, (0, 0, 0, pad)).view(n_chunks, chunk,
                                              width).unbind(1)
    end, decay = b_steps[0], a_steps[0]
    for a_t, b_t in zip(a_steps[1:], b_steps[1:]):
        end = a_t * end + b_t
        decay = decay * a_t
    ends = carry(decay, end)
    state = torch.cat([ends.new_zeros(1, width), ends[:-1]])
    states = []
    for a_t, b_t in zip(a_steps, b_steps):
        state = a_t * state + b_t
        states.append(state)
    return torch.stack(states, 1).reshape(n_chunks * chunk, width)[:length]


def unrolled_recurrence(a: Tensor, b: Tensor,
                        chunk: int = EXPORT_CHUNK) -> Tensor:
    """:func:`chunked_recurrence` with the carry over the chunks solved the
    same way, recursively, down to at most ``chunk`` steps: plain ATen
    element-wise ops only (``2 * chunk`` steps per level, ``log_chunk(L)``
    levels), for a fixed ``L``. This is how ``mila_det::linear_recurrence``
    lowers when an exporter has no translation of its own for it."""
    length, width = a.shape
    if length <= chunk:
        state, states = a.new_zeros(width), []
        for t in range(length):
            state = a[t] * state + b[t]
            states.append(state)
        return torch.stack(states) if states else b.clone()
    return chunked_recurrence(a, b, chunk, carry=unrolled_recurrence)


def export_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                          C: Tensor, D: Optional[Tensor] = None,
                          delta_bias: Optional[Tensor] = None,
                          delta_softplus: bool = False,
                          scale_input: bool = True) -> Tensor:
    """The selective scan of
    :func:`~mila_det.ops.selective_scan.naive.naive_selective_scan` (same
    arguments and result) on :func:`chunked_recurrence`."""
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    per_group = channels // groups
    ct = torch.promote_types(u.dtype, torch.float32)
    u, delta, A = u.to(ct), delta.to(ct), A.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)

    def per_channel(t: Tensor) -> Tensor:  # [B, G, N, L] -> [B, Dch, N, L]
        return t.to(ct)[:, :, None].expand(
            batch, groups, per_group, n_state, length).reshape(
                batch, channels, n_state, length)

    decay = torch.exp(delta[:, :, None, :] * A[None, :, :, None])
    drive = per_channel(B) * u[:, :, None, :]
    if scale_input:
        drive = delta[:, :, None, :] * drive

    def tokens(t: Tensor) -> Tensor:  # [B, Dch, N, L] -> [L, B*Dch*N]
        return t.permute(3, 0, 1, 2).reshape(length, -1)

    h = chunked_recurrence(tokens(decay), tokens(drive))
    h = h.reshape(length, batch, channels, n_state).permute(1, 2, 3, 0)
    y = (h * per_channel(C)).sum(2)
    if D is not None:
        y = y + D.to(ct)[None, :, None] * u
    return y


def export_cross_selective_scan(x: Tensor, x_proj_weight: Tensor,
                                dt_projs_weight: Tensor,
                                dt_projs_bias: Tensor, A_logs: Tensor,
                                Ds: Tensor,
                                backend: Optional[str] = None) -> Tensor:
    """``mila_det::cross_selective_scan`` as traceable PyTorch: the
    definition's composition (:mod:`~.cross_selective_scan.naive`) with
    :func:`export_selective_scan`."""
    y = compose_cross_selective_scan(x, x_proj_weight, dt_projs_weight,
                                     dt_projs_bias, A_logs, Ds,
                                     naive_cross_scan, export_selective_scan,
                                     naive_cross_merge)
    return y.to(_scan_dtype(x, A_logs)).contiguous()


def export_linear_attention(q: Tensor, k: Tensor, v: Tensor, rope: Tensor,
                            num_heads: int, eps: float,
                            backend: Optional[str] = None) -> Tensor:
    """``mila_det::linear_attention`` as traceable PyTorch: the definition
    (:mod:`~.linear_attention.naive`, real arithmetic throughout)."""
    return linear_attention_fp32(q, k, v, num_heads, rope, eps)


def export_forget_gate_attention(q: Tensor, k: Tensor, v: Tensor,
                                 delta: Tensor, A: Tensor, num_heads: int,
                                 eps: float, normalize: bool,
                                 scale_input: bool,
                                 backend: Optional[str] = None) -> Tensor:
    """``mila_det::forget_gate_attention`` as traceable PyTorch: the
    numerator is :func:`export_selective_scan` with ``u = v``, ``B = k``,
    ``C = q`` and one group per head; the normaliser a cumulative sum."""
    batch, length, qk_ch = q.shape
    d_k = qk_ch // num_heads
    ct = torch.promote_types(q.dtype, torch.float32)

    def groups(t: Tensor) -> Tensor:  # [B, L, H*dk] -> [B, H, dk, L]
        return t.to(ct).reshape(batch, length, num_heads,
                                d_k).permute(0, 2, 3, 1)

    y = export_selective_scan(v.to(ct).transpose(1, 2),
                              delta.to(ct).transpose(1, 2), A.to(ct),
                              groups(k), groups(q),
                              scale_input=scale_input).transpose(1, 2)
    if normalize:
        den = causal_normaliser(q, k, num_heads, eps, ct)
        y = (y.reshape(batch, length, num_heads, -1) / den).reshape(
            batch, length, -1)
    return y.to(q.dtype).contiguous()


def export_cross_scan(x: Tensor, backend: Optional[str] = None) -> Tensor:
    return naive_cross_scan(x)


def export_cross_merge(y: Tensor, height: int, width: int,
                       backend: Optional[str] = None) -> Tensor:
    return naive_cross_merge(y, height, width)


def export_decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """PyTorch's default export decompositions plus one traceable PyTorch
    composition per ``mila_det`` op, for
    ``ExportedProgram.run_decompositions``: afterwards the graph holds only
    ATen ops and ``mila_det::linear_recurrence`` (over chunks)."""
    table = torch.export.default_decompositions()
    ops = torch.ops.mila_det
    table[ops.linear_attention.default] = export_linear_attention
    table[ops.cross_selective_scan.default] = export_cross_selective_scan
    table[ops.cross_scan.default] = export_cross_scan
    table[ops.cross_merge.default] = export_cross_merge
    table[ops.forget_gate_attention.default] = export_forget_gate_attention
    return table


# ---------------------------------------------------------------------------
# Lowering for the stock exporter.
# ---------------------------------------------------------------------------
# ``torch.onnx.export(model, args, dynamo=True)`` decomposes every op that
# has no ONNX translation with the decompositions it finds in
# ``torch._decomp.decomposition_table`` (or a CompositeImplicitAutograd
# kernel). A CompositeImplicitAutograd kernel would also be inlined by
# torch.compile (so compiled code would run the definition, not the fast
# paths), and torch.library has no public call that registers a
# decomposition for export only; so the decompositions go into that table,
# which torch.compile does not apply to custom ops at static shapes.
# ``tools/deploy/export_onnx.py`` still keeps ``linear_recurrence`` (an ONNX
# Scan, for dynamic sizes) by giving it a translation.
def _register_export_lowerings() -> None:
    from torch._decomp import register_decomposition
    ops = torch.ops.mila_det
    for op, fn in ((ops.linear_attention.default, export_linear_attention),
                   (ops.cross_selective_scan.default,
                    export_cross_selective_scan),
                   (ops.cross_scan.default, export_cross_scan),
                   (ops.cross_merge.default, export_cross_merge),
                   (ops.forget_gate_attention.default,
                    export_forget_gate_attention),
                   (ops.linear_recurrence.default, unrolled_recurrence)):
        register_decomposition(op)(fn)


_register_export_lowerings()
