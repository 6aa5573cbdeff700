"""Chunked PyTorch path of the selective scan (any device; ``auto`` uses it
off CUDA).

It works token-major: ``u, delta: [B, G, L, Dg]`` and ``B, C: [B, G, L,
N]``, so every time step of a group is one contiguous row of its channels
and the element-wise work runs on plain contiguous tensors, mostly in place.

The recurrence ``h_t = a_t * h_{t-1} + b_t`` runs in chunks of about
``sqrt(L) / 2`` tokens (:func:`.recurrence.linear_recurrence`), with the same
sums in fp32 (only their association differs); the chunk is half of
``sqrt(L)`` so that each step touches a cache-sized slice
(docs/benchmarks.md). The backward
pass is the same recurrence run in reverse, with the states recomputed
rather than stored. ``reverse=True`` scans from the last token to the first,
so a route that reads a sequence backwards needs no flipped copy of it.

With a state size ``N > 1`` (the forget gate's ``N = 32``) the decays and
states are ``N`` times the activations, too big to pass over several times:
there the forward runs :func:`_blocked_scan` instead, which forms the decays
for one block of tokens at a time, in cache, and steps the states over them
token by token (docs/benchmarks.md, "The forget gate's CPU path").
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._export import export_selective_scan
from .._op import FastPathOp
from .recurrence import linear_recurrence


def _compute_dtype(u: Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (gradcheck)."""
    return torch.promote_types(u.dtype, torch.float32)


def _per_channel(x: Tensor, u: Tensor, ct: torch.dtype) -> Tensor:
    """A ``[G * Dg]`` parameter shaped ``[G, 1, Dg]`` to broadcast over
    ``u: [B, G, L, Dg]``."""
    return x.to(ct).view(u.shape[1], 1, u.shape[3])


