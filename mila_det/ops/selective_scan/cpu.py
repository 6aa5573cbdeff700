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


def _chunk_size(length: int) -> int:
    """About ``sqrt(L)`` tokens per chunk (at least 8)."""
    return max(8, math.isqrt(max(length - 1, 0)) + 1)


def _chunk_end_states(a3: Tensor, b3: Tensor) -> Tuple[Tensor, Tensor]:
    """For ``a3, b3: [n_chunks, T, M]``: each chunk's end state from a zero
    start, and the product of its decays (``[n_chunks, M]`` both)."""
    state = b3[:, 0].clone()
    decay = a3[:, 0].clone()
    for t in range(1, a3.shape[1]):
        state = torch.addcmul(b3[:, t], a3[:, t], state)
        decay.mul_(a3[:, t])
    return state, decay


def linear_recurrence(a: Tensor, b: Tensor,
                      chunk: Optional[int] = None) -> Tensor:
    """Solve ``h[t] = a[t] * h[t-1] + b[t]`` with ``h[-1] = 0``.

    Three steps: each chunk's end state from a zero start (a sequential pass
    inside every chunk, all chunks at once), the states entering every chunk
    (a short pass over the chunks), then the states themselves (a second
    pass inside every chunk, now from the right start). Tokens beyond the
    last whole chunk are finished one by one.

    Args:
        a (Tensor): Decays ``[L, M]`` (time first, contiguous).
        b (Tensor): Inputs ``[L, M]``.
        chunk (int, optional): Tokens per chunk. Defaults to
            ``ceil(sqrt(L))`` (at least 8).

    Returns:
        Tensor: States ``h: [L, M]``.
    """
    length, width = b.shape
    chunk = chunk or _chunk_size(length)
    n_chunks = length // chunk
    main = n_chunks * chunk
    h = torch.empty_like(b)
    state = b.new_zeros(width)
    if n_chunks:
        a3 = a[:main].view(n_chunks, chunk, width)
        b3 = b[:main].view(n_chunks, chunk, width)
        h3 = h[:main].view(n_chunks, chunk, width)
        ends, decays = _chunk_end_states(a3, b3)
        starts = torch.empty_like(ends)  # state entering each chunk
        for c in range(n_chunks):
            starts[c] = state
            state = torch.addcmul(ends[c], decays[c], state)
        torch.addcmul(b3[:, 0], a3[:, 0], starts, out=h3[:, 0])
        for t in range(1, chunk):
            torch.addcmul(b3[:, t], a3[:, t], h3[:, t - 1], out=h3[:, t])
    for t in range(main, length):
        state = torch.addcmul(b[t], a[t], state)
        h[t] = state
    return h


def _compute_dtype(u: Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (gradcheck)."""
    return torch.promote_types(u.dtype, torch.float32)


def _time_first(x: Tensor, groups: int) -> Tensor:
    """View ``[B, D, L]`` as ``[L, B, G, D/G, 1]`` (no copy)."""
    return x.permute(2, 0, 1).unflatten(2, (groups, -1)).unsqueeze(-1)


def _prepare(u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
             delta_bias: Optional[Tensor], delta_softplus: bool
             ) -> Tuple[Tensor, Tensor, Tensor]:
    """The recurrence in time-first layout, fp32 (fp64 for fp64 inputs):
    the step ``dt: [L, B, G, Dg, 1]`` after bias and softplus, and
    ``a = exp(dt A)``, ``b = dt B u``: ``[L, B, G, Dg, N]``, contiguous.
    Each element-wise op writes straight into the new layout (``out=``), so
    the transposition costs no extra pass."""
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    ct = _compute_dtype(u)
    dt = torch.empty(length, batch, channels, dtype=ct, device=u.device)
    if delta_bias is not None:
        torch.add(delta.permute(2, 0, 1), delta_bias.to(ct), out=dt)
    else:
        dt.copy_(delta.permute(2, 0, 1))
    if delta_softplus:
        dt = F.softplus(dt)
    dt = dt.unflatten(2, (groups, -1)).unsqueeze(-1)  # [L, B, G, Dg, 1]
    shape = (*dt.shape[:4], n_state)
    A_g = A.to(ct).reshape(groups, -1, n_state)
    a = torch.empty(shape, dtype=ct, device=u.device)
    torch.mul(dt, A_g, out=a).exp_()
    b = torch.empty(shape, dtype=ct, device=u.device)
    dt_u = torch.mul(dt, _time_first(u, groups))  # contiguous, like dt
    torch.mul(dt_u, B.permute(3, 0, 1, 2).unsqueeze(3), out=b)
    return dt, a, b


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
        _, a, b = _prepare(u, delta, A, B, delta_bias, delta_softplus)
        h = linear_recurrence(a.view(length, -1), b.view(length, -1))
        del a, b
        h = h.view(length, batch, groups, -1, n_state)
        C_t = C.permute(3, 0, 1, 2).unsqueeze(3)  # [L, B, G, 1, N]
        y = torch.empty(batch, channels, length, dtype=ct, device=u.device)
        y_t = _time_first(y, groups)[..., 0]  # a view, written in place
        if n_state == 1:
            torch.mul(h[..., 0], C_t[..., 0], out=y_t)
        else:
            y_t.copy_((h * C_t).sum(-1))
        if D is not None:
            y.addcmul_(D.to(ct)[None, :, None], u)
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias)
        ctx.delta_softplus = delta_softplus
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        u, delta, A, B, C, D, delta_bias = ctx.saved_tensors
        batch, channels, length = u.shape
        groups, n_state = B.shape[1], A.shape[1]
        per_group = channels // groups
        ct = _compute_dtype(u)
        dt_t, a, b = _prepare(u, delta, A, B, delta_bias,
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
