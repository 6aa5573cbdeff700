"""Token mixer and block of MILA.

MILA: "Demystify Mamba in Vision: A Linear Attention Perspective"
(Han et al., NeurIPS 2024). Parameter names follow the official checkpoints
(``cpe1``, ``in_proj``, ``act_proj``, ``dwc``, ``attn.qk``, ``attn.lepe``,
``out_proj``, ``cpe2``, ``mlp.fc1``, ``mlp.fc2``).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from torch import Tensor

from mila_det.ops import linear_attention
from .fused import ACTIVATIONS, conv2d_act, conv2d_add


def dwconv_tokens(conv: nn.Conv2d, x: Tensor, hw: Tuple[int, int],
                  residual: bool = False, act: Optional[str] = None) -> Tensor:
    """Apply a depthwise conv to tokens ``x: [B, N, C]`` on their ``H x W`` map
    (plus ``x`` itself if ``residual``), then ``act`` (see
    :func:`~.fused.conv2d_act`) if given.

    The tokens are handed to the conv as a channels-last view and its
    (channels-last) output is read back as tokens, so no copy is made. The
    residual joins the kernel's centre tap (``x + conv(x)`` is the conv with
    weight ``w + identity``), which saves a pass over the tokens.
    """
    b, n, c = x.shape
    x = x.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2)
    weight = conv.weight
    if residual:
        kh, kw = weight.shape[-2:]
        if conv.groups != c or conv.stride != (1, 1) or conv.padding != (
                kh // 2, kw // 2) or weight.shape[1] != 1 or not kh % 2:
            raise ValueError('dwconv_tokens: the residual form needs a '
                             'same-size depthwise conv with an odd kernel')
        weight = weight.clone()
        weight[:, 0, kh // 2, kw // 2] += 1.0
    if conv.dilation != (1, 1):
        raise ValueError('dwconv_tokens: dilated convs are not supported')
    y = conv2d_act(x, weight, conv.bias, act, conv.stride, conv.padding,
                   conv.groups)
    return y.permute(0, 2, 3, 1).reshape(b, n, c)


class TokenLinear(nn.Linear):
    """``nn.Linear`` on tokens ``[..., C]`` (same parameters, same result)
    that runs as a 1x1 convolution on CPU.

    PyTorch's CPU linear calls MKL's sgemm, which runs the narrow token
    projections of these backbones (C = 64 ... 512) at 50-90% of the speed
    of oneDNN's 1x1 convolution on the same numbers (measured on an AMD EPYC,
    2 threads); the tokens are handed to the conv as a channels-last view,
    so nothing is copied. Traced (as the FLOP counter does), it is the
    linear it stands for. ``forward(x, act)`` applies an activation too
    (fused into the conv where :func:`~.fused.conv2d_act` can).
    """

    def forward(self, x: Tensor, act: Optional[str] = None,
                residual: Optional[Tensor] = None) -> Tensor:
        """``act(linear(x))``, or ``residual + linear(x)`` (``act`` unset);
        ``residual`` (``[..., out_features]``) may be overwritten."""
        if act is not None and residual is not None:
            raise ValueError('TokenLinear: give act or residual, not both')
        if (x.device.type != 'cpu' or x.dtype == torch.float64
                or x.numel() == 0 or torch.jit.is_tracing()):
            y = super().forward(x)
            if residual is not None:
                return residual + y
            return y if act is None else ACTIVATIONS[act][0](y)
        lead = x.shape[:-1]

        def as_map(t: Tensor) -> Tensor:  # [..., C] -> [1, C, T, 1] NHWC
            return t.reshape(1, -1, 1, t.shape[-1]).permute(0, 3, 1, 2)

        weight = self.weight[:, :, None, None]
        if residual is None:
            y = conv2d_act(as_map(x), weight, self.bias, act)
        else:
            y = conv2d_add(as_map(residual), as_map(x), weight, self.bias)
        return y.permute(0, 2, 3, 1).reshape(*lead, self.out_features)


class Mlp(nn.Module):
    """Two-layer MLP with exact GELU (``fc1``: C -> hidden, ``fc2``: hidden
    -> C)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = TokenLinear(dim, hidden_dim)
        self.fc2 = TokenLinear(hidden_dim, dim)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """``x: [..., C]`` -> ``[..., C]``, plus ``residual`` if given (which
        may be overwritten)."""
        return self.fc2(self.fc1(x, act='gelu'), residual=residual)


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
        shortcut = x
        x = self.norm1(x)
        gate = self.act_proj(x, act='silu')
        x = dwconv_tokens(self.dwc, self.in_proj(x), hw, act='silu')
        x = self.attn(x, hw, rope)
        if self.training:  # stochastic depth on the branches
            x = shortcut + self.drop_path(self.out_proj(x * gate))
            x = dwconv_tokens(self.cpe2, x, hw, residual=True)
            return x + self.drop_path(self.mlp(self.norm2(x)))
        # Both shortcuts are fresh conv outputs: the sums may reuse them.
        x = self.out_proj(x * gate, residual=shortcut)
        x = dwconv_tokens(self.cpe2, x, hw, residual=True)
        return self.mlp(self.norm2(x), residual=x)
