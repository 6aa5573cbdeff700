"""Triton kernels of MILA's linear attention with 2-D RoPE.

MILA: "Demystify Mamba in Vision: A Linear Attention Perspective"
(Han et al., NeurIPS 2024). Per head of width d, with ``r(.)`` the 2-D RoPE
rotation of each token's channel pairs::

    kv    = sum_s r(k_s)^T v_s / N       [d, d]
    kmean = sum_s k_s / N                [d]
    out_t = r(q_t) kv * z_t,   z_t = 1 / (q_t . kmean + eps)

The work is split over tokens so that even one image with two heads fills
the GPU. Forward: ``linear_attention_kv_fwd_kernel`` runs one program per
(token chunk, batch x head) and writes that chunk's ``r(k)^T v`` and key sum
in fp32; the chunks are summed in PyTorch; ``linear_attention_o_fwd_kernel``
then writes the output, again one program per (chunk, batch x head).

Backward, with ``g_t = do_t z_t`` (the gradient of the numerator) and
``c_t = -(do_t . out_t) z_t`` (the gradient of the denominator)::

    dq_t   = r^-1(g_t kv^T) + c_t kmean
    dkv    = sum_t r(q_t)^T g_t        dkmean = sum_t c_t q_t
    dv_s   = r(k_s) dkv / N
    dk_s   = r^-1(v_s dkv^T) / N + dkmean / N

``linear_attention_dq_bwd_kernel`` writes dq and the per-chunk parts of
``dkv`` and ``dkmean`` (for heads of 128 as two launches, see there); after
the chunk sum ``linear_attention_dkv_bwd_kernel`` writes dk and dv. The
products are fp32 FMA dots (``input_precision='ieee'``), as exact as the
PyTorch path. Only ``kv`` and ``kmean`` are saved by the forward; the
rotated tensors, numerators and normalisers are recomputed.

Every tile is read as one contiguous ``[BLOCK_T, BLOCK_D]`` block of a
head's channels (q and k through their own strides, so halves of one
projection need no copy); the RoPE table's ``[N, C/2, 2]`` layout gives the
cosines and sines of a head as one contiguous block as well, and the
rotation splits both into channel pairs in registers.
"""
from typing import Dict, List, NamedTuple, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._guard import device_guard
from .._op import FastPathOp
from .._report import KernelLaunch, KernelVariant, signature
from .naive import linear_attention_fp32

# Programs a launch aims at (about four per SM of a 132-SM GPU); the token
# chunk of one program is sized from it, within the bounds of ``_config``.
TARGET_PROGRAMS = 512


