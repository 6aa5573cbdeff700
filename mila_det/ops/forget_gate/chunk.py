"""Chunked PyTorch path of the forget-gate linear attention (any device;
``auto`` uses it off CUDA).

The forget gate of "Demystify Mamba in Vision: A Linear Attention
Perspective" (Han et al., NeurIPS 2024) is a selective scan ("Mamba", Gu and
Dao, 2023) with ``u = v``, ``B = k``, ``C = q``, groups = heads, state size
``dk``, no ``D``, no step bias or softplus, and the state input multiplied by
the step only when ``scale_input`` is set. The numerator therefore runs on
:func:`~mila_det.ops.selective_scan.chunk_selective_scan_tokens`, whose
token-major ``[B, G, L, Dg]`` layout is a free view of the ``[B, L, H * d]``
tensors here (its analytic backward recomputes the states instead of
storing them). :func:`forget_gate_on_scan` is the composition around the
scan, shared with the Triton path. The normaliser ``q_t . cumsum(k)_t`` is computed in fp32 (fp64
for fp64 inputs) by ordinary autograd ops.

The scan rather than the per-channel factorised chunk form (cumulative
log-decays within a chunk, ``q_t exp(la_t)`` against ``k_j exp(-la_j)``):
the factorised form is no faster on CPU, and ``exp(-la_j)`` overflows fp32
once a chunk's summed decay ``sum_t delta_t |A|`` passes ~88, which trained
steps reach. The scan is exact for every step, keeps only its inputs for
the backward and shares its code with the selective scan. Its forward runs
one block of tokens' decays at a time (``selective_scan.chunk``). The
measurements behind this are in docs/benchmarks.md ("The forget gate's
CPU path").
"""
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from ..selective_scan import chunk_selective_scan_tokens
from .naive import causal_normaliser, compute_dtype


def forget_gate_on_scan(q: Tensor, k: Tensor, v: Tensor, delta: Tensor,
                        A: Tensor, num_heads: int, eps: float = 1e-6,
                        normalize: bool = True, scale_input: bool = False,
                        *, scan: Callable[..., Tensor]) -> Tensor:
    """The forget gate on a token-major selective scan: the numerator is
    ``scan(u=v, delta, A, B=k, C=q, scale_input)`` with one group per head
    (``[B, H, L, d]`` views of the ``[B, L, H * d]`` tensors in, ``[B, H, L,
    dv]`` out), the normaliser the causal key sum. Arguments and result as
    :func:`~.naive.naive_forget_gate_attention`, computed in fp32 (fp64 for
    fp64 inputs)."""
    batch, length = q.shape[:2]
    heads = num_heads
    d_k, d_v = q.shape[2] // heads, v.shape[2] // heads
    ct = compute_dtype(q, k, v, delta, A)

    def tokens(x: Tensor, width: int) -> Tensor:  # -> [B, H, L, width]
        # fp64 anywhere computes everything in fp64, as the reference does
        x = x.to(ct) if ct == torch.float64 else x
        return x.reshape(batch, length, heads, width).transpose(1, 2)

    y = scan(tokens(v, d_v), tokens(delta, d_v), A.to(ct), tokens(k, d_k),
             tokens(q, d_k), scale_input)
    if normalize:
        y = y / causal_normaliser(q, k, heads, eps, ct).transpose(1, 2)
    return y.transpose(1, 2).reshape(batch, length, heads * d_v)


def _chunk_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                scale_input: bool) -> Tensor:
    return chunk_selective_scan_tokens(u, delta, A, B, C,
                                       scale_input=scale_input)


# Forget-gate linear attention by the chunked selective scan.
chunk_forget_gate_attention = partial(forget_gate_on_scan, scan=_chunk_scan)
