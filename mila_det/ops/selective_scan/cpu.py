"""Fast PyTorch path of the selective scan, for CPUs (and any device).

The recurrence ``h_t = a_t * h_{t-1} + b_t`` is run in chunks of about
``sqrt(L)`` tokens: a sequential pass inside every chunk, vectorised over all
chunks and channels at once, then a short pass over the chunk ends to carry
states across chunks, then one vectorised fix-up. That is ``~2 sqrt(L)``
large tensor operations instead of ``L`` tiny ones, with the same sums in
fp32 (only their association differs). The backward pass is the same
recurrence run in reverse, with the states recomputed rather than stored.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_recurrence(a: Tensor, b: Tensor,
                      chunk: Optional[int] = None) -> Tensor:
    """Solve ``h[t] = a[t] * h[t-1] + b[t]`` with ``h[-1] = 0``.

    Args:
        a (Tensor): Decays ``[L, M]`` (time first, contiguous).
        b (Tensor): Inputs ``[L, M]``.
        chunk (int, optional): Tokens per chunk. Defaults to ``ceil(sqrt(L))``
            (at least 8).

    Returns:
        Tensor: States ``h: [L, M]``.
    """
    length, width = b.shape
    if chunk is None:
        chunk = max(8, math.isqrt(length - 1) + 1 if length > 1 else 1)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, pad))
    a3 = a.reshape(n_chunks, chunk, width)
    b3 = b.reshape(n_chunks, chunk, width)
    h = torch.empty_like(b3)
    h[:, 0] = b3[:, 0]
    for t in range(1, chunk):  # inside every chunk at once, from zero
        torch.addcmul(b3[:, t], a3[:, t], h[:, t - 1], out=h[:, t])
    if n_chunks > 1:
        decay = torch.cumprod(a3, dim=1)  # product of a from chunk start
        carry = torch.zeros(n_chunks, 1, width, dtype=b.dtype,
                            device=b.device)
        state = carry[0, 0]
        for c in range(1, n_chunks):  # state entering chunk c
            state = torch.addcmul(h[c - 1, -1], decay[c - 1, -1], state)
            carry[c, 0] = state
        h.addcmul_(decay, carry)
    h = h.reshape(n_chunks * chunk, width)
    return h[:length] if pad else h


def _compute_dtype(u: Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (gradcheck)."""
    return torch.promote_types(u.dtype, torch.float32)


