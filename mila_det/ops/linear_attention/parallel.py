"""The fast PyTorch path of MILA's linear attention (any device, used on CPU).

The same computation as :mod:`.naive`, arranged for throughput: the RoPE
rotation is one complex multiply per tensor instead of unbind / four
products / stack, heads are strided views of ``[B, N, C]`` (no head-major
copies), the normaliser is formed in place, and scaling the head-major
product writes the token-major result. Non-fp32 inputs are computed in fp32,
as in the reference. The backward is written out
(:func:`parallel_linear_attention_bwd`), from the output and the small
``kv``, ``k_mean`` and normaliser the forward keeps.
"""
from typing import List, Tuple

import torch
from torch import Tensor

from .._op import FastPathOp
from .naive import linear_attention_fp32


def _as_pairs(x: Tensor) -> Tensor:
    """``x: [B, N, C]`` as complex ``[B, N, C/2]`` (channel pairs), copying
    only when the strides do not allow a complex view."""
    b, n, c = x.shape
    pairs = x.reshape(b, n, c // 2, 2)
    if (pairs.stride(-1) != 1 or pairs.storage_offset() % 2
            or any(s % 2 for s in pairs.stride()[:-1])):
        pairs = pairs.contiguous()
    return torch.view_as_complex(pairs)


def rotate(x: Tensor, rope: Tensor, inverse: bool = False) -> Tensor:
    """2-D RoPE of ``x: [B, N, C]`` by the table ``rope: [N, C/2, 2]``
    (by the opposite angles when ``inverse``: the rotation's transpose)."""
    rot = torch.view_as_complex(rope.to(x.dtype).contiguous())
    return torch.view_as_real(_as_pairs(x) *
                              (rot.conj() if inverse else rot)).flatten(-2)


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64


def parallel_linear_attention_fwd(q: Tensor, k: Tensor, v: Tensor,
                                  num_heads: int, rope: Tensor, eps: float
                                  ) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    """The forward; arguments as :func:`parallel_linear_attention`.

    Returns:
        tuple: ``out [B, N, C]`` (dtype of q) and, for the backward,
        ``kv [B, h, d, d]``, ``k_mean [B, h, d]`` and the normaliser's
        reciprocal ``z [B, N, h]`` (fp32, fp64 for fp64 inputs).
    """
    dtype, ct = q.dtype, _compute_dtype(q)
    with torch.autocast(q.device.type, enabled=False):  # sums stay fp32
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        b, n, c = q.shape
        h, d = num_heads, c // num_heads
        q_r = rotate(q, rope).view(b, n, h, d)
        k_r = rotate(k, rope).view(b, n, h, d)
        # kv[b, h] = k_r[b, :, h]^T v[b, :, h] / N: [B, h, d, d]
        kv = torch.matmul(k_r.permute(0, 2, 3, 1), v.reshape(b, n, h, d)
                          .transpose(1, 2)).div_(n)
        # z[b, t, h] = 1 / (q[b, t, h] . mean_s k[b, s, h] + eps): [B, N, h]
        k_mean = k.reshape(b, n, h, d).mean(1)
        z = torch.einsum('bnhd,bhd->bnh', q.reshape(b, n, h, d), k_mean)
        z = z.add_(eps).reciprocal_().contiguous()  # token-major (small)
        out = torch.matmul(q_r.transpose(1, 2), kv)  # [B, h, N, d]
        # Scaling the head-major product writes the token-major result: with
        # the token-major operand first, the product is laid out token-major
        # and the reshape is a view.
        out = (z.unsqueeze(-1) * out.transpose(1, 2)).reshape(b, n, c)
    return out.to(dtype), (kv, k_mean, z)


def parallel_linear_attention_bwd(do: Tensor, saved: List[Tensor], q: Tensor,
                                  k: Tensor, v: Tensor, num_heads: int,
                                  rope: Tensor, eps: float) -> tuple:
    """The analytic backward of :func:`parallel_linear_attention_fwd`, from
    its output and residuals (``saved = [out, kv, k_mean, z]``); the
    rotated q and k are formed again. Returns ``dq, dk, dv``.

    With ``u_t = rope(q_t) kv`` and ``out_t = z_t u_t``: ``dkv =
    rope(q)^T (z do)``, ``d rope(q) = (z do) kv^T``, ``d rope(k) = v
    dkv^T / N``, ``dv = rope(k) dkv / N``, and the normaliser adds
    ``-z_t (do_t . out_t)`` times ``k_mean`` to ``dq_t`` and times
    ``q_t / N`` (summed over t) to every ``dk_s``.
    """
    out, kv, k_mean, z = saved
    dtypes = (q.dtype, k.dtype, v.dtype)
    with torch.autocast(q.device.type, enabled=False):
        ct = kv.dtype
        b, n, c = q.shape
        h, d = num_heads, c // num_heads

        def heads(x: Tensor) -> Tensor:  # [B, N, C] -> [B, h, N, d] view
            return x.to(ct).reshape(b, n, h, d).transpose(1, 2)

        do = do.to(ct).reshape(b, n, h, d)
        # d(q . k_mean + eps) per token and head: -z (do . out)
        d_den = (do * out.to(ct).reshape(b, n, h, d)).sum(-1).mul_(z).neg_()
        dz = (do * z.unsqueeze(-1)).transpose(1, 2)  # [B, h, N, d]
        q_r = heads(rotate(q.to(ct), rope))
        k_r = heads(rotate(k.to(ct), rope))
        dkv = torch.matmul(q_r.transpose(-1, -2), dz).div_(n)  # [B, h, d, d]
        dq_r = torch.matmul(dz, kv.transpose(-1, -2))
        dk_r = torch.matmul(heads(v), dkv.transpose(-1, -2))
        dv = torch.matmul(k_r, dkv)

        def tokens(x: Tensor) -> Tensor:  # [B, h, N, d] -> [B, N, C]
            return x.transpose(1, 2).reshape(b, n, c)

        dq = rotate(tokens(dq_r), rope, inverse=True).view(b, n, h, d)
        dq.addcmul_(d_den.unsqueeze(-1), k_mean.unsqueeze(1))
        dk_mean = torch.einsum('bnh,bnhd->bhd', d_den,
                               q.to(ct).reshape(b, n, h, d)).div_(n)
        dk = rotate(tokens(dk_r), rope, inverse=True).view(b, n, h, d)
        dk.add_(dk_mean.unsqueeze(1))
        grads = (dq.view(b, n, c), dk.view(b, n, c), tokens(dv))
    return tuple(g.to(t) for g, t in zip(grads, dtypes))


def _fake(q: Tensor, k: Tensor, v: Tensor, num_heads: int, rope: Tensor,
          eps: float) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    b, n, c = q.shape
    h, d = num_heads, c // num_heads
    ct = _compute_dtype(q)
    return (q.new_empty(b, n, c),
            (q.new_empty(b, h, d, d, dtype=ct), q.new_empty(b, h, d, dtype=ct),
             q.new_empty(b, n, h, dtype=ct)))


linear_attention_parallel = FastPathOp(
    'linear_attention_parallel', parallel_linear_attention_fwd,
    parallel_linear_attention_bwd, _fake, grads_for=('q', 'k', 'v'),
    save_output=True, residuals=True, definition=linear_attention_fp32)


def parallel_linear_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                              rope: Tensor, eps: float = 1e-6) -> Tensor:
    """MILA linear attention (see :func:`.naive.naive_linear_attention`).

    Args:
        q (Tensor): Queries after ``elu + 1``, ``[B, N, C]``.
        k (Tensor): Keys after ``elu + 1``, ``[B, N, C]``.
        v (Tensor): Values, ``[B, N, C]``.
        num_heads (int): Number of heads h; ``C`` must divide by it.
        rope (Tensor): The RoPE table ``[N, C/2, 2]``.
        eps (float): Added to the normaliser. Defaults to 1e-6.

    Returns:
        Tensor: ``[B, N, C]`` in the dtype of ``q``.
    """
    return linear_attention_parallel(q, k, v, num_heads, rope, eps)
