"""Triton kernels of the selective scan (S6) with grouped B and C.

"Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu and
Dao, 2023), in VMamba's grouped form (Liu et al., NeurIPS 2024). The scan
runs parallel over the sequence: the tokens are cut into segments of
``BLOCK_T`` tokens, and one program owns one ``[BLOCK_D, BLOCK_T]`` tile
(a block of channels of one group, one segment, one batch item), contiguous
along L. Inside a tile the recurrence ``h_t = a_t h_{t-1} + b_t`` is a
``tl.associative_scan`` along the token axis over the pairs ``(a, b)`` with
``(a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2)``, one state index ``n`` at a
time (a loop over n keeps the registers of a 2-D tile for every N).

Forward, three launches (one when the sequence fits one segment, which
starts from zero):

1. ``selective_scan_chunk_fwd_kernel``: every segment's end state from a
   zero start and its total decay, all segments at once;
2. ``selective_scan_carry_kernel``: a scan over the segments
   (``[B, D_ch, N, n_seg]`` rows) gives the state entering every segment;
3. ``selective_scan_fwd_kernel``: every segment again from its true start
   state, writing y.

Only the segment start states (``[B, D_ch, N, n_seg]`` fp32) are kept for
the backward, and only when a gradient is needed (grad mode on and an input
requiring it). The backward mirrors this: ``selective_scan_chunk_bwd_kernel``
gives each segment's local ``dL/dh`` at its first token and the product of
its decays, the carry kernel run right to left gives the ``dL/dh`` entering
each segment from the right, and ``selective_scan_bwd_kernel`` recomputes
the states of a segment from its saved start, scans ``dL/dh`` backwards and
writes every gradient. Sums across programs (dA, dD, the bias gradient, and
dB / dC over a group's channel blocks) are written as per-program partials
and reduced on the host: deterministic, no atomics. States and gradients
accumulate in fp32 whatever the input dtype.

Tiles follow the shapes: a segment is ``BLOCK_T`` tokens or the sequence
rounded up to a power of 2 when shorter, a channel block at most the
group's width rounded up, and the carry scans at most the segment count
rounded up; so the CPU tests, which run these same kernels in Triton's
interpreter, run small tiles on their small shapes. ``block_t=`` sets the
segment length (tests use short ones to get many segments).
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._export import export_selective_scan
from .._guard import device_guard
from .._op import FastPathOp
from .._report import KernelLaunch, KernelVariant, signature

# Tokens per segment (one tile); channels per tile and warps of the forward
# kernels, of the backward's first pass and of its second: the largest tiles
# that compile for sm_80 / sm_90 without spilling (kernel_report.py).
BLOCK_T = 128
FWD_BLOCK_D, FWD_WARPS = 16, 8
CHUNK_BWD_BLOCK_D, CHUNK_BWD_WARPS = 16, 8
BWD_BLOCK_D, BWD_WARPS = 8, 8
CARRY_BLOCK_S, CARRY_WARPS = 512, 2
# Warps of the backward's second pass without Mamba's softplus and D (the
# forget gate's flags): at 8 warps ptxas for sm_80 holds those lighter
# variants to 128 registers (two blocks per SM) and spills; at 16 warps a
# thread keeps half as many rows of the same tile and nothing spills.
BWD_LIGHT_WARPS = 16


def _bwd_warps(has_d: bool, softplus: bool) -> int:
    """Warps of :func:`selective_scan_bwd_kernel` for its flags."""
    return BWD_WARPS if has_d and softplus else BWD_LIGHT_WARPS


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))


@triton.jit
def _combine(a1, b1, a2, b2):
    """``h -> a2 (a1 h + b1) + b2``: step 1, then step 2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _scan(b_a, b_b, AXIS: tl.constexpr, REVERSE: tl.constexpr):
    """``h_t = a_t h_{t-1} + b_t`` from a zero start along ``AXIS`` (right
    to left when ``REVERSE``): the cumulative ``(prod a, h)``."""
    return tl.associative_scan((b_a, b_b), AXIS, _combine, reverse=REVERSE)


