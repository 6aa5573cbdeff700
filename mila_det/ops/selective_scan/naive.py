"""Plain PyTorch reference of the selective scan (S6) used by VMamba.

"Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu and
Dao, 2023), in the grouped form of VMamba (Liu et al., NeurIPS 2024): the
input-dependent B and C are shared by all channels of a direction group.
Steps through the sequence one token at a time, in fp32: slow, clear, and the
ground truth the fast paths are tested against.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def naive_selective_scan(u: Tensor,
                         delta: Tensor,
                         A: Tensor,
                         B: Tensor,
                         C: Tensor,
                         D: Optional[Tensor] = None,
                         delta_bias: Optional[Tensor] = None,
                         delta_softplus: bool = False,
                         scale_input: bool = True) -> Tensor:
    """Selective scan, one token at a time.

    With ``G`` groups of ``D_ch / G`` channels each (channel ``d`` belongs to
    group ``d // (D_ch / G)``)::

        delta_t = softplus(delta_t + delta_bias)       (if delta_softplus)
        h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
        y_t     = <C_t, h_t> + D * u_t

    (``scale_input=False`` drops the step from the input term:
    ``h_t = exp(delta_t * A) * h_{t-1} + B_t * u_t``.)

    Args:
        u (Tensor): Input ``[B, D_ch, L]``.
        delta (Tensor): Step sizes before bias/softplus, ``[B, D_ch, L]``.
        A (Tensor): State matrix diagonal ``[D_ch, N]`` (negative).
        B (Tensor): Input projection ``[B, G, N, L]``.
        C (Tensor): Output projection ``[B, G, N, L]``.
        D (Tensor, optional): Skip weight ``[D_ch]``. Defaults to None.
        delta_bias (Tensor, optional): ``[D_ch]``. Defaults to None.
        delta_softplus (bool): Apply softplus to the step. Defaults to False.
        scale_input (bool): Multiply the input term by the step (Mamba's
            discretisation); False adds ``B_t u_t`` unscaled, so the step
            only enters through the decay. Defaults to True.

    Returns:
        Tensor: ``y: [B, D_ch, L]`` in fp32 (fp64 for fp64 inputs).
    """
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    dtype = torch.promote_types(u.dtype, torch.float32)  # fp32, or fp64
    u, delta, A = u.to(dtype), delta.to(dtype), A.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    per_group = channels // groups
    Bx = B.to(dtype).repeat_interleave(per_group, dim=1)  # [B, D_ch, N, L]
    Cx = C.to(dtype).repeat_interleave(per_group, dim=1)
    decay = torch.exp(delta[:, :, None, :] * A[None, :, :, None])
    drive = Bx * u[:, :, None, :]
    if scale_input:
        drive = delta[:, :, None, :] * drive
    h = u.new_zeros(batch, channels, n_state)
    ys = []
    for t in range(length):
        h = decay[..., t] * h + drive[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(dtype)[None, :, None] * u
    return y