@triton.jit
def _rotate(b_x, b_r, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
            INVERSE: tl.constexpr):
    """RoPE of a ``[BLOCK_T, BLOCK_D]`` tile ``b_x`` by the cos/sin tile
    ``b_r`` (same shape, cos at even and sin at odd columns); ``INVERSE``
    rotates the other way (the transpose, for gradients)."""
    b_e, b_o = tl.split(tl.reshape(b_x, [BLOCK_T, BLOCK_D // 2, 2]))
    b_cos, b_sin = tl.split(tl.reshape(b_r, [BLOCK_T, BLOCK_D // 2, 2]))
    if INVERSE:
        b_sin = -b_sin
    b_y = tl.join(b_e * b_cos - b_o * b_sin, b_o * b_cos + b_e * b_sin)
    return tl.reshape(b_y, [BLOCK_T, BLOCK_D])


@triton.jit
def linear_attention_kv_fwd_kernel(k, v, rope, kv, ks, s_kb, s_kt, s_vb,
                                   s_vt, N, C, H, D, CHUNK,
                                   BLOCK_T: tl.constexpr,
                                   BLOCK_D: tl.constexpr):
    """One chunk's ``sum r(k)^T v`` -> ``kv [chunks, B*H, D, D]`` and
    ``sum k`` -> ``ks [chunks, B*H, D]`` (fp32, not yet divided by N)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_r = tl.arange(0, BLOCK_T)
    o_c = tl.arange(0, BLOCK_D)
    m_c = o_c < D
    b_kv = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    b_ks = tl.zeros([BLOCK_D], dtype=tl.float32)
    t_start = i_c * CHUNK
    t_end = tl.minimum(t_start + CHUNK, N)
    t64 = t_start.to(tl.int64)
    p_k = k + i_b.to(tl.int64) * s_kb + t64 * s_kt + i_h * D
    p_v = v + i_b.to(tl.int64) * s_vb + t64 * s_vt + i_h * D
    p_r = rope + t64 * C + i_h * D
    for t0 in range(t_start, t_end, BLOCK_T):
        m_tc = ((t0 + o_r) < N)[:, None] & m_c[None, :]
        b_k = tl.load(p_k + o_r[:, None] * s_kt + o_c[None, :], mask=m_tc,
                      other=0.0).to(tl.float32)
        b_v = tl.load(p_v + o_r[:, None] * s_vt + o_c[None, :], mask=m_tc,
                      other=0.0).to(tl.float32)
        b_r = tl.load(p_r + o_r[:, None] * C + o_c[None, :], mask=m_tc,
                      other=0.0)
        b_kr = _rotate(b_k, b_r, BLOCK_T, BLOCK_D, False)
        b_kv += tl.dot(tl.trans(b_kr), b_v, input_precision='ieee')
        b_ks += tl.sum(b_k, axis=0)
        p_k += BLOCK_T * s_kt
        p_v += BLOCK_T * s_vt
        p_r += BLOCK_T * C
    i_out = i_c.to(tl.int64) * tl.num_programs(1) + i_bh
    m_cc = m_c[:, None] & m_c[None, :]
    tl.store(kv + i_out * D * D + o_c[:, None] * D + o_c[None, :], b_kv,
             mask=m_cc)
    tl.store(ks + i_out * D + o_c, b_ks, mask=m_c)


@triton.jit
def linear_attention_o_fwd_kernel(q, rope, kv, kmean, o, s_qb, s_qt, N, C, H,
                                  D, CHUNK, eps, BLOCK_T: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
    """``o = r(q) kv / (q . kmean + eps)`` for one chunk of tokens; ``kv
    [B*H, D, D]`` and ``kmean [B*H, D]`` in fp32, ``o [B, N, C]``."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_r = tl.arange(0, BLOCK_T)
    o_c = tl.arange(0, BLOCK_D)
    m_c = o_c < D
    m_cc = m_c[:, None] & m_c[None, :]
    b_kv = tl.load(kv + i_bh.to(tl.int64) * D * D + o_c[:, None] * D +
                   o_c[None, :], mask=m_cc, other=0.0)
    b_km = tl.load(kmean + i_bh.to(tl.int64) * D + o_c, mask=m_c, other=0.0)
    t_start = i_c * CHUNK
    t_end = tl.minimum(t_start + CHUNK, N)
    t64 = t_start.to(tl.int64)
    p_q = q + i_b.to(tl.int64) * s_qb + t64 * s_qt + i_h * D
    p_r = rope + t64 * C + i_h * D
    p_o = o + (i_b.to(tl.int64) * N + t64) * C + i_h * D
    for t0 in range(t_start, t_end, BLOCK_T):
        m_tc = ((t0 + o_r) < N)[:, None] & m_c[None, :]
        b_q = tl.load(p_q + o_r[:, None] * s_qt + o_c[None, :], mask=m_tc,
                      other=0.0).to(tl.float32)
        b_r = tl.load(p_r + o_r[:, None] * C + o_c[None, :], mask=m_tc,
                      other=0.0)
        b_qr = _rotate(b_q, b_r, BLOCK_T, BLOCK_D, False)
        b_z = 1.0 / (tl.sum(b_q * b_km[None, :], axis=1) + eps)
        b_o = tl.dot(b_qr, b_kv, input_precision='ieee') * b_z[:, None]
        tl.store(p_o + o_r[:, None] * C + o_c[None, :],
                 b_o.to(o.dtype.element_ty), mask=m_tc)
        p_q += BLOCK_T * s_qt
        p_r += BLOCK_T * C
        p_o += BLOCK_T * C


@triton.jit
def linear_attention_dq_bwd_kernel(q, rope, do, kv, kmean, dq, dkv, dkm, cz,
                                   s_qb,
                                   s_qt, s_db, s_dt, N, C, H, D, CHUNK, eps,
                                   BLOCK_T: tl.constexpr,
                                   BLOCK_D: tl.constexpr,
                                   WRITE_DQ: tl.constexpr,
                                   WRITE_STATE: tl.constexpr):
    """dq for one chunk of tokens (``WRITE_DQ``), and the chunk's
    ``sum r(q)^T g`` -> ``dkv [chunks, B*H, D, D]`` and ``sum c q`` ->
    ``dkm [chunks, B*H, D]`` (``WRITE_STATE``; fp32, not yet divided by N).
    Wide heads run the two halves as separate launches: the first (dq
    only) also writes ``c_t z_t`` per token to ``cz [B*H, N]`` (fp32), which
    the second reads instead of recomputing it from ``kv``; each then holds
    at most two ``[D, D]`` blocks in registers instead of three."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_r = tl.arange(0, BLOCK_T)
    o_c = tl.arange(0, BLOCK_D)
    m_c = o_c < D
    m_cc = m_c[:, None] & m_c[None, :]
    if WRITE_DQ:
        b_kv = tl.load(kv + i_bh.to(tl.int64) * D * D + o_c[:, None] * D +
                       o_c[None, :], mask=m_cc, other=0.0)
    b_km = tl.load(kmean + i_bh.to(tl.int64) * D + o_c, mask=m_c, other=0.0)
    b_dkv = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    b_dkm = tl.zeros([BLOCK_D], dtype=tl.float32)
    p_cz = cz + i_bh.to(tl.int64) * N + i_c * CHUNK
    t_start = i_c * CHUNK
    t_end = tl.minimum(t_start + CHUNK, N)
    t64 = t_start.to(tl.int64)
    p_q = q + i_b.to(tl.int64) * s_qb + t64 * s_qt + i_h * D
    p_do = do + i_b.to(tl.int64) * s_db + t64 * s_dt + i_h * D
    p_r = rope + t64 * C + i_h * D
    p_dq = dq + (i_b.to(tl.int64) * N + t64) * C + i_h * D
    for t0 in range(t_start, t_end, BLOCK_T):
        m_tc = ((t0 + o_r) < N)[:, None] & m_c[None, :]
        b_q = tl.load(p_q + o_r[:, None] * s_qt + o_c[None, :], mask=m_tc,
                      other=0.0).to(tl.float32)
        b_do = tl.load(p_do + o_r[:, None] * s_dt + o_c[None, :], mask=m_tc,
                       other=0.0).to(tl.float32)
        b_r = tl.load(p_r + o_r[:, None] * C + o_c[None, :], mask=m_tc,
                      other=0.0)
        b_qr = _rotate(b_q, b_r, BLOCK_T, BLOCK_D, False)
        m_t = (t0 + o_r) < N
        # rows past N are zeros: keep 1 / eps (inf when eps = 0) out of sums
        b_z = tl.where(m_t, 1.0 / (tl.sum(b_q * b_km[None, :], axis=1) + eps),
                       0.0)
        b_g = b_do * b_z[:, None]  # d loss / d numerator
        if WRITE_DQ:
            b_num = tl.dot(b_qr, b_kv, input_precision='ieee')
            # d loss / d denominator
            b_cz = -tl.sum(b_g * b_num, axis=1) * b_z
            if not WRITE_STATE:
                tl.store(p_cz + o_r, b_cz, mask=m_t)
        else:
            b_cz = tl.load(p_cz + o_r, mask=m_t, other=0.0)
        if WRITE_DQ:
            b_dqr = tl.dot(b_g, tl.trans(b_kv), input_precision='ieee')
            b_dq = _rotate(b_dqr, b_r, BLOCK_T, BLOCK_D, True) + \
                b_cz[:, None] * b_km[None, :]
            tl.store(p_dq + o_r[:, None] * C + o_c[None, :],
                     b_dq.to(dq.dtype.element_ty), mask=m_tc)
        if WRITE_STATE:
            b_dkv += tl.dot(tl.trans(b_qr), b_g, input_precision='ieee')
            b_dkm += tl.sum(b_cz[:, None] * b_q, axis=0)
        p_q += BLOCK_T * s_qt
        p_do += BLOCK_T * s_dt
        p_r += BLOCK_T * C
        p_dq += BLOCK_T * C
        p_cz += BLOCK_T
    if WRITE_STATE:
        i_out = i_c.to(tl.int64) * tl.num_programs(1) + i_bh
        tl.store(dkv + i_out * D * D + o_c[:, None] * D + o_c[None, :],
                 b_dkv, mask=m_cc)
        tl.store(dkm + i_out * D + o_c, b_dkm, mask=m_c)


@triton.jit
def linear_attention_dkv_bwd_kernel(k, v, rope, dkv, dkm, dk, dv, s_kb, s_kt,
                                    s_vb, s_vt, N, C, H, D, CHUNK,
                                    BLOCK_T: tl.constexpr,
                                    BLOCK_D: tl.constexpr):
    """dk and dv for one chunk of tokens from ``dkv [B*H, D, D]`` and
    ``dkm [B*H, D]`` (fp32, already divided by N)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_r = tl.arange(0, BLOCK_T)
    o_c = tl.arange(0, BLOCK_D)
    m_c = o_c < D
    m_cc = m_c[:, None] & m_c[None, :]
    b_dkv = tl.load(dkv + i_bh.to(tl.int64) * D * D + o_c[:, None] * D +
                    o_c[None, :], mask=m_cc, other=0.0)
    b_dkm = tl.load(dkm + i_bh.to(tl.int64) * D + o_c, mask=m_c, other=0.0)
    t_start = i_c * CHUNK
    t_end = tl.minimum(t_start + CHUNK, N)
    t64 = t_start.to(tl.int64)
    p_k = k + i_b.to(tl.int64) * s_kb + t64 * s_kt + i_h * D
    p_v = v + i_b.to(tl.int64) * s_vb + t64 * s_vt + i_h * D
    p_r = rope + t64 * C + i_h * D
    o_out = (i_b.to(tl.int64) * N + t64) * C + i_h * D
    p_dk = dk + o_out
    p_dv = dv + o_out
    for t0 in range(t_start, t_end, BLOCK_T):
        m_tc = ((t0 + o_r) < N)[:, None] & m_c[None, :]
        b_k = tl.load(p_k + o_r[:, None] * s_kt + o_c[None, :], mask=m_tc,
                      other=0.0).to(tl.float32)
        b_v = tl.load(p_v + o_r[:, None] * s_vt + o_c[None, :], mask=m_tc,
                      other=0.0).to(tl.float32)
        b_r = tl.load(p_r + o_r[:, None] * C + o_c[None, :], mask=m_tc,
                      other=0.0)
        b_kr = _rotate(b_k, b_r, BLOCK_T, BLOCK_D, False)
        b_dv = tl.dot(b_kr, b_dkv, input_precision='ieee')
        tl.store(p_dv + o_r[:, None] * C + o_c[None, :],
                 b_dv.to(dv.dtype.element_ty), mask=m_tc)
        b_dkr = tl.dot(b_v, tl.trans(b_dkv), input_precision='ieee')
        b_dk = _rotate(b_dkr, b_r, BLOCK_T, BLOCK_D, True) + b_dkm[None, :]
        tl.store(p_dk + o_r[:, None] * C + o_c[None, :],
                 b_dk.to(dk.dtype.element_ty), mask=m_tc)
        p_k += BLOCK_T * s_kt
        p_v += BLOCK_T * s_vt
        p_r += BLOCK_T * C
        p_dk += BLOCK_T * C
        p_dv += BLOCK_T * C


class Tile(NamedTuple):
    """How one kernel launches: tokens per tile, warps."""
    block_t: int
    num_warps: int


# Head width (rounded up to a power of two) -> kernel role -> tile. Chosen
# by compiling for sm_80 and sm_90 (fp32 / bf16 / fp16): the products run
# as fp32 FMA dots whose operands live in registers, so small token tiles
# and more warps for wide heads keep every kernel free of spills. 'dq' and
# 'state' are the two halves of the dq kernel that wide heads launch apart
# ('dq_state' runs both in one).
TILES: Dict[int, Dict[str, Tile]] = {
    16: dict(kv=Tile(16, 4), o=Tile(16, 4), dq_state=Tile(16, 4),
             dkv=Tile(16, 4)),
    32: dict(kv=Tile(16, 4), o=Tile(16, 4), dq_state=Tile(16, 4),
             dkv=Tile(16, 4)),
    64: dict(kv=Tile(16, 8), o=Tile(16, 8), dq_state=Tile(16, 8),
             dkv=Tile(16, 8)),
    128: dict(kv=Tile(16, 16), o=Tile(16, 16), dq=Tile(16, 16),
              state=Tile(8, 8), dkv=Tile(16, 16)),
}


class LaunchConfig(NamedTuple):
    """How the kernels of one head width launch."""
    block_d: int  # head width rounded up to a power of two (>= 16)
    chunk: int  # tokens per program, a multiple of every tile
    tiles: Dict[str, Tile]


def _config(n: int, heads: int, head_dim: int) -> LaunchConfig:
    """Tiles, warps and the token chunk for ``n`` tokens and ``heads``
    (batch x heads) heads of width ``head_dim``.

    The chunk is a power of two, at least twice the head width (so the
    ``[d, d]`` parts the chunks write stay below a quarter of the bytes they
    read) and sized for about :data:`TARGET_PROGRAMS` programs.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_d not in TILES:
        raise ValueError(f'linear_attention: no Triton tiles for head width '
                         f'{head_dim} (at most 128)')
    low = max(64, 2 * block_d)
    want = triton.next_power_of_2(triton.cdiv(n * heads, TARGET_PROGRAMS))
    chunk = min(max(want, low), max(low, triton.next_power_of_2(n)))
    return LaunchConfig(block_d, chunk, TILES[block_d])


def _launch(cfg: LaunchConfig, role: str) -> dict:
    tile = cfg.tiles[role]
    return dict(BLOCK_T=tile.block_t, BLOCK_D=cfg.block_d,
                num_warps=tile.num_warps, num_stages=1)


def _strides(x: Tensor) -> Tuple[Tensor, int, int]:
    """``x [B, N, C]`` with unit channel stride (copied only if it has
    none), and its batch and token strides."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, x.stride(0), x.stride(1)


def linear_attention_fwd(
        q: Tensor, k: Tensor, v: Tensor, num_heads: int, rope: Tensor,
        eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward kernels.

    Args:
        q, k, v (Tensor): ``[B, N, C]``, any batch and token strides.
        num_heads (int): Heads h; ``d = C / h`` must be even.
        rope (Tensor): ``[N, C/2, 2]`` fp32, contiguous.
        eps (float): Added to the normaliser.

    Returns:
        tuple: ``out [B, N, C]`` (dtype of q), ``kv [B*h, d, d]`` and
        ``kmean [B*h, d]`` (fp32).
    """
    with device_guard('linear_attention', q=q, k=k, v=v, rope=rope):
        return _fwd(q, k, v, num_heads, rope, eps)


def _fwd(q: Tensor, k: Tensor, v: Tensor, num_heads: int, rope: Tensor,
         eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    b, n, c = q.shape
    d = c // num_heads
    cfg = _config(n, b * num_heads, d)
    grid = (triton.cdiv(n, cfg.chunk), b * num_heads)
    q, s_qb, s_qt = _strides(q)
    k, s_kb, s_kt = _strides(k)
    v, s_vb, s_vt = _strides(v)
    f32 = dict(device=q.device, dtype=torch.float32)
    kv_parts = torch.empty(grid[0], grid[1], d, d, **f32)
    ks_parts = torch.empty(grid[0], grid[1], d, **f32)
    out = torch.empty(b, n, c, device=q.device, dtype=q.dtype)
    linear_attention_kv_fwd_kernel[grid](
        k, v, rope, kv_parts, ks_parts, s_kb, s_kt, s_vb, s_vt, n, c,
        num_heads, d, cfg.chunk, **_launch(cfg, 'kv'))
    kv = kv_parts.sum(0).div_(n)
    kmean = ks_parts.sum(0).div_(n)
    linear_attention_o_fwd_kernel[grid](
        q, rope, kv, kmean, out, s_qb, s_qt, n, c, num_heads, d, cfg.chunk,
        eps, **_launch(cfg, 'o'))
    return out, kv, kmean


def linear_attention_bwd(
        q: Tensor, k: Tensor, v: Tensor, num_heads: int, rope: Tensor,
        eps: float, kv: Tensor, kmean: Tensor,
        do: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward kernels.

    Args:
        q, k, v (Tensor): The forward's inputs, ``[B, N, C]``.
        num_heads (int): Heads h.
        rope (Tensor): ``[N, C/2, 2]`` fp32, contiguous.
        eps (float): The forward's eps.
        kv (Tensor): ``[B*h, d, d]`` fp32, from :func:`linear_attention_fwd`.
        kmean (Tensor): ``[B*h, d]`` fp32, likewise.
        do (Tensor): Gradient of the output, ``[B, N, C]``.

    Returns:
        tuple: ``dq, dk, dv``, each ``[B, N, C]`` contiguous in the dtype of
        its input.
    """
    with device_guard('linear_attention backward', q=q, k=k, v=v, rope=rope,
                      do=do):
        return _bwd(q, k, v, num_heads, rope, eps, kv, kmean, do)


def _bwd(q: Tensor, k: Tensor, v: Tensor, num_heads: int, rope: Tensor,
         eps: float, kv: Tensor, kmean: Tensor,
         do: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    b, n, c = q.shape
    d = c // num_heads
    cfg = _config(n, b * num_heads, d)
    grid = (triton.cdiv(n, cfg.chunk), b * num_heads)
    q, s_qb, s_qt = _strides(q)
    k, s_kb, s_kt = _strides(k)
    v, s_vb, s_vt = _strides(v)
    do, s_db, s_dt = _strides(do)
    f32 = dict(device=q.device, dtype=torch.float32)
    dkv_parts = torch.empty(grid[0], grid[1], d, d, **f32)
    dkm_parts = torch.empty(grid[0], grid[1], d, **f32)
    dq = torch.empty(b, n, c, device=q.device, dtype=q.dtype)
    dk = torch.empty(b, n, c, device=k.device, dtype=k.dtype)
    dv = torch.empty(b, n, c, device=v.device, dtype=v.dtype)
    args = (s_qb, s_qt, s_db, s_dt, n, c, num_heads, d, cfg.chunk, eps)
    if 'dq_state' in cfg.tiles:
        linear_attention_dq_bwd_kernel[grid](
            q, rope, do, kv, kmean, dq, dkv_parts, dkm_parts, dkm_parts, *args,
            WRITE_DQ=True, WRITE_STATE=True, **_launch(cfg, 'dq_state'))
    else:
        cz = torch.empty(b * num_heads, n, **f32)
        linear_attention_dq_bwd_kernel[grid](
            q, rope, do, kv, kmean, dq, dkv_parts, dkm_parts, cz, *args,
            WRITE_DQ=True, WRITE_STATE=False, **_launch(cfg, 'dq'))
        linear_attention_dq_bwd_kernel[grid](
            q, rope, do, kv, kmean, dq, dkv_parts, dkm_parts, cz, *args,
            WRITE_DQ=False, WRITE_STATE=True, **_launch(cfg, 'state'))
    dkv = dkv_parts.sum(0).div_(n)
    dkm = dkm_parts.sum(0).div_(n)
    linear_attention_dkv_bwd_kernel[grid](
        k, v, rope, dkv, dkm, dk, dv, s_kb, s_kt, s_vb, s_vt, n, c, num_heads,
        d, cfg.chunk, **_launch(cfg, 'dkv'))
    return dq, dk, dv


def _forward(q: Tensor, k: Tensor, v: Tensor, num_heads: int, rope: Tensor,
             eps: float) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    out, kv, kmean = linear_attention_fwd(q, k, v, num_heads, rope, eps)
    return out, (kv, kmean)


def _backward(do: Tensor, saved: List[Tensor], q: Tensor, k: Tensor,
              v: Tensor, num_heads: int, rope: Tensor, eps: float) -> tuple:
    kv, kmean = saved
    return linear_attention_bwd(q, k, v, num_heads, rope, eps, kv, kmean, do)


def _fake(q: Tensor, k: Tensor, v: Tensor, num_heads: int, rope: Tensor,
          eps: float) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    b, n, c = q.shape
    d = c // num_heads
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(b, n, c),
            (q.new_empty(b * num_heads, d, d, **f32),
             q.new_empty(b * num_heads, d, **f32)))


# Keeps the inputs as given (views, no copies) and the fp32 kv and kmean;
# everything else is recomputed in the backward kernels.
linear_attention_triton = FastPathOp(
    'linear_attention_triton', _forward, _backward, _fake,
    grads_for=('q', 'k', 'v'), residuals=True,
    definition=linear_attention_fp32)


def triton_linear_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int,
                            rope: Tensor, eps: float) -> Tensor:
    """MILA linear attention on the Triton kernels, forward and backward."""
    return linear_attention_triton(q, k, v, num_heads,
                                   rope.float().contiguous(), eps)


# -- what tools/analysis/kernel_report.py compiles and reports -------------

HEAD_WIDTHS = (32, 64, 128)  # every MILA backbone has heads of 32
IO_ARGS = ('q', 'k', 'v', 'o', 'do', 'dq', 'dk', 'dv')
INT_ARGS = ('N', 'C', 'H', 'D', 'CHUNK')


ROLES = {
    'kv': linear_attention_kv_fwd_kernel,
    'o': linear_attention_o_fwd_kernel,
    'dq_state': linear_attention_dq_bwd_kernel,
    'dq': linear_attention_dq_bwd_kernel,
    'state': linear_attention_dq_bwd_kernel,
    'dkv': linear_attention_dkv_bwd_kernel,
}
SPLIT_FLAGS = dict(dq_state=(True, True), dq=(True, False),
                   state=(False, True))


def _detail(dtype: str, head_dim: int, role: str) -> str:
    """'fp32 d32'; the halves of a split dq kernel add ' dq' / ' state'."""
    return f'{dtype} d{head_dim}' + (f' {role}' if role in ('dq', 'state')
                                     else '')


def _variant(role: str, dtype: str, head_dim: int) -> KernelVariant:
    fn = ROLES[role]
    cfg = _config(64000, 2, head_dim)
    launch = _launch(cfg, role)
    const = dict(BLOCK_T=launch['BLOCK_T'], BLOCK_D=launch['BLOCK_D'])
    if role in SPLIT_FLAGS:
        const.update(zip(('WRITE_DQ', 'WRITE_STATE'), SPLIT_FLAGS[role]))
    types = {a: '*fp32' for a in fn.arg_names}
    types.update({a: f'*{dtype}' for a in IO_ARGS})
    types.update({a: 'i32' for a in fn.arg_names
                  if a in INT_ARGS or a.startswith('s_')})
    types['eps'] = 'fp32'
    return KernelVariant(fn.__name__, _detail(dtype, head_dim, role), fn,
                         signature(fn, types, const), const,
                         launch['num_warps'], launch['num_stages'])


def report_variants() -> List[KernelVariant]:
    """Every kernel launch form for q/k/v/o and gradients in fp32, bf16 and
    fp16, at head widths 32, 64 and 128, with the tiles and warps they
    launch with."""
    return [
        _variant(role, dt, d) for dt in ('fp32', 'bf16', 'fp16')
        for d in HEAD_WIDTHS for role in TILES[d]
    ]


def report_launches() -> List[KernelLaunch]:
    """MILA-T stage 1 at 1x3x800x1280 (200x320 tokens, C = 64, 2 heads of
    32), batch 1 and 2, fp32: the programs of each launch and the bytes it
    reads and writes (tiles of q/k/v/do and the RoPE table; the per-chunk
    ``[d, d]`` parts; outputs). The chunk sums run in PyTorch between the
    launches (about the size of the parts they read)."""
    n, c, heads = 200 * 320, 64, 2
    d = c // heads
    out = []
    for batch in (1, 2):
        cfg = _config(n, batch * heads, d)
        programs = triton.cdiv(n, cfg.chunk) * batch * heads
        tile = batch * n * c * 4  # one [B, N, C] fp32 tensor (or the table
        # read once per batch item)
        parts = programs * (d * d + d) * 4
        state = programs * (d * d + d) * 4  # kv / kmean read per program
        model = f'MILA-T b{batch}'
        for fn, nbytes in (
                (linear_attention_kv_fwd_kernel, 3 * tile + parts),
                (linear_attention_o_fwd_kernel, 3 * tile + state),
                (linear_attention_dq_bwd_kernel, 4 * tile + state + parts),
                (linear_attention_dkv_bwd_kernel, 5 * tile + state)):
            out.append(KernelLaunch(model, fn.__name__, f'fp32 d{d}',
                                    programs, nbytes))
    return out
