"""Triton kernels of the selective scan with grouped B and C.

Grid: one program per (channel block, group, batch item); every channel of a
program shares its group's B and C. The forward walks the sequence once,
keeping the ``[BLOCK_D, N]`` state in fp32 registers, and writes y (and,
when gradients are needed, the states, so the backward need not recompute
them). The backward walks the sequence in reverse, carrying
``g_t = dL/dh_t``; per-program partial sums of dB, dC, dA, dD and the bias
gradient are reduced on the host, so no atomics are needed and results are
deterministic.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))


@triton.jit
def selective_scan_fwd_kernel(u, delta, A, B, C, D, delta_bias, y, states,
                              DCH, L, DG, N, HAS_D: tl.constexpr,
                              HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                              SAVE_STATES: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    i_d, i_g, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G = DCH // DG
    o_dg = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_dg < DG
    o_d = i_g * DG + o_dg
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    b_A = tl.load(A + o_d[:, None] * N + o_n[None, :], mask=m_dn,
                  other=0.0).to(tl.float32)
    if HAS_D:
        b_D = tl.load(D + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    o_seq = (i_b.to(tl.int64) * DCH + o_d) * L  # [BLOCK_D]
    o_bc = ((i_b.to(tl.int64) * G + i_g) * N + o_n) * L  # [BLOCK_N]
    o_state = o_seq[:, None] * N + o_n[None, :] * L  # [BLOCK_D, BLOCK_N]
    b_h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for t in range(L):
        b_u = tl.load(u + o_seq + t, mask=m_d, other=0.0).to(tl.float32)
        b_dt = tl.load(delta + o_seq + t, mask=m_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_dt += b_bias
        if SOFTPLUS:
            b_dt = _softplus(b_dt)
        b_B = tl.load(B + o_bc + t, mask=m_n, other=0.0).to(tl.float32)
        b_C = tl.load(C + o_bc + t, mask=m_n, other=0.0).to(tl.float32)
        b_h = tl.exp(b_dt[:, None] * b_A) * b_h + \
            (b_dt * b_u)[:, None] * b_B[None, :]
        if SAVE_STATES:
            tl.store(states + o_state + t, b_h, mask=m_dn)
        b_y = tl.sum(b_h * b_C[None, :], axis=1)
        if HAS_D:
            b_y += b_D * b_u
        tl.store(y + o_seq + t, b_y, mask=m_d)


@triton.jit
def selective_scan_bwd_kernel(u, delta, A, B, C, D, delta_bias, states, dy,
                              du, ddelta, dB, dC, dA, dD, dbias, DCH, L, DG,
                              N, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                              SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_N: tl.constexpr):
    i_d, i_g, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G = DCH // DG
    NBLK = tl.num_programs(0)
    o_dg = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_dg < DG
    o_d = i_g * DG + o_dg
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    b_A = tl.load(A + o_d[:, None] * N + o_n[None, :], mask=m_dn,
                  other=0.0).to(tl.float32)
    if HAS_D:
        b_D = tl.load(D + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    o_seq = (i_b.to(tl.int64) * DCH + o_d) * L
    o_bc = ((i_b.to(tl.int64) * G + i_g) * N + o_n) * L
    o_state = o_seq[:, None] * N + o_n[None, :] * L
    # partial dB / dC of this program: [B, G, NBLK, N, L]
    o_part = (((i_b.to(tl.int64) * G + i_g) * NBLK + i_d) * N + o_n) * L
    b_g = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # a_{t+1} g_{t+1}
    b_dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    b_dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(L):
        t = L - 1 - i
        b_u = tl.load(u + o_seq + t, mask=m_d, other=0.0).to(tl.float32)
        b_pre = tl.load(delta + o_seq + t, mask=m_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_pre += b_bias
        if SOFTPLUS:
            b_dt = _softplus(b_pre)
        else:
            b_dt = b_pre
        b_B = tl.load(B + o_bc + t, mask=m_n, other=0.0).to(tl.float32)
        b_C = tl.load(C + o_bc + t, mask=m_n, other=0.0).to(tl.float32)
        b_dy = tl.load(dy + o_seq + t, mask=m_d, other=0.0).to(tl.float32)
        b_h = tl.load(states + o_state + t, mask=m_dn, other=0.0)
        m_prev = m_dn & ((tl.zeros([BLOCK_D, BLOCK_N], tl.int32) + t) > 0)
        b_hp = tl.load(states + o_state + t - 1, mask=m_prev, other=0.0)
        b_a = tl.exp(b_dt[:, None] * b_A)
        b_g += b_C[None, :] * b_dy[:, None]  # dL/dh_t
        b_dlog = b_g * b_hp * b_a  # dL/d(delta_t A)
        b_gB = tl.sum(b_g * b_B[None, :], axis=1)
        b_ddt = tl.sum(b_dlog * b_A, axis=1) + b_gB * b_u
        b_du = b_gB * b_dt
        if HAS_D:
            b_du += b_D * b_dy
            b_dD += b_dy * b_u
        b_dA += b_dlog * b_dt[:, None]
        if SOFTPLUS:
            b_ddt = b_ddt * tl.sigmoid(b_pre)
        b_dbias += b_ddt
        tl.store(du + o_seq + t, b_du, mask=m_d)
        tl.store(ddelta + o_seq + t, b_ddt, mask=m_d)
        b_dB = tl.sum(tl.where(m_dn, b_g * (b_dt * b_u)[:, None], 0.0),
                      axis=0)
        b_dC = tl.sum(tl.where(m_dn, b_h * b_dy[:, None], 0.0), axis=0)
        tl.store(dB + o_part + t, b_dB, mask=m_n)
        tl.store(dC + o_part + t, b_dC, mask=m_n)
        b_g = b_g * b_a  # carried to t - 1 as a_t g_t
    o_bd = i_b.to(tl.int64) * DCH + o_d
    tl.store(dA + o_bd[:, None] * N + o_n[None, :], b_dA, mask=m_dn)
    if HAS_D:
        tl.store(dD + o_bd, b_dD, mask=m_d)
    if HAS_BIAS:
        tl.store(dbias + o_bd, b_dbias, mask=m_d)


def _blocks(per_group: int, n_state: int):
    block_d = min(64, triton.next_power_of_2(per_group))
    block_n = max(1, triton.next_power_of_2(n_state))
    return block_d, block_n, triton.cdiv(per_group, block_d)


def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                       C: Tensor, D: Optional[Tensor],
                       delta_bias: Optional[Tensor], delta_softplus: bool,
                       save_states: bool):
    """Returns ``y: [B, D_ch, L]`` fp32 and the states ``[B, D_ch, N, L]``
    fp32 (None unless ``save_states``)."""
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    per_group = channels // groups
    block_d, block_n, n_blk = _blocks(per_group, n_state)
    y = torch.empty(batch, channels, length, device=u.device,
                    dtype=torch.float32)
    states = (torch.empty(batch, channels, n_state, length, device=u.device,
                          dtype=torch.float32) if save_states else y)
    selective_scan_fwd_kernel[(n_blk, groups, batch)](
        u, delta, A, B, C, D if D is not None else y,
        delta_bias if delta_bias is not None else y, y, states, channels,
        length, per_group, n_state, D is not None, delta_bias is not None,
        delta_softplus, save_states, block_d, block_n)
    return y, (states if save_states else None)


def selective_scan_bwd(u, delta, A, B, C, D, delta_bias, delta_softplus,
                       states, dy):
    """Gradients of every input of :func:`selective_scan_fwd`."""
    batch, channels, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    per_group = channels // groups
    block_d, block_n, n_blk = _blocks(per_group, n_state)
    f32 = dict(device=u.device, dtype=torch.float32)
    du = torch.empty(batch, channels, length, **f32)
    ddelta = torch.empty(batch, channels, length, **f32)
    dB = torch.empty(batch, groups, n_blk, n_state, length, **f32)
    dC = torch.empty(batch, groups, n_blk, n_state, length, **f32)
    dA = torch.empty(batch, channels, n_state, **f32)
    dD = torch.empty(batch, channels, **f32)
    dbias = torch.empty(batch, channels, **f32)
    selective_scan_bwd_kernel[(n_blk, groups, batch)](
        u, delta, A, B, C, D if D is not None else du,
        delta_bias if delta_bias is not None else du, states,
        dy.contiguous(), du, ddelta, dB, dC, dA, dD, dbias, channels, length,
        per_group, n_state, D is not None, delta_bias is not None,
        delta_softplus, block_d, block_n)
    return (du, ddelta, dA.sum(0), dB.sum(2), dC.sum(2),
            dD.sum(0) if D is not None else None,
            dbias.sum(0) if delta_bias is not None else None)


class SelectiveScanFunction(torch.autograd.Function):
    """Selective scan on Triton kernels (forward and backward)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus):
        u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
        A = A.contiguous()
        save = ctx.needs_input_grad[0] or any(ctx.needs_input_grad[1:7])
        y, states = selective_scan_fwd(u, delta, A, B, C, D, delta_bias,
                                       delta_softplus, save)
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, states)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
        grads = selective_scan_bwd(u, delta, A, B, C, D, delta_bias,
                                   ctx.delta_softplus, states, dy)
        inputs = (u, delta, A, B, C, D, delta_bias)
        grads = tuple(None if g is None else g.to(x.dtype)
                      for g, x in zip(grads, inputs))
        return (*grads, None)
