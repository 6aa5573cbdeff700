"""SS2D token mixer and VSS block of VMamba, on token maps ``[B, H, W, C]``.

VMamba: "VMamba: Visual State Space Model" (Liu et al., NeurIPS 2024),
``forward_type="v05_noz"``: no gate branch, depthwise conv before the
2-D cross scan, grouped ``x_proj``/``dt_proj`` as raw parameters. Parameter
names follow the official checkpoints. The blocks work on the
channels-last memory of the backbone's NCHW maps, viewed as ``[B, H, W,
C]``, so projections, norms and the scan read it without copies.
"""
import math
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from torch import Tensor

from mila_det.ops import cross_selective_scan
from .common import Mlp, TokenLinear, init_mamba_decay, init_mamba_step
from .fused import conv2d_act


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
        self.out_norm = nn.LayerNorm(inner)
        self.in_proj = TokenLinear(dim, inner, bias=False)
        self.conv2d = nn.Conv2d(inner, inner, d_conv, padding=(d_conv - 1) // 2,
                                groups=inner, bias=False)
        self.out_proj = TokenLinear(inner, dim, bias=False)
        self.reset_extra_parameters()

    @torch.no_grad()
    def reset_extra_parameters(self) -> None:
        """The authors' initialisation of the SSM parameters, which the
        backbone's generic init does not cover: ``x_proj`` uniform in
        ``+-Di^-0.5``, Mamba's step projection and decay rates
        (:func:`~.common.init_mamba_step`, :func:`~.common.init_mamba_decay`:
        ``A = -[1..N]``), ``D = 1``."""
        bound = self.d_inner**-0.5
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        init_mamba_step(self.dt_projs_weight, self.dt_projs_bias,
                        self.dt_rank)
        init_mamba_decay(self.A_logs)
        self.Ds.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, H, W, C]`` -> ``[B, H, W, C]``."""
        u = self.scan_input(x)
        y = cross_selective_scan(u, self.x_proj_weight, self.dt_projs_weight,
                                 self.dt_projs_bias, self.A_logs, self.Ds)
        # The norm runs in the scan's dtype (fp32 for a bf16 model).
        norm = self.out_norm
        y = F.layer_norm(y, norm.normalized_shape, norm.weight.to(y.dtype),
                         norm.bias.to(y.dtype), norm.eps)
        return self.out_proj(y.to(x.dtype))

    def scan_input(self, x: Tensor) -> Tensor:
        """``SiLU(conv2d(in_proj(x)))``: ``[B, H, W, C]`` -> ``[B, Di, H,
        W]`` (channels-last memory), the map the four routes scan."""
        conv = self.conv2d
        return conv2d_act(self.in_proj(x).permute(0, 3, 1, 2), conv.weight,
                          conv.bias, 'silu', conv.stride, conv.padding,
                          conv.groups)


class VSSBlock(nn.Module):
    """Pre-norm VSS block: ``x + SS2D(norm(x))``, then ``x + MLP(norm2(x))``,
    both with stochastic depth. ``[B, H, W, C]`` in and out."""

    def __init__(self, dim: int, d_state: int = 1, ssm_ratio: float = 2.0,
                 dt_rank: Union[int, str] = 'auto', mlp_ratio: float = 4.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, d_state, ssm_ratio, dt_rank)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return self.mlp(self.norm2(x), residual=x, drop_path=self.drop_path)
