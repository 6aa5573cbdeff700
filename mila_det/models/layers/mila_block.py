"""Token mixer and block of MILA.

MILA: "Demystify Mamba in Vision: A Linear Attention Perspective"
(Han et al., NeurIPS 2024). Parameter names follow the official checkpoints
(``cpe1``, ``in_proj``, ``act_proj``, ``dwc``, ``attn.qk``, ``attn.lepe``,
``out_proj``, ``cpe2``, ``mlp.fc1``, ``mlp.fc2``).
"""
from typing import Optional, Tuple

import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from torch import Tensor

from mila_det.ops import linear_attention
from .common import Mlp, TokenLinear, dwconv_tokens


class LinearAttention(nn.Module):
    """MILA's linear attention with RoPE and a LePE depthwise conv.

    Args:
        dim (int): Token width C.
        num_heads (int): Number of heads; must divide C.
        qkv_bias (bool): Bias on the ``qk`` projection. Defaults to True.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f'MILA attention: width {dim} is not divisible '
                             f'by num_heads={num_heads}')
        if dim % 4 != 0:
            raise ValueError(f'MILA attention: width {dim} must be a multiple '
                             'of 4 for the 2-D RoPE')
        self.dim = dim
        self.num_heads = num_heads
        self.qk = TokenLinear(dim, dim * 2, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, hw: Tuple[int, int],
                rope: Optional[Tensor] = None) -> Tensor:
        """Args: ``x: [B, N, C]``; ``hw`` the grid; ``rope: [N, C/2, 2]``
        (built from ``hw`` when omitted). Returns ``[B, N, C]``."""
        qk = F.elu(self.qk(x), inplace=True)  # the projection is ours
        # ELU's backward reads its output, so "+ 1" is in place only when no
        # gradient flows.
        qk = qk + 1.0 if qk.requires_grad else qk.add_(1.0)
        q, k = qk.chunk(2, dim=-1)
        out = linear_attention(q, k, x, self.num_heads,
                               hw if rope is None else rope)
        return out + dwconv_tokens(self.lepe, x, hw)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}'


class MILABlock(nn.Module):
    """One MILA block on tokens ``[B, N, C]``.

    ``x + cpe1(x)``; a gated branch ``out_proj(attn(SiLU(dwc(in_proj(n))))
    * SiLU(act_proj(n)))`` with ``n = norm1(x)``; ``x + cpe2(x)``; an MLP
    branch on ``norm2(x)``. Both branches use stochastic depth.

    Args:
        dim (int): Token width C.
        num_heads (int): Number of attention heads.
        mlp_ratio (float): MLP hidden width over C. Defaults to 4.
        qkv_bias (bool): Bias on ``attn.qk``. Defaults to True.
        drop_path (float): Stochastic depth rate. Defaults to 0.
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 mlp_ratio: float = 4.0,
                 qkv_bias: bool = True,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.in_proj = TokenLinear(dim, dim)
        self.act_proj = TokenLinear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.attn = LinearAttention(dim, num_heads, qkv_bias)
        self.out_proj = TokenLinear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, hw: Tuple[int, int],
                rope: Optional[Tensor] = None) -> Tensor:
        """Args: ``x: [B, N, C]``, ``hw = (H, W)`` with ``H * W == N``,
        ``rope: [N, C/2, 2]``. Returns ``[B, N, C]``."""
        x = dwconv_tokens(self.cpe1, x, hw, residual=True)
        n = self.norm1(x)
        gate = self.act_proj(n, act='silu')
        a = dwconv_tokens(self.dwc, self.in_proj(n), hw, act='silu')
        a = self.attn(a, hw, rope)
        x = self.out_proj(a * gate, residual=x, drop_path=self.drop_path)
        x = dwconv_tokens(self.cpe2, x, hw, residual=True)
        return self.mlp(self.norm2(x), residual=x, drop_path=self.drop_path)
