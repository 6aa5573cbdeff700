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
from functools import partial
from typing import List

from torch import Tensor

from ..selective_scan import triton_selective_scan
from .chunk import forget_gate_on_scan


def _scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
          scale_input: bool) -> Tensor:
    """The token-major scan of :func:`forget_gate_on_scan` on the kernels'
    channel-first layout (``[B, H * dv, L]``, ``[B, H, dk, L]``)."""
    batch, heads, length, d_v = u.shape

    def channels(x: Tensor) -> Tensor:  # [B, H, L, dv] -> [B, H * dv, L]
        return x.transpose(2, 3).reshape(batch, heads * d_v, length)

    y = triton_selective_scan(channels(u), channels(delta), A.contiguous(),
                              B.transpose(2, 3), C.transpose(2, 3), None,
                              None, False, scale_input)
    return y.view(batch, heads, d_v, length).transpose(2, 3)


# Forget-gate linear attention on the selective scan's Triton kernels
# (fp16 / bf16 / fp32 inputs).
triton_forget_gate_attention = partial(forget_gate_on_scan, scan=_scan)


def report_variants() -> List:
    """None of its own: the selective scan's report compiles the kernels
    this path launches, with its flags (no step bias, softplus or D; input
    scaled or not: ``LAUNCH_FLAGS['gate']`` and ``['gate-scaled']`` of
    :mod:`mila_det.ops.selective_scan.triton`)."""
    return []


def report_launches() -> List:
    """None of its own (see :func:`report_variants`)."""
    return []
