"""Plain PyTorch reference of MILA's linear attention.

MILA: "Demystify Mamba in Vision: A Linear Attention Perspective"
(Han et al., NeurIPS 2024). The computation is the one the official
checkpoints were trained with (the authors' MLLA code): non-causal
linear attention over all tokens, 2-D rotary position embedding on q and k
for the numerator, and a normaliser computed from the un-rotated q and k.
"""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor


def build_rope_table(height: int,
                     width: int,
                     channels: int,
                     device: Union[torch.device, str, None] = None,
                     base: float = 10000.0) -> Tensor:
    """Cosines and sines of the 2-D RoPE angles on a ``height x width`` grid.

    Channel pair ``p`` (channels ``2p`` and ``2p+1``) is rotated by
    ``y * theta_p`` for the first ``channels / 4`` pairs and by
    ``x * theta_(p - channels/4)`` for the rest, with
    ``theta_m = base ** (-m / (channels / 4))``.

    Args:
        height (int): Grid height H.
        width (int): Grid width W.
        channels (int): Feature width C; a multiple of 4.
        device: Where to build the table. Defaults to the CPU.
        base (float): Frequency base. Defaults to 10000.

    Returns:
        Tensor: ``[H*W, C/2, 2]`` fp32, ``[..., 0]`` cos and ``[..., 1]`` sin,
        tokens in row-major order.
    """
    if channels % 4 != 0:
        raise ValueError(f'2-D RoPE needs a channel count divisible by 4, '
                         f'got {channels}')
    quarter = channels // 4
    f64 = dict(dtype=torch.float64, device=device)
    theta = base**(-torch.arange(quarter, **f64) / quarter)

    # The angles per axis (float64), then one expand over the grid: a
    # table costs (H + W) * C / 4 angles, not H * W * C / 2.
    def cos_sin(n: int) -> Tensor:  # [n, C/4, 2]
        angle = torch.arange(n, **f64)[:, None] * theta
        return torch.stack([angle.cos(), angle.sin()], -1).float()

    rows = cos_sin(height)[:, None].expand(height, width, quarter, 2)
    cols = cos_sin(width)[None].expand(height, width, quarter, 2)
    return torch.cat([rows, cols], dim=2).reshape(height * width,
                                                  2 * quarter, 2)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate channel pairs of ``x: [B, N, C]`` by ``table: [N, C/2, 2]``."""
    b, n, c = x.shape
    pairs = x.reshape(b, n, c // 2, 2)
    re, im = pairs.unbind(-1)
    cos, sin = table.unbind(-1)
    out = torch.stack([re * cos - im * sin, im * cos + re * sin], dim=-1)
    return out.reshape(b, n, c)


def naive_linear_attention(q: Tensor,
                           k: Tensor,
                           v: Tensor,
                           num_heads: int,
                           rope: Union[Tensor, Tuple[int, int]],
                           eps: float = 1e-6) -> Tensor:
    """MILA linear attention, computed step by step in fp32.

    Args:
        q (Tensor): Queries after ``elu + 1``, ``[B, N, C]``.
        k (Tensor): Keys after ``elu + 1``, ``[B, N, C]``.
        v (Tensor): Values, ``[B, N, C]``.
        num_heads (int): Number of heads h; ``C`` must divide by it.
        rope (Tensor | tuple[int, int]): The RoPE table ``[N, C/2, 2]`` from
            :func:`build_rope_table`, or the grid size ``(H, W)`` to build it.
        eps (float): Added to the normaliser. Defaults to 1e-6.

    Returns:
        Tensor: ``[B, N, C]`` in the dtype of ``q``, before LePE.
    """
    b, n, c = q.shape
    if isinstance(rope, (tuple, list)):
        rope = build_rope_table(rope[0], rope[1], c, device=q.device)
    with torch.autocast(q.device.type, enabled=False):  # sums stay fp32
        return linear_attention_fp32(q, k, v, num_heads, rope, eps)


def linear_attention_fp32(q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                          rope: Tensor, eps: float) -> Tensor:
    """:func:`naive_linear_attention` on a table, without the autocast
    scope: :func:`global_linear_attention` with the rotated q and k in the
    numerator and ``q . sum(k) + N eps`` (``= N (q . mean(k) + eps)``)
    below it."""
    n = q.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64
    rope = rope.to(dtype)
    q_r, k_r = (apply_rope(t.to(dtype), rope) for t in (q, k))
    return global_linear_attention(q, k, v, num_heads, True, eps * n, q_r,
                                   k_r)


def global_linear_attention(q: Tensor,
                            k: Tensor,
                            v: Tensor,
                            num_heads: int,
                            normalize: bool = True,
                            eps: float = 1e-6,
                            q_num: Optional[Tensor] = None,
                            k_num: Optional[Tensor] = None,
                            v_num: Optional[Tensor] = None) -> Tensor:
    """Non-causal multi-head linear attention over all tokens, in fp32:
    the design space's general form (Table 1 of the MILA paper), of which
    MILA's operator is one setting (:func:`linear_attention_fp32`).

    Per head: ``y_i = q'_i . sum_j k'_j^T v'_j / (q_i . sum_j k_j + eps)``,
    where the primed tensors are those of the numerator (``q_num``,
    ``k_num``, ``v_num``; the rotated queries and keys with RoPE, the gated
    values with the input gate) and default to ``q``, ``k``, ``v``. Without
    ``normalize``: ``y_i = q'_i . (sum_j k'_j^T v'_j) / N``.

    Args:
        q (Tensor): Queries after ``elu + 1``, ``[B, N, h * dk]``.
        k (Tensor): Keys after ``elu + 1``, ``[B, N, h * dk]``.
        v (Tensor): Values, ``[B, N, h * dv]``.
        num_heads (int): Number of heads h.
        normalize (bool): Divide by ``q . sum(k)``; otherwise by N.
            Defaults to True.
        eps (float): Added to the normaliser. Defaults to 1e-6.
        q_num (Tensor, optional): Numerator queries, like ``q``.
        k_num (Tensor, optional): Numerator keys, like ``k``.
        v_num (Tensor, optional): Numerator values, like ``v``.

    Returns:
        Tensor: ``[B, N, h * dv]`` in ``q``'s dtype.
    """
    b, n, c_qk = q.shape
    c_v = v.shape[-1]
    h = num_heads
    d_k, d_v = c_qk // h, c_v // h
    q_num = q if q_num is None else q_num
    k_num = k if k_num is None else k_num
    v_num = v if v_num is None else v_num
    with torch.autocast(q.device.type, enabled=False):  # sums stay fp32
        ct = torch.promote_types(q.dtype, torch.float32)

        def heads(t: Tensor, d: int) -> Tensor:  # [B, h, N, d], a view
            return t.to(ct).view(b, n, h, d).transpose(1, 2)

        kv = heads(k_num, d_k).transpose(-2, -1) @ heads(v_num, d_v)
        out = heads(q_num, d_k) @ kv  # [B, h, N, dv]
        if normalize:
            k_sum = heads(k, d_k).sum(2, keepdim=True)  # [B, h, 1, dk]
            den = heads(q, d_k) @ k_sum.transpose(-2, -1)  # [B, h, N, 1]
            out = out / (den + eps)
        else:
            out = out / n
        return out.transpose(1, 2).reshape(b, n, c_v).to(q.dtype)
