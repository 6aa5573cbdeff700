"""Export: the scan as PyTorch that exporters can trace.

Every ``mila_det`` op lowers to its definition when exported (see
:mod:`mila_det.ops._op`); the scans' definitions are token loops, so their
ops lower to :func:`export_selective_scan` instead: the same recurrence on
:func:`chunked_recurrence`, a fixed number of element-wise steps per chunk
and one ``mila_det::linear_recurrence`` over the chunks. The stock exporter
(``torch.onnx.export(..., dynamo=True)``) unrolls that one as well
(:func:`unrolled_recurrence`, fixed sizes); ``tools/deploy/export_onnx.py``
keeps it and lowers it to an ONNX ``Scan`` (dynamic sizes; the graph and its
cost are in ``docs/deploy.md``).
"""
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._op import EXPORT_LOWERINGS, FastPathOp
from .selective_scan.recurrence import linear_recurrence as chunk_recurrence

__all__ = ['export_decompositions', 'chunked_recurrence',
           'unrolled_recurrence', 'export_selective_scan', 'EXPORT_CHUNK',
           'linear_recurrence']


# ---------------------------------------------------------------------------
# linear_recurrence(a, b) -> h with h[t] = a[t] * h[t-1] + b[t] along dim 0:
# the sequential core of the exported scan (an ONNX Scan in the graph).
# ---------------------------------------------------------------------------
def _recurrence_forward(a: Tensor, b: Tensor) -> Tuple[Tensor, tuple]:
    """``h[t] = a[t] * h[t-1] + b[t]`` from ``h[-1] = 0``, for ``a, b: [T,
    M]``, by the chunked recurrence of
    :func:`mila_det.ops.selective_scan.linear_recurrence`."""
    return chunk_recurrence(a.contiguous(), b.contiguous()), ()


def _recurrence_backward(grad: Tensor, saved: List[Tensor], a: Tensor,
                         b: Tensor) -> tuple:
    (h, ) = saved
    # g[t] = grad[t] + a[t+1] g[t+1]: the same recurrence, run backwards.
    a_next = torch.cat([a[1:], a.new_zeros(1, *a.shape[1:])])
    g = chunk_recurrence(a_next.flip(0).contiguous(),
                         grad.flip(0).contiguous()).flip(0)
    h_prev = torch.cat([h.new_zeros(1, *h.shape[1:]), h[:-1]])
    return g * h_prev, g


def _recurrence_fake(a: Tensor, b: Tensor) -> Tuple[Tensor, tuple]:
    return torch.empty_like(b, memory_format=torch.contiguous_format), ()


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
    (default ``mila_det::linear_recurrence``, an ONNX ``Scan`` of
    ``ceil(L / chunk)`` steps); a second unrolled pass gives every state.
    Only products of decays in ``(0, 1]`` and sums of bounded terms appear:
    no division, no exp of a sum.

    Returns:
        Tensor: ``[L, M]``.
    """
    carry = carry or linear_recurrence
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


linear_recurrence = FastPathOp('linear_recurrence', _recurrence_forward,
                               _recurrence_backward, _recurrence_fake,
                               grads_for=('a', 'b'), save_output=True,
                               definition=unrolled_recurrence)


def export_decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """PyTorch's default export decompositions plus every ``mila_det`` op's
    lowering but ``linear_recurrence``'s, for
    ``ExportedProgram.run_decompositions``: afterwards the graph holds only
    ATen ops and ``mila_det::linear_recurrence`` (over chunks)."""
    table = torch.export.default_decompositions()
    table.update({op: fn for op, fn in EXPORT_LOWERINGS.items()
                  if op != linear_recurrence.default})
    return table