def _prepare(u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
             delta_bias: Optional[Tensor], delta_softplus: bool
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Time-first fp32 views: delta ``[B, D, L]`` after bias/softplus, and the
    recurrence terms ``a, b: [L, B, G, Dg, N]``."""
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    per_group = channels // groups
    ct = _compute_dtype(u)
    dt = delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt_t = dt.permute(2, 0, 1).reshape(length, batch, groups, per_group, 1)
    u_t = u.to(ct).permute(2, 0, 1).reshape(length, batch, groups,
                                             per_group, 1)
    A_g = A.to(ct).reshape(groups, per_group, n_state)
    B_t = B.to(ct).permute(3, 0, 1, 2).unsqueeze(3)  # [L, B, G, 1, N]
    a = torch.exp(dt_t * A_g)
    b = (dt_t * u_t) * B_t
    return dt, a, b, dt_t


class SelectiveScanChunkedFunction(torch.autograd.Function):
    """Selective scan by :func:`linear_recurrence`, with an analytic
    backward (a reverse recurrence); all accumulation in fp32."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                C: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor],
                delta_softplus: bool) -> Tensor:
        batch, channels, length = u.shape
        groups, n_state = B.shape[1], A.shape[1]
        ct = _compute_dtype(u)
        _, a, b, _ = _prepare(u, delta, A, B, delta_bias, delta_softplus)
        shape = a.shape
        h = linear_recurrence(a.reshape(length, -1), b.reshape(length, -1))
        h = h.reshape(shape)
        C_t = C.to(ct).permute(3, 0, 1, 2).unsqueeze(3)  # [L, B, G, 1, N]
        y = (h * C_t).sum(-1).reshape(length, batch, channels)
        y = y.permute(1, 2, 0)
        if D is not None:
            y = y + D.to(ct)[None, :, None] * u.to(ct)
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.delta_softplus = delta_softplus
        return y.contiguous()

    @staticmethod
    def backward(ctx, dy: Tensor):
        u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
        batch, channels, length = u.shape
        groups, n_state = B.shape[1], A.shape[1]
        per_group = channels // groups
        ct = _compute_dtype(u)
        dt, a, b, dt_t = _prepare(u, delta, A, B, delta_bias,
                                  ctx.delta_softplus)
        shape = a.shape  # [L, B, G, Dg, N]
        h = linear_recurrence(a.reshape(length, -1),
                              b.reshape(length, -1)).reshape(shape)
        dy = dy.to(ct)
        dy_t = dy.permute(2, 0, 1).reshape(length, batch, groups, per_group,
                                           1)
        C_t = C.to(ct).permute(3, 0, 1, 2).unsqueeze(3)
        # g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}: a recurrence in reverse.
        a_rev = torch.empty_like(a)
        a_rev[0] = 1.0
        a_rev[1:] = a.flip(0)[:-1]
        g = linear_recurrence(a_rev.reshape(length, -1),
                              (dy_t * C_t).flip(0).reshape(length, -1))
        g = g.reshape(shape).flip(0)
        h_prev = torch.zeros_like(h)
        h_prev[1:] = h[:-1]
        d_log_a = g * h_prev * a  # dL/d(delta * A)
        u_t = u.to(ct).permute(2, 0, 1).reshape(length, batch, groups,
                                                 per_group, 1)
        B_t = B.to(ct).permute(3, 0, 1, 2).unsqueeze(3)
        A_g = A.to(ct).reshape(groups, per_group, n_state)
        g_b = g * B_t  # [L, B, G, Dg, N]
        d_dt = (d_log_a * A_g).sum(-1) + (g_b.sum(-1, keepdim=True) *
                                          u_t).squeeze(-1)
        dA = (d_log_a * dt_t).sum((0, 1)).reshape(channels, n_state)
        du = (g_b.sum(-1, keepdim=True) * dt_t).squeeze(-1)
        du = du.reshape(length, batch, channels).permute(1, 2, 0)
        dB = (g * (dt_t * u_t)).sum(3).permute(1, 2, 3, 0)  # [B, G, N, L]
        dC = (h * dy_t).sum(3).permute(1, 2, 3, 0)
        d_delta = d_dt.reshape(length, batch, channels).permute(1, 2, 0)
        dD = None
        if D is not None:
            du = du + D.to(ct)[None, :, None] * dy
            dD = (dy * u.to(ct)).sum((0, 2)).to(D.dtype)
        if ctx.delta_softplus:
            pre = delta.to(ct)
            if delta_bias is not None:
                pre = pre + delta_bias.to(ct)[None, :, None]
            # softplus' threshold (x > 20 passes x through) has slope 1,
            # which sigmoid(x) already rounds to in fp32.
            d_delta = d_delta * torch.sigmoid(pre)
        d_bias = (d_delta.sum((0, 2)).to(delta_bias.dtype)
                  if delta_bias is not None else None)
        return (du.to(u.dtype), d_delta.to(delta.dtype), dA.to(A.dtype),
                dB.to(B.dtype), dC.to(C.dtype), dD, d_bias, None)


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                           C: Tensor, D: Optional[Tensor] = None,
                           delta_bias: Optional[Tensor] = None,
                           delta_softplus: bool = False) -> Tensor:
    """Chunked selective scan; same arguments and result as
    :func:`~mila_det.ops.selective_scan.naive.selective_scan_naive`."""
    return SelectiveScanChunkedFunction.apply(u, delta, A, B, C, D,
                                              delta_bias, delta_softplus)
