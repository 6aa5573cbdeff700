"""Triton kernels of VMamba's cross scan (and its adjoint, cross merge).

One program moves one ``BLOCK_H x BLOCK_W`` tile of one channel of one image
between the map ``[B, C, H, W]`` and the four sequences ``[B, 4, C, L]``.
"""
from typing import List, Tuple

import triton
import triton.language as tl
from torch import Tensor

from .._guard import device_guard
from .._op import FastPathOp
from .._report import KernelLaunch, KernelVariant, signature
from .naive import naive_cross_merge, naive_cross_scan


# C is never specialised to a constant (Triton does so for 1), since the
# route offset needs it as a run-time int64.
@triton.jit(do_not_specialize=['C'])
def cross_scan_fwd_kernel(x, y, C, H, W, BLOCK_H: tl.constexpr,
                          BLOCK_W: tl.constexpr):
    """Map -> four routes (rows, columns, rows reversed, columns reversed)."""
    i_hw, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_w = tl.cdiv(W, BLOCK_W)
    i_h, i_w = i_hw // n_w, i_hw % n_w
    L = H * W
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    o_w = i_w * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    m_hw = (o_h < H) & (o_w < W)
    o_row = o_h * W + o_w
    o_col = o_w * H + o_h
    o_route = C.to(tl.int64) * L  # one route's size: may pass 2^31 / 3
    p_x = x + (i_b.to(tl.int64) * C + i_c) * L
    p_y = y + (i_b.to(tl.int64) * 4 * C + i_c) * L
    b_x = tl.load(p_x + o_row, mask=m_hw)
    tl.store(p_y + o_row, b_x, mask=m_hw)
    tl.store(p_y + o_route + o_col, b_x, mask=m_hw)
    tl.store(p_y + 2 * o_route + (L - 1 - o_row), b_x, mask=m_hw)
    tl.store(p_y + 3 * o_route + (L - 1 - o_col), b_x, mask=m_hw)


# C is never specialised to a constant (Triton does so for 1), since the
# route offset needs it as a run-time int64.
@triton.jit(do_not_specialize=['C'])
def cross_scan_bwd_kernel(y, x, C, H, W, BLOCK_H: tl.constexpr,
                          BLOCK_W: tl.constexpr):
    """Four routes -> map, summed (the adjoint of the forward; also the
    forward of cross merge). Sums in fp32."""
    i_hw, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_w = tl.cdiv(W, BLOCK_W)
    i_h, i_w = i_hw // n_w, i_hw % n_w
    L = H * W
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]
    o_w = i_w * BLOCK_W + tl.arange(0, BLOCK_W)[None, :]
    m_hw = (o_h < H) & (o_w < W)
    o_row = o_h * W + o_w
    o_col = o_w * H + o_h
    o_route = C.to(tl.int64) * L
    p_x = x + (i_b.to(tl.int64) * C + i_c) * L
    p_y = y + (i_b.to(tl.int64) * 4 * C + i_c) * L
    b_sum = tl.load(p_y + o_row, mask=m_hw).to(tl.float32)
    b_sum += tl.load(p_y + o_route + o_col, mask=m_hw).to(tl.float32)
    b_sum += tl.load(p_y + 2 * o_route + (L - 1 - o_row), mask=m_hw).to(
        tl.float32)
    b_sum += tl.load(p_y + 3 * o_route + (L - 1 - o_col), mask=m_hw).to(
        tl.float32)
    tl.store(p_x + o_row, b_sum.to(x.dtype.element_ty), mask=m_hw)


def _grid(b: int, c: int, h: int, w: int, block: int):
    return (triton.cdiv(h, block) * triton.cdiv(w, block), c, b)


def cross_scan_fwd(x: Tensor, block: int = 32) -> Tensor:
    """``x: [B, C, H, W]`` -> ``[B, 4, C, H*W]``."""
    x = x.contiguous()
    b, c, h, w = x.shape
    y = x.new_empty(b, 4, c, h * w)
    with device_guard('cross_scan', x=x):
        cross_scan_fwd_kernel[_grid(b, c, h, w, block)](x, y, c, h, w, block,
                                                        block)
    return y


def cross_scan_bwd(y: Tensor, h: int, w: int, block: int = 32) -> Tensor:
    """``y: [B, 4, C, H*W]`` -> ``[B, C, H, W]``, the four routes summed."""
    y = y.contiguous()
    b, _, c, _ = y.shape
    x = y.new_empty(b, c, h, w)
    with device_guard('cross_merge', y=y):
        cross_scan_bwd_kernel[_grid(b, c, h, w, block)](y, x, c, h, w, block,
                                                        block)
    return x


def _scan_forward(x: Tensor) -> Tuple[Tensor, tuple]:
    return cross_scan_fwd(x), ()


def _scan_backward(dy: Tensor, saved: List[Tensor], x: Tensor) -> tuple:
    return (cross_scan_bwd(dy, x.shape[2], x.shape[3]), )


def _scan_fake(x: Tensor) -> Tuple[Tensor, tuple]:
    b, c, h, w = x.shape
    return x.new_empty(b, 4, c, h * w), ()


def _merge_forward(y: Tensor, height: int,
                   width: int) -> Tuple[Tensor, tuple]:
    x = cross_scan_bwd(y, height, width)
    return x.view(x.shape[0], x.shape[1], height * width), ()


def _merge_backward(dx: Tensor, saved: List[Tensor], y: Tensor,
                    height: int, width: int) -> tuple:
    b, c = dx.shape[:2]
    return (cross_scan_fwd(dx.reshape(b, c, height, width)), )


def _merge_fake(y: Tensor, height: int, width: int) -> Tuple[Tensor, tuple]:
    return y.new_empty(y.shape[0], y.shape[2], height * width), ()


# Each is the other's adjoint, so each one's backward is the other kernel.
cross_scan_triton = FastPathOp('cross_scan_triton', _scan_forward,
                               _scan_backward, _scan_fake, grads_for=('x', ),
                               definition=naive_cross_scan)
cross_merge_triton = FastPathOp('cross_merge_triton', _merge_forward,
                                _merge_backward, _merge_fake,
                                grads_for=('y', ),
                                definition=naive_cross_merge)


def report_variants() -> List[KernelVariant]:
    """Both kernels in fp32 / bf16 / fp16, 32x32 tiles (what the host
    functions launch)."""
    out = []
    for dt in ('fp32', 'bf16', 'fp16'):
        for fn in (cross_scan_fwd_kernel, cross_scan_bwd_kernel):
            const = dict(BLOCK_H=32, BLOCK_W=32)
            types = {a: f'*{dt}' for a in fn.arg_names[:2]}
            out.append(KernelVariant(fn.__name__, dt, fn,
                                     signature(fn, types, const), const))
    return out


def report_launches() -> List[KernelLaunch]:
    """VMamba-T stage 1 at 1x3x800x1280 (96 channels of 200x320), batch 1
    and 2, fp32: the scan reads the map once and writes four routes; the
    merge (and the scan's backward) the reverse."""
    out = []
    h, w, channels = 200, 320, 96
    for batch in (1, 2):
        programs = triton.cdiv(h, 32) * triton.cdiv(w, 32) * channels * batch
        one_map = batch * channels * h * w * 4
        for name in ('cross_scan_fwd_kernel', 'cross_scan_bwd_kernel'):
            out.append(KernelLaunch(f'VMamba-T b{batch}', name, 'fp32',
                                    programs, 5 * one_map))
    return out
