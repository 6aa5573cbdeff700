"""Plain PyTorch reference of the forget-gate linear attention.

The forget gate of "Demystify Mamba in Vision: A Linear Attention
Perspective" (Han et al., NeurIPS 2024), Table 1: causal linear attention
whose per-head key-value state decays by Mamba's ``exp(delta_t A)``, one
decay per state index and channel ("Mamba: Linear-Time Sequence Modeling
with Selective State Spaces", Gu and Dao, 2023). The normaliser is the
plain causal sum of the keys (not decayed), the reading of the paper that
docs/design_space.md states.

Steps through the sequence one token at a time in fp32 (fp64 for fp64
inputs): slow, clear, and the ground truth the fast paths are tested
against.
"""
import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 when any input is fp64, else fp32 (states and normalisers)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def causal_normaliser(q: Tensor, k: Tensor, num_heads: int, eps: float,
                      dtype: torch.dtype) -> Tensor:
    """``q_t[h] . Z_t + eps`` with ``Z_t = sum_{j <= t} k_j[h]``, in
    ``dtype``, for the fast paths (the reference sums token by token).

    Args:
        q (Tensor): ``[B, L, H * dk]``.
        k (Tensor): ``[B, L, H * dk]``.
        num_heads (int): ``H``.
        eps (float): Added to the normaliser.
        dtype (torch.dtype): The compute dtype.

    Returns:
        Tensor: ``[B, L, H, 1]``.
    """
    batch, length, channels = q.shape
    shape = (batch, length, num_heads, channels // num_heads)
    z = k.to(dtype).reshape(shape).cumsum(1)
    return (q.to(dtype).reshape(shape) * z).sum(-1, keepdim=True) + eps


def naive_forget_gate_attention(q: Tensor,
                                k: Tensor,
                                v: Tensor,
                                delta: Tensor,
                                A: Tensor,
                                num_heads: int,
                                eps: float = 1e-6,
                                normalize: bool = True,
                                scale_input: bool = False) -> Tensor:
    """Forget-gate linear attention, one token at a time.

    For head ``h``, channel ``c`` of that head and state index ``s``::

        S_t[s, c] = exp(delta_t[c] A[c, s]) S_{t-1}[s, c]
                    + k_t[h, s] (delta_t[c] if scale_input else 1) v_t[c]
        Z_t       = Z_{t-1} + k_t[h]
        y_t[c]    = q_t[h] . S_t[:, c] / (q_t[h] . Z_t + eps)

    (without the division when ``normalize`` is False).

    Args:
        q (Tensor): Queries after ``elu + 1``, ``[B, L, H * dk]``.
        k (Tensor): Keys after ``elu + 1``, ``[B, L, H * dk]``.
        v (Tensor): Values ``[B, L, H * dv]``.
        delta (Tensor): Positive steps (softplus applied) ``[B, L, H * dv]``.
        A (Tensor): Negative decay rates ``[H * dv, dk]``.
        num_heads (int): ``H``.
        eps (float): Added to the normaliser. Defaults to 1e-6.
        normalize (bool): Divide by ``q . Z``. Defaults to True.
        scale_input (bool): Multiply the state's input by ``delta`` (as
            Mamba's scan does, which adds the input gate). Defaults to False.

    Returns:
        Tensor: ``[B, L, H * dv]`` in fp32 (fp64 for fp64 inputs).
    """
    batch, length = q.shape[:2]
    heads = num_heads
    d_k, d_v = q.shape[2] // heads, v.shape[2] // heads
    ct = compute_dtype(q, k, v, delta, A)
    q = q.to(ct).reshape(batch, length, heads, d_k)
    k = k.to(ct).reshape(batch, length, heads, d_k)
    v = v.to(ct).reshape(batch, length, heads, d_v)
    delta = delta.to(ct).reshape(batch, length, heads, d_v)
    A = A.to(ct).reshape(heads, d_v, d_k)
    state = q.new_zeros(batch, heads, d_k, d_v)  # S[s, c]
    z = q.new_zeros(batch, heads, d_k)
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, t, :, :, None] * A)  # [B, H, dv, dk]
        drive = delta[:, t] * v[:, t] if scale_input else v[:, t]
        state = (decay.transpose(-1, -2) * state +
                 k[:, t, :, :, None] * drive[:, :, None, :])
        z = z + k[:, t]
        y = torch.einsum('bhs,bhsc->bhc', q[:, t], state)
        if normalize:
            y = y / ((q[:, t] * z).sum(-1, keepdim=True) + eps)
        ys.append(y)
    if not ys:
        return q.new_zeros(batch, 0, heads * d_v)
    return torch.stack(ys, 1).reshape(batch, length, heads * d_v)
