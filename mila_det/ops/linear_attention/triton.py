"""Triton kernels of MILA's linear attention with 2-D RoPE.

One program per (batch item, head). The forward makes two passes over the
tokens: the first accumulates ``kv = sum_t rope(k_t)^T v_t / N`` (``[d, d]``)
and ``mean(k)`` in fp32 registers; the second writes
``out_t = rope(q_t) kv / (q_t . mean(k) + eps)``. RoPE is applied on the fly
to even/odd channel halves, so rotated tensors never reach memory. The
backward also makes two passes: one for dq with the sums dkv and d mean(k),
one for dk and dv.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rotate(b_e, b_o, b_cos, b_sin):
    return b_e * b_cos - b_o * b_sin, b_o * b_cos + b_e * b_sin


@triton.jit
def _rotate_back(b_e, b_o, b_cos, b_sin):
    return b_e * b_cos + b_o * b_sin, b_o * b_cos - b_e * b_sin


@triton.jit
def _outer(b_a, b_b, USE_DOT: tl.constexpr):
    """``a^T b`` for ``a: [T, P]``, ``b: [T, D]`` -> ``[P, D]``."""
    if USE_DOT:
        return tl.dot(tl.trans(b_a), b_b, input_precision='ieee')
    else:
        return tl.sum(b_a[:, :, None] * b_b[:, None, :], axis=0)


@triton.jit
def _matmul(b_a, b_b, USE_DOT: tl.constexpr):
    """``a b`` for ``a: [T, P]``, ``b: [P, D]`` -> ``[T, D]``."""
    if USE_DOT:
        return tl.dot(b_a, b_b, input_precision='ieee')
    else:
        return tl.sum(b_a[:, :, None] * b_b[None, :, :], axis=1)


@triton.jit
def _matmul_t(b_a, b_b, USE_DOT: tl.constexpr):
    """``a b^T`` for ``a: [T, D]``, ``b: [P, D]`` -> ``[T, P]``."""
    if USE_DOT:
        return tl.dot(b_a, tl.trans(b_b), input_precision='ieee')
    else:
        return tl.sum(b_a[:, None, :] * b_b[None, :, :], axis=2)


@triton.jit
def _load_pairs(p, o_t, o_p, m_tp, C):
    """Even and odd channels ``[T, P]`` of one head, as fp32."""
    b_e = tl.load(p + o_t[:, None] * C + 2 * o_p[None, :], mask=m_tp,
                  other=0.0).to(tl.float32)
    b_o = tl.load(p + o_t[:, None] * C + 2 * o_p[None, :] + 1, mask=m_tp,
                  other=0.0).to(tl.float32)
    return b_e, b_o


@triton.jit
def _store_pairs(p, b_e, b_o, o_t, o_p, m_tp, C):
    tl.store(p + o_t[:, None] * C + 2 * o_p[None, :],
             b_e.to(p.dtype.element_ty), mask=m_tp)
    tl.store(p + o_t[:, None] * C + 2 * o_p[None, :] + 1,
             b_o.to(p.dtype.element_ty), mask=m_tp)


@triton.jit
def linear_attention_fwd_kernel(q, k, v, rope, o, kv, kmean, N, C, HEADS, D,
                                eps, BLOCK_T: tl.constexpr,
                                BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                                USE_DOT: tl.constexpr):
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // HEADS, i_bh % HEADS
    P = D // 2
    o_p = tl.arange(0, BLOCK_P)
    o_c = tl.arange(0, BLOCK_D)
    m_p, m_c = o_p < P, o_c < D
    base = i_b.to(tl.int64) * N * C + i_h * D
    p_rope = rope + (i_h * P + o_p[None, :]) * 2  # [1, P]; + t * C
    b_kv_e = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    b_kv_o = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    b_ks_e = tl.zeros([BLOCK_P], dtype=tl.float32)
    b_ks_o = tl.zeros([BLOCK_P], dtype=tl.float32)
    for t0 in range(0, N, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < N
        m_tp = m_t[:, None] & m_p[None, :]
        b_cos = tl.load(p_rope + o_t[:, None] * C, mask=m_tp, other=0.0)
        b_sin = tl.load(p_rope + o_t[:, None] * C + 1, mask=m_tp, other=0.0)
        b_k_e, b_k_o = _load_pairs(k + base, o_t, o_p, m_tp, C)
        b_v = tl.load(v + base + o_t[:, None] * C + o_c[None, :],
                      mask=m_t[:, None] & m_c[None, :], other=0.0).to(
                          tl.float32)
        b_kr_e, b_kr_o = _rotate(b_k_e, b_k_o, b_cos, b_sin)
        b_kv_e += _outer(b_kr_e, b_v, USE_DOT)
        b_kv_o += _outer(b_kr_o, b_v, USE_DOT)
        b_ks_e += tl.sum(b_k_e, axis=0)
        b_ks_o += tl.sum(b_k_o, axis=0)
    b_kv_e = b_kv_e / N
    b_kv_o = b_kv_o / N
    b_km_e = b_ks_e / N
    b_km_o = b_ks_o / N
    # saved for the backward: kv [B, HEADS, D, D], mean(k) [B, HEADS, D]
    p_kv = kv + i_bh.to(tl.int64) * D * D
    m_pc = m_p[:, None] & m_c[None, :]
    tl.store(p_kv + (2 * o_p[:, None]) * D + o_c[None, :], b_kv_e, mask=m_pc)
    tl.store(p_kv + (2 * o_p[:, None] + 1) * D + o_c[None, :], b_kv_o,
             mask=m_pc)
    tl.store(kmean + i_bh.to(tl.int64) * D + 2 * o_p, b_km_e, mask=m_p)
    tl.store(kmean + i_bh.to(tl.int64) * D + 2 * o_p + 1, b_km_o, mask=m_p)
    for t0 in range(0, N, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < N
        m_tp = m_t[:, None] & m_p[None, :]
        b_cos = tl.load(p_rope + o_t[:, None] * C, mask=m_tp, other=0.0)
        b_sin = tl.load(p_rope + o_t[:, None] * C + 1, mask=m_tp, other=0.0)
        b_q_e, b_q_o = _load_pairs(q + base, o_t, o_p, m_tp, C)
        b_qr_e, b_qr_o = _rotate(b_q_e, b_q_o, b_cos, b_sin)
        b_num = _matmul(b_qr_e, b_kv_e, USE_DOT) + \
            _matmul(b_qr_o, b_kv_o, USE_DOT)
        b_den = tl.sum(b_q_e * b_km_e[None, :] + b_q_o * b_km_o[None, :],
                       axis=1) + eps
        b_out = b_num / b_den[:, None]
        tl.store(o + base + o_t[:, None] * C + o_c[None, :],
                 b_out.to(o.dtype.element_ty),
                 mask=m_t[:, None] & m_c[None, :])


@triton.jit
def linear_attention_bwd_kernel(q, k, v, rope, do, kv, kmean, dq, dk, dv, N,
                                C, HEADS, D, eps, BLOCK_T: tl.constexpr,
                                BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                                USE_DOT: tl.constexpr):
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // HEADS, i_bh % HEADS
    P = D // 2
    o_p = tl.arange(0, BLOCK_P)
    o_c = tl.arange(0, BLOCK_D)
    m_p, m_c = o_p < P, o_c < D
    m_pc = m_p[:, None] & m_c[None, :]
    base = i_b.to(tl.int64) * N * C + i_h * D
    p_rope = rope + (i_h * P + o_p[None, :]) * 2
    p_kv = kv + i_bh.to(tl.int64) * D * D
    b_kv_e = tl.load(p_kv + (2 * o_p[:, None]) * D + o_c[None, :], mask=m_pc,
                     other=0.0)
    b_kv_o = tl.load(p_kv + (2 * o_p[:, None] + 1) * D + o_c[None, :],
                     mask=m_pc, other=0.0)
    b_km_e = tl.load(kmean + i_bh.to(tl.int64) * D + 2 * o_p, mask=m_p,
                     other=0.0)
    b_km_o = tl.load(kmean + i_bh.to(tl.int64) * D + 2 * o_p + 1, mask=m_p,
                     other=0.0)
    b_dkv_e = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    b_dkv_o = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    b_dkm_e = tl.zeros([BLOCK_P], dtype=tl.float32)
    b_dkm_o = tl.zeros([BLOCK_P], dtype=tl.float32)
    # pass 1: dq, and the sums d(kv) and d(mean k)
    for t0 in range(0, N, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < N
        m_tp = m_t[:, None] & m_p[None, :]
        m_tc = m_t[:, None] & m_c[None, :]
        b_cos = tl.load(p_rope + o_t[:, None] * C, mask=m_tp, other=0.0)
        b_sin = tl.load(p_rope + o_t[:, None] * C + 1, mask=m_tp, other=0.0)
        b_q_e, b_q_o = _load_pairs(q + base, o_t, o_p, m_tp, C)
        b_qr_e, b_qr_o = _rotate(b_q_e, b_q_o, b_cos, b_sin)
        b_do = tl.load(do + base + o_t[:, None] * C + o_c[None, :], mask=m_tc,
                       other=0.0).to(tl.float32)
        b_num = _matmul(b_qr_e, b_kv_e, USE_DOT) + \
            _matmul(b_qr_o, b_kv_o, USE_DOT)
        b_z = 1.0 / (tl.sum(b_q_e * b_km_e[None, :] + b_q_o * b_km_o[None, :],
                            axis=1) + eps)
        b_ds = b_do * b_z[:, None]  # dL/d(numerator)
        b_coef = -tl.sum(b_do * b_num, axis=1) * b_z * b_z  # dL/d(den)
        b_coef = tl.where(m_t, b_coef, 0.0)
        b_dkv_e += _outer(b_qr_e, b_ds, USE_DOT)
        b_dkv_o += _outer(b_qr_o, b_ds, USE_DOT)
        b_dkm_e += tl.sum(b_coef[:, None] * b_q_e, axis=0)
        b_dkm_o += tl.sum(b_coef[:, None] * b_q_o, axis=0)
        b_dqr_e = _matmul_t(b_ds, b_kv_e, USE_DOT)
        b_dqr_o = _matmul_t(b_ds, b_kv_o, USE_DOT)
        b_dq_e, b_dq_o = _rotate_back(b_dqr_e, b_dqr_o, b_cos, b_sin)
        b_dq_e += b_coef[:, None] * b_km_e[None, :]
        b_dq_o += b_coef[:, None] * b_km_o[None, :]
        _store_pairs(dq + base, b_dq_e, b_dq_o, o_t, o_p, m_tp, C)
    b_dkv_e = b_dkv_e / N
    b_dkv_o = b_dkv_o / N
    b_dkm_e = b_dkm_e / N
    b_dkm_o = b_dkm_o / N
    # pass 2: dk and dv
    for t0 in range(0, N, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < N
        m_tp = m_t[:, None] & m_p[None, :]
        m_tc = m_t[:, None] & m_c[None, :]
        b_cos = tl.load(p_rope + o_t[:, None] * C, mask=m_tp, other=0.0)
        b_sin = tl.load(p_rope + o_t[:, None] * C + 1, mask=m_tp, other=0.0)
        b_k_e, b_k_o = _load_pairs(k + base, o_t, o_p, m_tp, C)
        b_kr_e, b_kr_o = _rotate(b_k_e, b_k_o, b_cos, b_sin)
        b_v = tl.load(v + base + o_t[:, None] * C + o_c[None, :], mask=m_tc,
                      other=0.0).to(tl.float32)
        b_dv = _matmul(b_kr_e, b_dkv_e, USE_DOT) + \
            _matmul(b_kr_o, b_dkv_o, USE_DOT)
        tl.store(dv + base + o_t[:, None] * C + o_c[None, :],
                 b_dv.to(dv.dtype.element_ty), mask=m_tc)
        b_dkr_e = _matmul_t(b_v, b_dkv_e, USE_DOT)
        b_dkr_o = _matmul_t(b_v, b_dkv_o, USE_DOT)
        b_dk_e, b_dk_o = _rotate_back(b_dkr_e, b_dkr_o, b_cos, b_sin)
        b_dk_e += b_dkm_e[None, :]
        b_dk_o += b_dkm_o[None, :]
        _store_pairs(dk + base, b_dk_e, b_dk_o, o_t, o_p, m_tp, C)


def _config(head_dim: int):
    block_p = max(triton.next_power_of_2(head_dim // 2), 1)
    block_d = max(triton.next_power_of_2(head_dim), 2)
    use_dot = block_p >= 16
    block_t = 64 if head_dim <= 64 else 32
    if not use_dot:
        block_t = 16
    return block_t, block_p, block_d, use_dot


def linear_attention_fwd(q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                         rope: Tensor, eps: float):
    """Returns ``out [B, N, C]`` (dtype of q), ``kv [B, h, d, d]`` and
    ``mean(k) [B, h, d]`` (fp32)."""
    b, n, c = q.shape
    d = c // num_heads
    block_t, block_p, block_d, use_dot = _config(d)
    out = torch.empty_like(q)
    kv = torch.empty(b, num_heads, d, d, device=q.device, dtype=torch.float32)
    kmean = torch.empty(b, num_heads, d, device=q.device, dtype=torch.float32)
    linear_attention_fwd_kernel[(b * num_heads, )](
        q, k, v, rope, out, kv, kmean, n, c, num_heads, d, eps, block_t,
        block_p, block_d, use_dot)
    return out, kv, kmean


def linear_attention_bwd(q, k, v, num_heads, rope, eps, kv, kmean, do):
    b, n, c = q.shape
    d = c // num_heads
    block_t, block_p, block_d, use_dot = _config(d)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    linear_attention_bwd_kernel[(b * num_heads, )](
        q, k, v, rope, do.contiguous(), kv, kmean, dq, dk, dv, n, c,
        num_heads, d, eps, block_t, block_p, block_d, use_dot)
    return dq, dk, dv


class LinearAttentionFunction(torch.autograd.Function):
    """MILA linear attention on Triton kernels (forward and backward)."""

    @staticmethod
    def forward(ctx, q, k, v, num_heads, rope, eps):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        rope = rope.contiguous().float()
        out, kv, kmean = linear_attention_fwd(q, k, v, num_heads, rope, eps)
        ctx.save_for_backward(q, k, v, rope, kv, kmean)
        ctx.num_heads, ctx.eps = num_heads, eps
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, rope, kv, kmean = ctx.saved_tensors
        dq, dk, dv = linear_attention_bwd(q, k, v, ctx.num_heads, rope,
                                          ctx.eps, kv, kmean, do)
        return dq, dk, dv, None, None, None