def _step(delta: Tensor, delta_bias: Optional[Tensor], delta_softplus: bool,
          ct: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
    """The step ``dt`` in ``ct`` (bias added, softplus applied; ``delta``
    itself when there is nothing to apply, so never modify it in place), and
    its pre-softplus value when softplus is on (for the backward)."""
    pre = delta.to(ct)
    if delta_bias is not None:
        pre = pre + _per_channel(delta_bias, delta, ct)
    if delta_softplus:
        return F.softplus(pre), pre
    return pre, None


def _state_major(A: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """``A: [G * Dg, N]`` as ``[G, N, Dg]`` (the state index before the
    channel, as the states are laid out) in ``dtype``; a view."""
    return A.to(dtype).view(groups, -1, A.shape[1]).transpose(1, 2)


def _decay_and_input(dt: Tensor, u: Tensor, A: Tensor, B: Tensor,
                     scale_input: bool = True) -> Tuple[Tensor, Tensor]:
    """``a = exp(dt A)`` and ``b = dt u B`` (``u B`` without
    ``scale_input``), both ``[B, G, L, N, Dg]`` (the state index before the
    channel, so the innermost axis is long)."""
    n_state = A.shape[1]
    A_g = _state_major(A, u.shape[1], dt.dtype)
    # Contiguous, so the recurrences view it rather than copy it each time.
    a = torch.mul(dt.unsqueeze(3), A_g.unsqueeze(1)).exp_().contiguous()
    b = (torch.mul(dt, u) if scale_input else u.to(dt.dtype, copy=True))
    b = b.unsqueeze(3)
    if n_state == 1:
        b.mul_(B.to(dt.dtype).unsqueeze(-1))  # in place
    else:
        b = b * B.to(dt.dtype).unsqueeze(-1)
    return a, b


def _block_tokens(step_elems: int, length: int) -> int:
    """Tokens per block of :func:`_blocked_scan`: 8 to 32, and at most
    ``786,432`` elements in its buffer (3 MB in fp32), the best measured on
    the project's 2-core CPU for the forget gate's four stage shapes."""
    return max(1, min(length, max(8, min(32, 786432 // max(step_elems, 1)))))


def _blocked_scan(dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  scale_input: bool, reverse: bool) -> Tensor:
    """The scan's output ``y_t = C_t . h_t`` for a state size ``N > 1``,
    computed a block of tokens at a time so that only one block's decays
    ``exp(dt A)`` ever exist (``[T, B, G, N, Dg]``, a few MB, in cache)
    instead of the whole ``[B, G, L, N, Dg]``; the states overwrite them
    token by token (``h_t = a_t h_{t-1} + B_t x_t^T``) and are read out by
    one batched product. Used by the forward, which keeps no states.

    Args:
        dt (Tensor): Steps in the compute dtype, ``[B, G, L, Dg]``.
        u (Tensor): ``[B, G, L, Dg]``.
        A (Tensor): ``[G * Dg, N]``.
        B (Tensor): ``[B, G, L, N]``.
        C (Tensor): ``[B, G, L, N]``.
        scale_input (bool): Multiply the state's input by ``dt``.
        reverse (bool): Scan from the last token to the first.

    Returns:
        Tensor: ``y``, ``[B, G, L, Dg]`` in ``dt``'s dtype (a view of a
        token-major buffer).
    """
    batch, groups, length, per_group = u.shape
    n_state, ct = A.shape[1], dt.dtype
    # contiguous: strided, it slows the products below ~1.5x
    A_g = _state_major(A, groups, ct).contiguous()

    def steps(x: Tensor) -> Tensor:  # [B, G, L, X] -> [L, B, G, X] view
        return x.permute(2, 0, 1, 3)

    x = steps(dt * u if scale_input else u.to(ct))
    a_steps, B_steps, C_steps = steps(dt), steps(B.to(ct)), steps(C.to(ct))
    block = _block_tokens(batch * groups * n_state * per_group, length)
    a = dt.new_empty(block, batch, groups, n_state, per_group)
    a_rows = a.unbind(0)  # each step's decays, then its states
    y = dt.new_empty(length, batch, groups, 1, per_group)
    h = dt.new_zeros(batch, groups, n_state, per_group)
    starts = range(0, length, block)
    for start in (reversed(starts) if reverse else starts):
        end = min(start + block, length)
        n = end - start
        torch.mul(a_steps[start:end, :, :, None], A_g, out=a[:n]).exp_()
        # The input B_t x_t^T is added as a broadcast product in each step
        # rather than formed for the block (one pass over it fewer).
        B_rows = B_steps[start:end, :, :, :, None].unbind(0)
        x_rows = x[start:end, :, :, None].unbind(0)
        for t in (range(n - 1, -1, -1) if reverse else range(n)):
            h = torch.mul(a_rows[t], h, out=a_rows[t]).addcmul_(B_rows[t],
                                                                x_rows[t])
        torch.matmul(C_steps[start:end, :, :, None], a[:n], out=y[start:end])
        h = h.clone()  # the buffer is refilled by the next block
    return y.view(length, batch, groups, per_group).permute(1, 2, 0, 3)


def _recurrence(a: Tensor, b: Tensor, out: Optional[Tensor] = None,
                **kwargs) -> Tensor:
    """:func:`linear_recurrence` over ``[B, G, L, ...]`` tensors (each of the
    ``B * G`` sequences on its own)."""
    batch, groups, length = a.shape[:3]

    def flat(x: Tensor) -> Tensor:  # explicit sizes: the batch may be 0
        return x.reshape(batch * groups, length, math.prod(x.shape[3:]))

    flat_out = None
    if out is not None:
        flat_out = flat(out)
        storage = out.untyped_storage().data_ptr()
        if flat_out.untyped_storage().data_ptr() != storage:
            # reshape copied: the states would be written to the copy
            raise RuntimeError('selective scan: the output buffer must be '
                               'viewable as [B * G, L, M]')
    h = linear_recurrence(flat(a), flat(b), out=flat_out, **kwargs)
    return h.view(a.shape)



def selective_scan_chunk_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                             C: Tensor, D: Optional[Tensor],
                             delta_bias: Optional[Tensor],
                             delta_softplus: bool, reverse: bool,
                             scale_input: bool) -> Tuple[Tensor, tuple]:
    """The token-major scan's forward (arguments as
    :func:`chunk_selective_scan_tokens`, contiguous); keeps nothing for the
    backward but the inputs. Returns ``(y, ())``."""
    ct = _compute_dtype(u)
    dt, _ = _step(delta, delta_bias, delta_softplus, ct)
    if A.shape[1] == 1:
        a, b = _decay_and_input(dt, u, A, B, scale_input)
        del dt
        h = _recurrence(a, b, out=b, reverse=reverse)  # in place
        del a
        y = h.squeeze(3).mul_(C.to(ct))  # in place: h is not needed
    else:
        y = _blocked_scan(dt, u, A, B, C, scale_input, reverse)
    if D is not None:
        y.addcmul_(u, _per_channel(D, u, ct))
    return y, ()


def selective_scan_chunk_bwd(dy: Tensor, saved: List[Tensor], u: Tensor,
                             delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             D: Optional[Tensor],
                             delta_bias: Optional[Tensor],
                             delta_softplus: bool, reverse: bool,
                             scale_input: bool) -> tuple:
    """The analytic backward of :func:`selective_scan_chunk_fwd`: the
    states recomputed by the recurrence, their gradients by the same
    recurrence run the other way. Returns the gradients of ``u, delta, A,
    B, C, D, delta_bias`` (None for an absent one)."""
    ct = _compute_dtype(u)
    groups = u.shape[1]
    dt, pre = _step(delta, delta_bias, delta_softplus, ct)
    a, b = _decay_and_input(dt, u, A, B, scale_input)
    h = _recurrence(a, b, reverse=reverse)
    dy = dy.to(ct).contiguous()
    B_, C_ = B.to(ct).unsqueeze(-1), C.to(ct).unsqueeze(-1)
    # g_t = dL/dh_t = C_t dy_t + a_s g_s, s the token after t in scan
    # order: a recurrence the other way, started by the scan's last token.
    g = dy.unsqueeze(3) * C_
    if g.shape[2] > 1:
        if reverse:
            first, rest, decay = 0, slice(1, None), a[:, :, :-1]
        else:
            first, rest, decay = -1, slice(None, -1), a[:, :, 1:]
        _recurrence(decay, g[:, :, rest], reverse=not reverse,
                    initial=g[:, :, first].flatten(0, 1).flatten(1),
                    out=g[:, :, rest])
    dC = (h * dy.unsqueeze(3)).sum(-1)
    # a_t h_prev = h_t - b_t, so dL/d(dt A) = g_t a_t h_prev.
    d_log_a = g * h.sub_(b)
    del a, b, h
    A_g = _state_major(A, groups, ct)
    # dL/d(dt u) without the D path (dL/du without scale_input)
    g_b = (g * B_).sum(3)
    d_dt = (d_log_a * A_g.unsqueeze(1)).sum(3)
    dA = (d_log_a * dt.unsqueeze(3)).sum((0, 2)).transpose(1, 2)
    if scale_input:
        d_dt.addcmul_(g_b, u)
        du = g_b.mul_(dt)
        dB = (g * (dt * u).unsqueeze(3)).sum(-1)
    else:
        du = g_b
        dB = (g * u.to(ct).unsqueeze(3)).sum(-1)
    dD = None
    if D is not None:
        du.addcmul_(dy, _per_channel(D, u, ct))
        dD = (dy * u).sum((0, 2)).flatten().to(D.dtype)
    if delta_softplus:
        # softplus' threshold (x > 20 passes x through) has slope 1,
        # which sigmoid(x) already rounds to in fp32.
        d_dt.mul_(torch.sigmoid(pre))
    d_bias = (d_dt.sum((0, 2)).flatten().to(delta_bias.dtype)
              if delta_bias is not None else None)
    return (du.to(u.dtype), d_dt.to(delta.dtype),
            dA.reshape(A.shape).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD, d_bias)


def _fake(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
          D: Optional[Tensor], delta_bias: Optional[Tensor],
          delta_softplus: bool, reverse: bool,
          scale_input: bool) -> Tuple[Tensor, tuple]:
    """The forward's output, laid out as it writes it: token-major rows
    for ``N = 1``, a ``[L, B, G, Dg]`` buffer for the blocked scan."""
    batch, groups, length, per_group = u.shape
    ct = _compute_dtype(u)
    if A.shape[1] == 1:
        return u.new_empty(u.shape, dtype=ct), ()
    y = u.new_empty(length, batch, groups, per_group, dtype=ct)
    return y.permute(1, 2, 0, 3), ()


def _definition(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                D: Optional[Tensor], delta_bias: Optional[Tensor],
                delta_softplus: bool, reverse: bool,
                scale_input: bool) -> Tensor:
    """What the op lowers to for export: the scan on the export module's
    chunked recurrence, in this layout."""
    def channels_first(x: Tensor) -> Tensor:  # [B, G, L, X] -> [B, G, X, L]
        x = x.transpose(2, 3)
        return x.flip(-1) if reverse else x

    batch, groups, length, per_group = u.shape
    u_, delta_ = (channels_first(t).reshape(batch, -1, length)
                  for t in (u, delta))
    y = export_selective_scan(u_, delta_, A, channels_first(B),
                              channels_first(C), D, delta_bias,
                              delta_softplus, scale_input)
    y = y.view(batch, groups, per_group, length)
    return (y.flip(-1) if reverse else y).transpose(2, 3)


selective_scan_chunk = FastPathOp(
    'selective_scan_chunk', selective_scan_chunk_fwd,
    selective_scan_chunk_bwd, _fake,
    grads_for=('u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias'),
    definition=_definition)


def chunk_selective_scan_tokens(u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                          C: Tensor, D: Optional[Tensor] = None,
                          delta_bias: Optional[Tensor] = None,
                          delta_softplus: bool = False,
                          reverse: bool = False,
                          scale_input: bool = True) -> Tensor:
    """The selective scan with tokens before channels (the CPU fast path):
    the channel-first tensors of :func:`selective_scan` with their last two
    axes swapped, so each time step of a group is one contiguous row.

    Args:
        u (Tensor): ``[B, G, L, Dg]``; channel ``(g, d)`` is channel
            ``g * Dg + d`` of the channel-first layout.
        delta (Tensor): ``[B, G, L, Dg]``, before bias / softplus.
        A (Tensor): ``[G * Dg, N]``.
        B (Tensor): ``[B, G, L, N]``.
        C (Tensor): ``[B, G, L, N]``.
        D (Tensor, optional): ``[G * Dg]``. Defaults to None.
        delta_bias (Tensor, optional): ``[G * Dg]``. Defaults to None.
        delta_softplus (bool): Softplus on the step. Defaults to False.
        reverse (bool): Scan from the last token to the first (the result
            equals scanning the inputs flipped along L, flipped back).
            Defaults to False.
        scale_input (bool): Multiply the input term by the step; False
            runs ``h_t = exp(dt_t A) h_{t-1} + B_t u_t``. Defaults to True.

    Returns:
        Tensor: ``[B, G, L, Dg]`` fp32 (fp64 for fp64 inputs).
    """
    batch, groups, length, per_group = u.shape
    n_state = A.shape[-1]
    if delta.shape != u.shape:
        raise ValueError('chunk_selective_scan_tokens: delta '
                         f'{tuple(delta.shape)} '
                         f'must match u {tuple(u.shape)}')
    if A.shape != (groups * per_group, n_state):
        raise ValueError(f'chunk_selective_scan_tokens: A must be '
                         f'[{groups * per_group}, N], got {tuple(A.shape)}')
    for name, t in (('B', B), ('C', C)):
        if t.shape != (batch, groups, length, n_state):
            raise ValueError(
                f'chunk_selective_scan_tokens: {name} must be '
                f'{(batch, groups, length, n_state)}, got {tuple(t.shape)}')
    return selective_scan_chunk(u.contiguous(), delta.contiguous(), A,
                                B.contiguous(), C.contiguous(), D,
                                delta_bias, delta_softplus, reverse,
                                scale_input)


def chunk_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                           C: Tensor, D: Optional[Tensor] = None,
                           delta_bias: Optional[Tensor] = None,
                           delta_softplus: bool = False,
                           scale_input: bool = True) -> Tensor:
    """Chunked selective scan in the channel-first layout; same arguments and
    result as :func:`~mila_det.ops.selective_scan.naive.naive_selective_scan`
    (it transposes to :func:`chunk_selective_scan_tokens` and back)."""
    batch, channels, length = u.shape
    groups = B.shape[1]

    def tokens(x: Tensor) -> Tensor:  # [B, G*Dg, L] -> [B, G, L, Dg]
        return x.view(batch, groups, -1, length).transpose(2, 3)

    y = chunk_selective_scan_tokens(tokens(u), tokens(delta), A,
                              B.transpose(2, 3), C.transpose(2, 3), D,
                              delta_bias, delta_softplus,
                              scale_input=scale_input)
    return y.transpose(2, 3).reshape(batch, channels, length)
