"""Triton path of the forget-gate linear attention.

The forget gate of "Demystify Mamba in Vision: A Linear Attention
Perspective" (Han et al., NeurIPS 2024) is a selective scan ("Mamba", Gu and
Dao, 2023) with ``u = v``, ``B = k``, ``C = q``, groups = heads and the
state input not multiplied by the step (``scale_input=False``), which is how
the authors computed it (with Mamba's kernel). So the numerator and all its
gradients run on the selective scan's Triton kernels
(:mod:`mila_det.ops.selective_scan.triton`), in their channel-first layout;
the normaliser ``q_t . cumsum(k)_t`` (fp32) is a few element-wise PyTorch
ops on top. No kernel of its own is defined here.
"""
from typing import List

import torch
from torch import Tensor

from ..selective_scan import triton_selective_scan
from .naive import causal_normaliser


def triton_forget_gate_attention(q: Tensor,
                                 k: Tensor,
                                 v: Tensor,
                                 delta: Tensor,
                                 A: Tensor,
                                 num_heads: int,
                                 eps: float = 1e-6,
                                 normalize: bool = True,
                                 scale_input: bool = False) -> Tensor:
    """Forget-gate linear attention on the selective scan's Triton kernels;
    same arguments and result as
    :func:`~mila_det.ops.forget_gate.naive.naive_forget_gate_attention`
    (fp16 / bf16 / fp32 inputs; the kernels keep states in fp32).

    Args:
        q (Tensor): Queries after ``elu + 1``, ``[B, L, H * dk]``.
        k (Tensor): Keys after ``elu + 1``, ``[B, L, H * dk]``.
        v (Tensor): Values ``[B, L, H * dv]``.
        delta (Tensor): Positive steps ``[B, L, H * dv]``.
        A (Tensor): Negative decay rates ``[H * dv, dk]``.
        num_heads (int): ``H``.
        eps (float): Added to the normaliser. Defaults to 1e-6.
        normalize (bool): Divide by ``q . Z``. Defaults to True.
        scale_input (bool): Multiply the state's input by ``delta``.
            Defaults to False.

    Returns:
        Tensor: ``[B, L, H * dv]`` fp32.
    """
    batch, length = q.shape[:2]
    heads = num_heads
    d_k = q.shape[2] // heads

    def channels_first(x: Tensor) -> Tensor:  # [B, L, C] -> [B, C, L]
        return x.transpose(1, 2).contiguous()

    def group_states(x: Tensor) -> Tensor:  # [B, L, H*dk] -> [B, H, dk, L]
        return x.reshape(batch, length, heads, d_k).permute(0, 2, 3,
                                                            1).contiguous()

    y = triton_selective_scan(channels_first(v), channels_first(delta),
                              A.contiguous(), group_states(k),
                              group_states(q), None, None, False,
                              scale_input)
    y = y.transpose(1, 2).float()  # [B, L, H * dv]
    if normalize:
        den = causal_normaliser(q, k, heads, eps, torch.float32)
        y = y.reshape(batch, length, heads, -1) / den
    return y.reshape(batch, length, -1)


def report_variants() -> List:
    """None of its own: the selective scan's report compiles the kernels
    this path launches, with its flags (no step bias, softplus or D; input
    scaled or not: ``LAUNCH_FLAGS['gate']`` and ``['gate-scaled']`` of
    :mod:`mila_det.ops.selective_scan.triton`)."""
    return []


def report_launches() -> List:
    """None of its own (see :func:`report_variants`)."""
    return []
