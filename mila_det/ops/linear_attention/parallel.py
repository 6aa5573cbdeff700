"""The fast PyTorch path of MILA's linear attention (any device, used on CPU).

The same computation as :mod:`.naive`, arranged for throughput: the RoPE
rotation is one complex multiply per tensor instead of unbind / four
products / stack, heads are strided views of ``[B, N, C]`` (no head-major
copies), the normaliser is formed in place, and scaling the head-major
product writes the token-major result. Non-fp32 inputs are computed in fp32,
as in the reference.
"""
import torch
from torch import Tensor


def _as_pairs(x: Tensor) -> Tensor:
    """``x: [B, N, C]`` as complex ``[B, N, C/2]`` (channel pairs), copying
    only when the strides do not allow a complex view."""
    b, n, c = x.shape
    pairs = x.reshape(b, n, c // 2, 2)
    if (pairs.stride(-1) != 1 or pairs.storage_offset() % 2
            or any(s % 2 for s in pairs.stride()[:-1])):
        pairs = pairs.contiguous()
    return torch.view_as_complex(pairs)


def rotate(x: Tensor, rope: Tensor) -> Tensor:
    """2-D RoPE of ``x: [B, N, C]`` by the table ``rope: [N, C/2, 2]``."""
    rot = torch.view_as_complex(rope.to(x.dtype).contiguous())
    return torch.view_as_real(_as_pairs(x) * rot).flatten(-2)


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
    with torch.autocast(q.device.type, enabled=False):  # sums stay fp32
        dtype = torch.promote_types(q.dtype, torch.float32)
        out = _forward(q.to(dtype), k.to(dtype), v.to(dtype), num_heads,
                       rope, eps)
    return out.to(q.dtype)


def _forward(q: Tensor, k: Tensor, v: Tensor, num_heads: int, rope: Tensor,
             eps: float) -> Tensor:
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
    z = z.add_(eps).reciprocal_().contiguous()  # token-major (it is small)
    out = torch.matmul(q_r.transpose(1, 2), kv)  # [B, h, N, d]
    # Scaling the head-major product writes the token-major result: with the
    # token-major operand first, the product is laid out token-major and
    # the reshape is a view.
    return (z.unsqueeze(-1) * out.transpose(1, 2)).reshape(b, n, c)
