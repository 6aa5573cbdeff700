"""SS2D token mixer and VSS block of VMamba, channel-first (NCHW).

VMamba: "VMamba: Visual State Space Model" (Liu et al., NeurIPS 2024),
``forward_type="v05_noz"``: no gate branch, depthwise conv before the
2-D cross scan, grouped ``x_proj``/``dt_proj`` as raw parameters. Parameter
names follow the official checkpoints.
"""
import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from torch import Tensor

from mila_det.ops import (cross_merge, cross_scan, resolve_backend,
                          selective_scan)
from mila_det.ops.selective_scan import selective_scan_tokens
from .fused import conv2d_act, conv2d_add


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of every pixel of ``[B, C, H, W]``."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


class Linear2d(nn.Linear):
    """A 1x1 convolution whose weight is stored as a Linear's ``[out, in]``.

    Checkpoints that store it as ``[out, in, 1, 1]`` load too.
    ``forward(x, act)`` applies an activation and ``forward(x,
    residual=r)`` adds ``r`` (which may be overwritten), fused into the conv
    where :mod:`.fused` can.
    """

    def forward(self, x: Tensor, act: Optional[str] = None,
                residual: Optional[Tensor] = None) -> Tensor:
        weight = self.weight[:, :, None, None]
        if residual is None:
            return conv2d_act(x, weight, self.bias, act)
        if act is not None:
            raise ValueError('Linear2d: give act or residual, not both')
        return conv2d_add(residual, x, weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + 'weight'
        if key in state_dict and state_dict[key].dim() == 4:
            state_dict[key] = state_dict[key].flatten(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SS2D(nn.Module):
    """2-D selective scan over four routes (VMamba v05_noz).

    Args:
        dim (int): Channels C.
        d_state (int): State size N >= 1. Defaults to 1.
        ssm_ratio (float): Inner width ``Di = int(ssm_ratio * C)``.
            Defaults to 2.
        dt_rank (int | str): Rank R of the step projection; ``'auto'`` is
            ``ceil(C / 16)``. Defaults to ``'auto'``.
        d_conv (int): Depthwise conv kernel. Defaults to 3.
    """

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 2.0,
                 dt_rank: Union[int, str] = 'auto', d_conv: int = 3) -> None:
        super().__init__()
        if d_state < 1:
            raise ValueError(f'SS2D: d_state must be >= 1, got {d_state}')
        inner = int(ssm_ratio * dim)
        rank = math.ceil(dim / 16) if dt_rank == 'auto' else int(dt_rank)
        self.d_inner, self.d_state, self.dt_rank = inner, d_state, rank
        k = 4
        self.x_proj_weight = nn.Parameter(
            torch.empty(k, rank + 2 * d_state, inner))
        self.A_logs = nn.Parameter(torch.empty(k * inner, d_state))
        self.Ds = nn.Parameter(torch.empty(k * inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, inner, rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, inner))
        self.A_logs._no_weight_decay = True
        self.Ds._no_weight_decay = True
        self.out_norm = LayerNorm2d(inner)
        self.in_proj = Linear2d(dim, inner, bias=False)
        self.conv2d = nn.Conv2d(inner, inner, d_conv, padding=(d_conv - 1) // 2,
                                groups=inner, bias=False)
        self.out_proj = Linear2d(inner, dim, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3,
                             dt_max: float = 0.1) -> None:
        """The authors' initialisation of the SSM parameters: softplus of the
        step bias log-uniform in ``[dt_min, dt_max]``, ``A = -[1..N]``,
        ``D = 1``."""
        inner, rank = self.d_inner, self.dt_rank
        bound = inner**-0.5
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        nn.init.uniform_(self.dt_projs_weight, -rank**-0.5, rank**-0.5)
        dt = torch.exp(torch.rand(4, inner) *
                       (math.log(dt_max) - math.log(dt_min)) +
                       math.log(dt_min)).clamp(min=1e-4)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_logs.copy_(a.log().repeat(4 * inner, 1))
        self.Ds.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, C, H, W]`` -> ``[B, C, H, W]``.

        On the PyTorch backend the scan runs token-major
        (:meth:`_scan_tokens`); on Triton and the naive references it runs
        on the channel-first sequences of the authors' layout
        (:meth:`_scan_channel_first`). Both compute the same function.
        """
        u = self.scan_input(x)
        if resolve_backend('selective_scan', u) == 'torch':
            y = self._scan_tokens(u)
        else:
            y = self._scan_channel_first(u)
        norm = self.out_norm  # in the scan's dtype (fp32 for bf16 x)
        y = F.layer_norm(y, (self.d_inner, ), norm.weight.to(y.dtype),
                         norm.bias.to(y.dtype), norm.eps)
        return self.out_proj(y.to(x.dtype).permute(0, 3, 1, 2))

    def scan_input(self, x: Tensor) -> Tensor:
        """``SiLU(conv2d(in_proj(x)))``: ``[B, C, H, W]`` -> ``[B, Di, H,
        W]``, the sequence the four routes scan."""
        conv = self.conv2d
        return conv2d_act(self.in_proj(x), conv.weight, conv.bias, 'silu',
                          conv.stride, conv.padding, conv.groups)

    def _ssm_args(self):
        """A, D and the step bias in the scan's dtype: fp32, or fp64 for a
        float64 model."""
        ct = torch.promote_types(self.A_logs.dtype, torch.float32)
        A = -torch.exp(self.A_logs.to(ct))
        return A, self.Ds.to(ct), self.dt_projs_bias.to(ct).reshape(-1)

    def _scan_channel_first(self, u: Tensor) -> Tensor:
        """Cross scan, scan and merge on ``[B, 4, Di, L]`` sequences.
        ``u: [B, Di, H, W]`` -> ``[B, H, W, Di]`` fp32."""
        b, _, h, w = u.shape
        length = h * w
        n, rank, inner = self.d_state, self.dt_rank, self.d_inner
        xs = cross_scan(u)  # [B, 4, Di, L]
        x_dbl = torch.einsum('bkdl,kcd->bkcl', xs, self.x_proj_weight)
        dt_low, Bs, Cs = torch.split(x_dbl, [rank, n, n], dim=2)
        dts = torch.einsum('bkrl,kdr->bkdl', dt_low, self.dt_projs_weight)
        A, D, bias = self._ssm_args()
        y = selective_scan(
            xs.reshape(b, 4 * inner, length), dts.reshape(b, 4 * inner, length),
            A, Bs.contiguous(), Cs.contiguous(), D, bias, delta_softplus=True)
        y = cross_merge(y.reshape(b, 4, inner, length), h, w)
        return y.reshape(b, inner, h, w).permute(0, 2, 3, 1)

    def _scan_tokens(self, u: Tensor) -> Tensor:
        """The same computation with tokens before channels, for CPUs.

        The four routes read two sequences, the pixels by rows and by
        columns, each forwards (routes 0, 1) and backwards (routes 2, 3).
        The sequences are held once, ``[B, 2, L, Di]`` with every token a
        contiguous row, and the backward routes are scanned from the end
        rather than flipped, so their outputs need no flip either. Both
        routes of a sequence share one projection matmul.
        ``u: [B, Di, H, W]`` -> ``[B, H, W, Di]`` fp32.
        """
        b, inner, h, w = u.shape
        length, n, rank = h * w, self.d_state, self.dt_rank
        grid = u.permute(0, 2, 3, 1)  # a view when u is channels-last
        seqs = torch.stack([grid.reshape(b, length, inner),
                            grid.transpose(1, 2).reshape(b, length, inner)],
                           dim=1)  # [B, 2, L, Di]: rows, columns

        def per_seq(weight: Tensor) -> Tensor:  # [2, ...] -> [B * 2, ...]
            return weight.expand(b, *weight.shape).flatten(0, 1)

        # Route k reads sequence k % 2; one matmul for both of its routes.
        proj = self.x_proj_weight.view(2, 2, -1, inner).transpose(0, 1)
        x_dbl = torch.bmm(seqs.view(b * 2, length, inner),
                          per_seq(proj.flatten(1, 2).transpose(1, 2)))
        A, D, bias = self._ssm_args()
        A, bias = A.view(2, 2 * inner, n), bias.view(2, 2, 1, inner)
        dt_proj = self.dt_projs_weight.view(2, 2, inner, rank)
        y = None
        for way in (0, 1):  # 0: routes 0, 1 forwards; 1: routes 2, 3
            part = x_dbl[..., way * (rank + 2 * n):(way + 1) * (rank + 2 * n)]
            dt_low, Bs, Cs = torch.split(part, [rank, n, n], dim=-1)
            # The step bias is added by the matmul (one pass fewer).
            dts = torch.baddbmm(per_seq(bias[way].to(dt_low)), dt_low,
                                per_seq(dt_proj[way].transpose(1, 2)))
            y_way = selective_scan_tokens(
                seqs, dts.view(b, 2, length, inner), A[way],
                Bs.reshape(b, 2, length, n), Cs.reshape(b, 2, length, n),
                delta_softplus=True, reverse=bool(way))
            y = y_way if y is None else y + y_way
        y = y[:, 0].view(b, h, w, inner) + y[:, 1].view(
            b, w, h, inner).transpose(1, 2)
        # Every route reads the same pixels, so the skip terms D_k * u sum
        # to (sum_k D_k) * u: one pass over the merged map, not four.
        return y.addcmul_(grid, D.view(4, inner).sum(0))


class Mlp2d(nn.Module):
    """Two 1x1 convs with exact GELU between, on ``[B, C, H, W]`` maps."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = Linear2d(dim, hidden_dim)
        self.fc2 = Linear2d(hidden_dim, dim)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """``x: [B, C, H, W]`` -> the same shape, plus ``residual`` if given
        (which may be overwritten)."""
        return self.fc2(self.fc1(x, act='gelu'), residual=residual)


class VSSBlock(nn.Module):
    """Pre-norm VSS block: ``x + SS2D(norm(x))``, then ``x + MLP(norm2(x))``,
    both with stochastic depth. ``[B, C, H, W]`` in and out."""

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 2.0,
                 dt_rank: Union[int, str] = 'auto', mlp_ratio: float = 4.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.op = SS2D(dim, d_state, ssm_ratio, dt_rank)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm2d(dim)
        self.mlp = Mlp2d(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.training:  # stochastic depth on the branch
            return x + self.drop_path(self.mlp(self.norm2(x)))
        # x is the fresh sum above: the MLP's residual add may reuse it.
        return self.mlp(self.norm2(x), residual=x)