@triton.jit
def _load_step(delta, delta_bias, o_row, o_t, m_dt, o_d, m_d,
               HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """The step ``dt`` of a ``[BLOCK_D, BLOCK_T]`` tile (0 outside the
    sequence, so those tokens neither decay nor add) and its pre-softplus
    value."""
    b_pre = tl.load(delta + o_row[:, None] + o_t[None, :], mask=m_dt,
                    other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_pre += tl.load(delta_bias + o_d, mask=m_d,
                         other=0.0).to(tl.float32)[:, None]
    if SOFTPLUS:
        b_dt = _softplus(b_pre)
    else:
        b_dt = b_pre
    return tl.where(m_dt, b_dt, 0.0), b_pre


@triton.jit
def selective_scan_chunk_fwd_kernel(u, delta, A, B, delta_bias, ends, decays,
                                    DCH, L, DG, N, NSEG,
                                    HAS_BIAS: tl.constexpr,
                                    SOFTPLUS: tl.constexpr,
                                    SCALE_INPUT: tl.constexpr,
                                    BLOCK_D: tl.constexpr,
                                    BLOCK_T: tl.constexpr):
    """Pass 1: each segment's end state from a zero start, and its decay
    ``prod_t a_t`` (``ends, decays: [B, D_ch, N, n_seg]``)."""
    i_s, i_dg, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_dblk = tl.cdiv(DG, BLOCK_D)
    i_g, i_db = i_dg // n_dblk, i_dg % n_dblk
    o_dg = i_db * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_dg < DG
    o_d = i_g * DG + o_dg
    o_t = i_s * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < L
    m_dt = m_d[:, None] & m_t[None, :]
    o_row = (i_b.to(tl.int64) * DCH + o_d) * L  # [BLOCK_D]
    b_dt, _ = _load_step(delta, delta_bias, o_row, o_t, m_dt, o_d, m_d,
                         HAS_BIAS, SOFTPLUS)
    b_x = tl.load(u + o_row[:, None] + o_t[None, :], mask=m_dt,
                  other=0.0).to(tl.float32)
    if SCALE_INPUT:
        b_x = b_x * b_dt
    m_last = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[None, :]
    o_bc = (i_b.to(tl.int64) * (DCH // DG) + i_g) * N
    o_state = (i_b.to(tl.int64) * DCH + o_d) * N * NSEG + i_s
    for n in range(N):
        o_bcn = o_bc * L + n * L  # row n of B / C (n * L < 2^31)
        b_A = tl.load(A + o_d * N + n, mask=m_d, other=0.0).to(tl.float32)
        b_B = tl.load(B + o_bcn + o_t, mask=m_t,
                      other=0.0).to(tl.float32)
        b_a = tl.exp(b_dt * b_A[:, None])
        b_b = b_x * b_B[None, :]
        b_pa, b_pb = _scan(b_a, b_b, 1, False)
        b_end = tl.sum(tl.where(m_last, b_pb, 0.0), axis=1)
        b_decay = tl.sum(tl.where(m_last, b_pa, 0.0), axis=1)
        tl.store(ends + o_state + n * NSEG, b_end, mask=m_d)
        tl.store(decays + o_state + n * NSEG, b_decay, mask=m_d)


@triton.jit
def selective_scan_carry_kernel(decays, values, out, ROWS, NSEG,
                                REVERSE: tl.constexpr,
                                BLOCK_R: tl.constexpr,
                                BLOCK_S: tl.constexpr):
    """Pass over the segments of ``BLOCK_R`` rows of ``[ROWS, n_seg]``:
    with ``c_s = decays_s c_{s-1} + values_s`` (``c_{s+1}`` on the right
    when ``REVERSE``), ``out_s`` is the carry entering segment s, i.e.
    ``c_{s-1}`` (``c_{s+1}``), and 0 for the first (last) segment."""
    i_r = tl.program_id(0)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < ROWS
    o_base = o_r.to(tl.int64)[:, None] * NSEG  # [BLOCK_R, 1]
    o_blk = tl.arange(0, BLOCK_S)[None, :]
    if REVERSE:
        tl.store(out + o_base + NSEG - 1, 0.0, mask=m_r[:, None])
    else:
        tl.store(out + o_base, 0.0, mask=m_r[:, None])
    b_c = tl.zeros([BLOCK_R], dtype=tl.float32)  # the carry so far
    for i in range(tl.cdiv(NSEG, BLOCK_S)):
        if REVERSE:
            o_s = NSEG - (i + 1) * BLOCK_S + o_blk
        else:
            o_s = i * BLOCK_S + o_blk
        m_s = m_r[:, None] & (o_s >= 0) & (o_s < NSEG)
        b_a = tl.load(decays + o_base + o_s, mask=m_s, other=1.0)
        b_v = tl.load(values + o_base + o_s, mask=m_s, other=0.0)
        b_pa, b_pv = _scan(b_a, b_v, 1, REVERSE)
        b_h = b_pa * b_c[:, None] + b_pv
        if REVERSE:
            tl.store(out + o_base + o_s - 1, b_h, mask=m_s & (o_s >= 1))
            b_c = tl.sum(tl.where(o_blk == 0, b_h, 0.0), axis=1)
        else:
            tl.store(out + o_base + o_s + 1, b_h,
                     mask=m_s & (o_s + 1 < NSEG))
            b_c = tl.sum(tl.where(o_blk == BLOCK_S - 1, b_h, 0.0), axis=1)


@triton.jit
def selective_scan_fwd_kernel(u, delta, A, B, C, D, delta_bias, starts, y,
                              DCH, L, DG, N, NSEG, HAS_D: tl.constexpr,
                              HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                              SCALE_INPUT: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Pass 2: each segment from its start state (``starts:
    [B, D_ch, N, n_seg]``); ``y = sum_n C_n h_n + D u`` in fp32."""
    i_s, i_dg, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_dblk = tl.cdiv(DG, BLOCK_D)
    i_g, i_db = i_dg // n_dblk, i_dg % n_dblk
    o_dg = i_db * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_dg < DG
    o_d = i_g * DG + o_dg
    o_t = i_s * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < L
    m_dt = m_d[:, None] & m_t[None, :]
    o_row = (i_b.to(tl.int64) * DCH + o_d) * L
    b_dt, _ = _load_step(delta, delta_bias, o_row, o_t, m_dt, o_d, m_d,
                         HAS_BIAS, SOFTPLUS)
    b_u = tl.load(u + o_row[:, None] + o_t[None, :], mask=m_dt,
                  other=0.0).to(tl.float32)
    if SCALE_INPUT:
        b_x = b_u * b_dt
    else:
        b_x = b_u
    if HAS_D:
        b_D = tl.load(D + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_y = b_u * b_D[:, None]
    else:
        b_y = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    o_bc = (i_b.to(tl.int64) * (DCH // DG) + i_g) * N
    o_state = (i_b.to(tl.int64) * DCH + o_d) * N * NSEG + i_s
    for n in range(N):
        o_bcn = o_bc * L + n * L  # row n of B / C (n * L < 2^31)
        b_A = tl.load(A + o_d * N + n, mask=m_d, other=0.0).to(tl.float32)
        b_B = tl.load(B + o_bcn + o_t, mask=m_t,
                      other=0.0).to(tl.float32)
        b_C = tl.load(C + o_bcn + o_t, mask=m_t,
                      other=0.0).to(tl.float32)
        b_h0 = tl.load(starts + o_state + n * NSEG, mask=m_d, other=0.0)
        b_pa, b_pb = _scan(tl.exp(b_dt * b_A[:, None]), b_x * b_B[None, :],
                           1, False)
        b_y += (b_pa * b_h0[:, None] + b_pb) * b_C[None, :]
    tl.store(y + o_row[:, None] + o_t[None, :], b_y, mask=m_dt)


@triton.jit
def selective_scan_chunk_bwd_kernel(delta, A, C, delta_bias, dy, locals_,
                                    decays, DCH, L, DG, N, NSEG,
                                    HAS_BIAS: tl.constexpr,
                                    SOFTPLUS: tl.constexpr,
                                    BLOCK_D: tl.constexpr,
                                    BLOCK_T: tl.constexpr):
    """Backward pass 1: with ``g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}``,
    each segment's ``g`` at its first token from a zero carry on its right
    (``locals_``) and ``prod_t a_{t+1}`` over its tokens (``decays``), both
    ``[B, D_ch, N, n_seg]``."""
    i_s, i_dg, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_dblk = tl.cdiv(DG, BLOCK_D)
    i_g, i_db = i_dg // n_dblk, i_dg % n_dblk
    o_dg = i_db * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_dg < DG
    o_d = i_g * DG + o_dg
    o_t = i_s * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < L
    m_dt = m_d[:, None] & m_t[None, :]
    m_next = m_d[:, None] & (o_t + 1 < L)[None, :]
    o_row = (i_b.to(tl.int64) * DCH + o_d) * L
    # the next token's step: its decay carries g_{t+1} to t
    b_dtn, _ = _load_step(delta, delta_bias, o_row, o_t + 1, m_next, o_d,
                          m_d, HAS_BIAS, SOFTPLUS)
    b_dy = tl.load(dy + o_row[:, None] + o_t[None, :], mask=m_dt,
                   other=0.0).to(tl.float32)
    m_first = (tl.arange(0, BLOCK_T) == 0)[None, :]
    o_bc = (i_b.to(tl.int64) * (DCH // DG) + i_g) * N
    o_state = (i_b.to(tl.int64) * DCH + o_d) * N * NSEG + i_s
    for n in range(N):
        o_bcn = o_bc * L + n * L  # row n of B / C (n * L < 2^31)
        b_A = tl.load(A + o_d * N + n, mask=m_d, other=0.0).to(tl.float32)
        b_C = tl.load(C + o_bcn + o_t, mask=m_t,
                      other=0.0).to(tl.float32)
        b_pa, b_pg = _scan(tl.exp(b_dtn * b_A[:, None]),
                           b_dy * b_C[None, :], 1, True)
        b_local = tl.sum(tl.where(m_first, b_pg, 0.0), axis=1)
        b_decay = tl.sum(tl.where(m_first, b_pa, 0.0), axis=1)
        tl.store(locals_ + o_state + n * NSEG, b_local, mask=m_d)
        tl.store(decays + o_state + n * NSEG, b_decay, mask=m_d)


@triton.jit
def selective_scan_bwd_kernel(u, delta, A, B, C, D, delta_bias, starts,
                              carries, dy, du, ddelta, dB, dC, dA, dD, dbias,
                              DCH, L, DG, N, NSEG, HAS_D: tl.constexpr,
                              HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                              SCALE_INPUT: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Backward pass 2: one segment's states from its saved start
    (``starts``), ``g = dL/dh`` backwards from the carry entering on its
    right (``carries``), and every gradient. du, ddelta: ``[B, D_ch, L]``;
    per-program partials dB, dC: ``[B, G, n_dblk, N, L]``; dA:
    ``[B, n_seg, D_ch, N]``; dD, dbias: ``[B, n_seg, D_ch]``."""
    i_s, i_dg, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_dblk = tl.cdiv(DG, BLOCK_D)
    i_g, i_db = i_dg // n_dblk, i_dg % n_dblk
    o_dg = i_db * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_dg < DG
    o_d = i_g * DG + o_dg
    o_t = i_s * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < L
    m_dt = m_d[:, None] & m_t[None, :]
    m_next = m_d[:, None] & (o_t + 1 < L)[None, :]
    o_row = (i_b.to(tl.int64) * DCH + o_d) * L
    o_tile = o_row[:, None] + o_t[None, :]
    b_dt, b_pre = _load_step(delta, delta_bias, o_row, o_t, m_dt, o_d, m_d,
                             HAS_BIAS, SOFTPLUS)
    b_dtn, _ = _load_step(delta, delta_bias, o_row, o_t + 1, m_next, o_d,
                          m_d, HAS_BIAS, SOFTPLUS)
    b_u = tl.load(u + o_tile, mask=m_dt, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + o_tile, mask=m_dt, other=0.0).to(tl.float32)
    if SCALE_INPUT:
        b_x = b_u * b_dt
    else:
        b_x = b_u
    b_ddt = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    b_gB = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)  # sum_n g_n B_n
    o_bc = (i_b.to(tl.int64) * (DCH // DG) + i_g) * N
    o_part = ((i_b.to(tl.int64) * (DCH // DG) + i_g) * n_dblk + i_db) * N
    o_state = (i_b.to(tl.int64) * DCH + o_d) * N * NSEG + i_s
    o_dA = ((i_b.to(tl.int64) * NSEG + i_s) * DCH + o_d) * N
    for n in range(N):
        o_bcn = o_bc * L + n * L  # row n of B / C (n * L < 2^31)
        o_partn = o_part * L + n * L
        b_A = tl.load(A + o_d * N + n, mask=m_d, other=0.0).to(tl.float32)
        b_B = tl.load(B + o_bcn + o_t, mask=m_t,
                      other=0.0).to(tl.float32)
        b_C = tl.load(C + o_bcn + o_t, mask=m_t,
                      other=0.0).to(tl.float32)
        b_h0 = tl.load(starts + o_state + n * NSEG, mask=m_d, other=0.0)
        b_gc = tl.load(carries + o_state + n * NSEG, mask=m_d, other=0.0)
        b_b = b_x * b_B[None, :]
        b_pa, b_pb = _scan(tl.exp(b_dt * b_A[:, None]), b_b, 1, False)
        b_h = b_pa * b_h0[:, None] + b_pb
        b_pa, b_pg = _scan(tl.exp(b_dtn * b_A[:, None]),
                           b_dy * b_C[None, :], 1, True)
        b_g = b_pa * b_gc[:, None] + b_pg  # dL/dh_t
        # a_t h_{t-1} = h_t - b_t: dL/d(dt_t A) = g_t a_t h_{t-1}
        b_dlog = b_g * (b_h - b_b)
        b_ddt += b_dlog * b_A[:, None]
        b_gB += b_g * b_B[None, :]
        tl.store(dA + o_dA + n, tl.sum(b_dlog * b_dt, axis=1), mask=m_d)
        tl.store(dB + o_partn + o_t, tl.sum(b_g * b_x, axis=0),
                 mask=m_t)
        tl.store(dC + o_partn + o_t, tl.sum(b_h * b_dy, axis=0),
                 mask=m_t)
    if SCALE_INPUT:
        b_ddt += b_gB * b_u
        b_du = b_gB * b_dt
    else:
        b_du = b_gB
    o_part_d = (i_b.to(tl.int64) * NSEG + i_s) * DCH + o_d
    if HAS_D:
        b_D = tl.load(D + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_du += b_dy * b_D[:, None]
        tl.store(dD + o_part_d, tl.sum(b_dy * b_u, axis=1), mask=m_d)
    if SOFTPLUS:
        b_ddt = b_ddt * tl.sigmoid(b_pre)
    b_ddt = tl.where(m_dt, b_ddt, 0.0)
    if HAS_BIAS:
        tl.store(dbias + o_part_d, tl.sum(b_ddt, axis=1), mask=m_d)
    tl.store(du + o_tile, b_du, mask=m_dt)
    tl.store(ddelta + o_tile, b_ddt, mask=m_dt)


def _segments(length: int, block_t: Optional[int]) -> Tuple[int, int]:
    """Tokens per segment (``block_t``; by default :data:`BLOCK_T`, or the
    sequence rounded up to a power of 2 when it is shorter) and the number
    of segments."""
    block_t = block_t or min(BLOCK_T, triton.next_power_of_2(length))
    return block_t, triton.cdiv(length, block_t)


def _block_d(block_d: int, per_group: int) -> int:
    """Channels per tile: ``block_d``, at most the group's width rounded up
    to a power of 2."""
    return min(block_d, triton.next_power_of_2(per_group))


CARRY_MAX_ROWS = 4
CARRY_ROWS = (1, 2, 4)  # every value of _carry_rows


def _carry_rows(rows: int) -> int:
    """Rows per program of the carry kernel: one, so that even N = 1 at
    batch 1 spreads over the SMs, and more once there are many rows."""
    # At most CARRY_MAX_ROWS: 16 rows x 512 segments spill on sm_90.
    return max(1, min(CARRY_MAX_ROWS, 2 ** ((rows // 4096).bit_length() - 1)
                      if rows >= 4096 else 1))


def _carry(decays: Tensor, values: Tensor, reverse: bool,
           block_s: int = CARRY_BLOCK_S) -> Tensor:
    """:func:`selective_scan_carry_kernel` over ``[..., n_seg]`` rows
    (``block_s`` segments at a time)."""
    out = torch.empty_like(values)
    rows, n_seg = values.numel() // values.shape[-1], values.shape[-1]
    if rows:
        block_r = _carry_rows(rows)
        selective_scan_carry_kernel[(triton.cdiv(rows, block_r), )](
            decays, values, out, rows, n_seg, reverse, block_r,
            min(block_s, triton.next_power_of_2(n_seg)),
            num_warps=CARRY_WARPS)
    return out


def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                       C: Tensor, D: Optional[Tensor],
                       delta_bias: Optional[Tensor], delta_softplus: bool,
                       scale_input: bool = True,
                       block_t: Optional[int] = None
                       ) -> Tuple[Tensor, Tensor]:
    """The forward launches on contiguous tensors.

    Args:
        u, delta: ``[B, D_ch, L]``; A: ``[D_ch, N]``; B, C:
            ``[B, G, N, L]``; D, delta_bias: ``[D_ch]`` or None.
        delta_softplus (bool): Softplus on the step.
        scale_input (bool): ``b_t = dt_t B_t u_t`` (else ``B_t u_t``).
            Defaults to True.
        block_t (int, optional): Tokens per segment (a power of 2).
            Defaults to :data:`BLOCK_T`.

    Returns:
        Tuple[Tensor, Tensor]: ``y: [B, D_ch, L]`` fp32 and the state
        entering every segment, ``[B, D_ch, N, n_seg]`` fp32.
    """
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    if n_state * length >= 2**31:
        # offsets across batch items and channels are int64; within one
        # group's B / C they stay int32 (int64 ones there cost spills)
        raise ValueError(f'selective_scan (triton): N * L = '
                         f'{n_state * length} must stay below 2^31; use '
                         'backend="torch"')
    per_group = channels // groups
    block_t, n_seg = _segments(length, block_t)
    f32 = dict(device=u.device, dtype=torch.float32)
    y = torch.empty(batch, channels, length, **f32)
    ends = torch.empty(batch, channels, n_state, n_seg, **f32)
    decays = torch.empty_like(ends)
    if y.numel() == 0:
        return y, ends
    block_d = _block_d(FWD_BLOCK_D, per_group)
    grid = (n_seg, groups * triton.cdiv(per_group, block_d), batch)
    if n_seg == 1:  # the only segment starts from zero
        starts = ends.zero_()
    else:
        selective_scan_chunk_fwd_kernel[grid](
            u, delta, A, B, delta_bias, ends, decays, channels, length,
            per_group, n_state, n_seg, delta_bias is not None,
            delta_softplus, scale_input, block_d, block_t,
            num_warps=FWD_WARPS)
        starts = _carry(decays, ends, reverse=False)
    del ends, decays
    selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, delta_bias, starts, y, channels, length,
        per_group, n_state, n_seg, D is not None, delta_bias is not None,
        delta_softplus, scale_input, block_d, block_t, num_warps=FWD_WARPS)
    return y, starts


def selective_scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                       C: Tensor, D: Optional[Tensor],
                       delta_bias: Optional[Tensor], delta_softplus: bool,
                       starts: Tensor, dy: Tensor, scale_input: bool = True,
                       block_t: Optional[int] = None) -> Tuple:
    """Gradients of every input of :func:`selective_scan_fwd` (fp32; None
    for an absent D / delta_bias), from its saved segment start states
    ``starts: [B, D_ch, N, n_seg]`` and ``dy: [B, D_ch, L]``."""
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    per_group = channels // groups
    block_t, n_seg = _segments(length, block_t)
    block_d = _block_d(BWD_BLOCK_D, per_group)
    n_dblk = triton.cdiv(per_group, block_d)
    block_d1 = _block_d(CHUNK_BWD_BLOCK_D, per_group)
    f32 = dict(device=u.device, dtype=torch.float32)
    du = torch.empty(batch, channels, length, **f32)
    ddelta = torch.empty(batch, channels, length, **f32)
    dB = torch.empty(batch, groups, n_dblk, n_state, length, **f32)
    dC = torch.empty(batch, groups, n_dblk, n_state, length, **f32)
    dA = torch.zeros(batch, n_seg, channels, n_state, **f32)
    dD = torch.zeros(batch, n_seg, channels, **f32) if D is not None else du
    dbias = (torch.zeros(batch, n_seg, channels, **f32)
             if delta_bias is not None else du)
    if du.numel():
        if n_seg == 1:  # nothing enters the only segment from the right
            carries = torch.zeros_like(starts)
        else:
            locals_ = torch.empty_like(starts)
            decays = torch.empty_like(starts)
            grid = (n_seg, groups * triton.cdiv(per_group, block_d1), batch)
            selective_scan_chunk_bwd_kernel[grid](
                delta, A, C, delta_bias, dy, locals_, decays, channels,
                length, per_group, n_state, n_seg, delta_bias is not None,
                delta_softplus, block_d1, block_t,
                num_warps=CHUNK_BWD_WARPS)
            carries = _carry(decays, locals_, reverse=True)
            del locals_, decays
        grid = (n_seg, groups * n_dblk, batch)
        selective_scan_bwd_kernel[grid](
            u, delta, A, B, C, D, delta_bias, starts, carries, dy, du,
            ddelta, dB, dC, dA, dD, dbias, channels, length, per_group,
            n_state, n_seg, D is not None, delta_bias is not None,
            delta_softplus, scale_input, block_d, block_t,
            num_warps=_bwd_warps(D is not None, delta_softplus))
    else:
        dB.zero_()
        dC.zero_()
    return (du, ddelta, dA.sum((0, 1)), dB.sum(2), dC.sum(2),
            dD.sum((0, 1)) if D is not None else None,
            dbias.sum((0, 1)) if delta_bias is not None else None)


def _forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
             D: Optional[Tensor], delta_bias: Optional[Tensor],
             delta_softplus: bool, scale_input: bool,
             block_t: Optional[int]) -> Tuple[Tensor, Tuple[Tensor]]:
    with device_guard('selective_scan', u=u, delta=delta, A=A, B=B, C=C, D=D,
                      delta_bias=delta_bias):
        y, starts = selective_scan_fwd(u, delta, A, B, C, D, delta_bias,
                                       delta_softplus, scale_input, block_t)
    return y, (starts, )


def _backward(dy: Tensor, saved: List[Tensor], u: Tensor, delta: Tensor,
              A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              delta_bias: Optional[Tensor], delta_softplus: bool,
              scale_input: bool, block_t: Optional[int]) -> tuple:
    (starts, ) = saved
    with device_guard('selective_scan', u=u, dy=dy):
        grads = selective_scan_bwd(u, delta, A, B, C, D, delta_bias,
                                   delta_softplus, starts, dy.contiguous(),
                                   scale_input, block_t)
    inputs = (u, delta, A, B, C, D, delta_bias)
    return tuple(None if g is None else g.to(x.dtype)
                 for g, x in zip(grads, inputs))


def _fake(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
          D: Optional[Tensor], delta_bias: Optional[Tensor],
          delta_softplus: bool, scale_input: bool,
          block_t: Optional[int]) -> Tuple[Tensor, Tuple[Tensor]]:
    batch, channels, length = u.shape
    n_seg = _segments(length, block_t)[1]
    f32 = dict(dtype=torch.float32)
    return (u.new_empty(batch, channels, length, **f32),
            (u.new_empty(batch, channels, A.shape[1], n_seg, **f32), ))


def _definition(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                D: Optional[Tensor], delta_bias: Optional[Tensor],
                delta_softplus: bool, scale_input: bool,
                block_t: Optional[int]) -> Tensor:
    return export_selective_scan(u, delta, A, B, C, D, delta_bias,
                                 delta_softplus, scale_input).float()


# The forward keeps the state entering every segment for the backward.
selective_scan_triton = FastPathOp(
    'selective_scan_triton', _forward, _backward, _fake,
    grads_for=('u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias'),
    residuals=True, definition=_definition)


def triton_selective_scan(u: Tensor,
                          delta: Tensor,
                          A: Tensor,
                          B: Tensor,
                          C: Tensor,
                          D: Optional[Tensor] = None,
                          delta_bias: Optional[Tensor] = None,
                          delta_softplus: bool = False,
                          scale_input: bool = True,
                          block_t: Optional[int] = None) -> Tensor:
    """The selective scan on the Triton kernels; arguments as
    :func:`~mila_det.ops.selective_scan.selective_scan` (shapes are checked
    there).

    Every tensor must be on ``u``'s device (``ValueError`` naming the one
    that is not); the launches run with that device current.

    Args:
        block_t (int, optional): Tokens per segment, a power of 2 (tests use
            small ones). Defaults to :data:`BLOCK_T`.

    Returns:
        Tensor: ``[B, D_ch, L]`` fp32.
    """
    args = [None if t is None else t.contiguous()
            for t in (u, delta, A, B, C, D, delta_bias)]
    return selective_scan_triton(*args, delta_softplus, scale_input,
                                 block_t)


# ---------------------------------------------------------------------------
# Declarations for tools/analysis/kernel_report.py (mila_det/ops/_report.py).

_TYPES = dict(fp32='*fp32', bf16='*bf16', fp16='*fp16')
_INPUTS = ('u', 'delta', 'B', 'C', 'dy')  # in the input dtype; rest fp32


# The compile-time flags the package's launch sites pass to the scan
# kernels (``selective_scan_fwd`` / ``_bwd`` turn their arguments into
# HAS_BIAS, SOFTPLUS, HAS_D and SCALE_INPUT): VMamba's cross selective scan
# (step bias, softplus, skip D, input scaled by the step) and the forget
# gate (none of them; its input scaled by the step or not).
LAUNCH_FLAGS = {
    'vmamba': dict(HAS_BIAS=True, SOFTPLUS=True, HAS_D=True,
                   SCALE_INPUT=True),
    'gate': dict(HAS_BIAS=False, SOFTPLUS=False, HAS_D=False,
                 SCALE_INPUT=False),
    'gate-scaled': dict(HAS_BIAS=False, SOFTPLUS=False, HAS_D=False,
                        SCALE_INPUT=True),
}


def _kernels():
    """(kernel, constexprs, warps, label, per-dtype) for every compiled
    form the host functions launch, each once: the scan kernels once per
    distinct combination of the flags in :data:`LAUNCH_FLAGS` that they
    take (a kernel without SCALE_INPUT compiles the same code for both
    forget-gate rows), with the warps the host picks for it; the carry
    kernel (fp32 only) both ways and with every row count of
    :func:`_carry_rows`. Tiles at their largest: shorter sequences and
    narrower groups launch smaller ones."""
    out = [(selective_scan_carry_kernel,
            dict(REVERSE=rev, BLOCK_R=rows, BLOCK_S=CARRY_BLOCK_S),
            CARRY_WARPS, f'R{rows}{" rev" if rev else ""}', False)
           for rev in (False, True) for rows in CARRY_ROWS]
    launched = [
        (selective_scan_chunk_fwd_kernel, FWD_BLOCK_D, lambda f: FWD_WARPS),
        (selective_scan_fwd_kernel, FWD_BLOCK_D, lambda f: FWD_WARPS),
        (selective_scan_chunk_bwd_kernel, CHUNK_BWD_BLOCK_D,
         lambda f: CHUNK_BWD_WARPS),
        (selective_scan_bwd_kernel, BWD_BLOCK_D,
         lambda f: _bwd_warps(f['HAS_D'], f['SOFTPLUS'])),
    ]
    for fn, block_d, warps in launched:
        seen = set()
        for label, flags in LAUNCH_FLAGS.items():
            own = {k: v for k, v in flags.items() if k in fn.arg_names}
            if tuple(own.items()) in seen:
                continue
            seen.add(tuple(own.items()))
            out.append((fn, dict(own, BLOCK_D=block_d, BLOCK_T=BLOCK_T),
                        warps(flags), label, True))
    return out


def report_variants() -> List[KernelVariant]:
    """Every kernel for u / delta / B / C (and dy) in fp32 / bf16 / fp16
    (the carry kernel, all fp32, once), each flag combination once (see
    :func:`_kernels`). The state size N is a run-time loop bound: one
    compiled kernel serves every N."""
    out = []
    for fn, const, warps, label, per_dtype in _kernels():
        for dt, ptr in _TYPES.items() if per_dtype else [('fp32', '')]:
            types = {a: ptr if a in _INPUTS else '*fp32'
                     for a in fn.arg_names}
            types.update(DCH='i32', L='i32', DG='i32', N='i32',
                         NSEG='i32', ROWS='i32')
            out.append(KernelVariant(
                fn.__name__, f'{dt} {label}', fn,
                signature(fn, types, const), const, warps))
    return out


def report_launches() -> List[KernelLaunch]:
    """VMamba-T stage 1 at 1x3x800x1280: 4 routes x 96 channels over
    L = 200 x 320 tokens, 4 groups, N = 1, fp32, batch 1 and 2; a forward
    and a backward (both carry launches under the carry kernel's name)."""
    out = []
    channels, groups, n_state, length = 384, 4, 1, 200 * 320
    n_seg = triton.cdiv(length, BLOCK_T)
    for batch in (1, 2):
        model, detail = f'VMamba-T b{batch}', 'fp32 vmamba'
        seq = batch * channels * length * 4  # one [B, D_ch, L] fp32 tensor
        bc = batch * groups * n_state * length * 4  # one of B / C
        seg = batch * channels * n_state * n_seg * 4  # one segment tensor
        fwd = n_seg * groups * triton.cdiv(channels // groups,
                                           FWD_BLOCK_D) * batch
        bwd1 = n_seg * groups * triton.cdiv(channels // groups,
                                            CHUNK_BWD_BLOCK_D) * batch
        n_dblk = triton.cdiv(channels // groups, BWD_BLOCK_D)
        bwd = n_seg * groups * n_dblk * batch
        carry = batch * channels * n_state
        out += [
            KernelLaunch(model, 'selective_scan_chunk_fwd_kernel', detail,
                         fwd, 2 * seq + bc + 2 * seg),
            KernelLaunch(model, 'selective_scan_carry_kernel', 'fp32 R1',
                         carry, 3 * seg),
            KernelLaunch(model, 'selective_scan_fwd_kernel', detail, fwd,
                         3 * seq + 2 * bc + seg),
            KernelLaunch(model, 'selective_scan_chunk_bwd_kernel', detail,
                         bwd1, 2 * seq + bc + 2 * seg),
            KernelLaunch(model, 'selective_scan_bwd_kernel', detail, bwd,
                         5 * seq + 2 * bc + 2 * n_dblk * bc + 2 * seg
                         + batch * n_seg * channels * (n_state + 2) * 4),
        ]
    return out
