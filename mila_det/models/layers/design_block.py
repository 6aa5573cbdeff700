"""The linear attention and the blocks of the MILA paper's design space,
MILA's own block among them.

"Demystify Mamba in Vision: A Linear Attention Perspective" (Han et al.,
NeurIPS 2024), Tables 1 and 2: a Swin-T-shaped Transformer with global
multi-head linear attention, to which Mamba's six designs (input gate,
forget gate, shortcut, no normalisation, single head, block design) and four
positional encodings (APE, LePE, CPE, RoPE) can be added one by one. MILA
is one point of that space: the ``'sub'`` block with CPE, LePE and RoPE
(:class:`~.mila_block.MILABlock`), with the normaliser of the authors' code.
Where the paper leaves a detail open, docs/design_space.md states the
reading taken here.

Every switch is a constructor argument of :class:`DesignBlock` (the
attention's of :class:`LinearAttention`); module names are MILA's official
ones (``cpe1``, ``in_proj``, ``act_proj``, ``dwc``, ``attn.qk``,
``attn.lepe``, ``out_proj``, ...), so the MILA-like points load MILA's
weights. The backbone (:mod:`mila_det.models.backbones.design_space`)
checks the switches and builds four stages of these blocks.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks import DropPath
from torch import Tensor

from mila_det.ops import linear_attention, rope_table
from mila_det.ops.forget_gate import forget_gate_attention
from mila_det.ops.forget_gate.naive import causal_normaliser
from mila_det.ops.linear_attention.naive import global_linear_attention
from mila_det.ops.linear_attention.parallel import rotate
from .common import (Mlp, TokenLinear, dwconv_tokens, init_mamba_decay,
                     init_mamba_step)
from .fused import no_grad_needed

BLOCK_DESIGNS = ('transformer', 'sub', 'all')
POS_ENCODINGS = ('ape', 'lepe', 'cpe', 'rope')


def phi(x: Tensor, inplace: bool = False) -> Tensor:
    """The feature map of the queries and keys: ``elu(x) + 1`` (positive).

    With ``inplace`` (for a fresh projection nobody else reads) the ELU
    overwrites ``x``, and so does the ``+ 1`` where no gradient flows (ELU's
    backward reads its output). Defaults to False.
    """
    x = F.elu(x, inplace=inplace)
    return x.add_(1.0) if inplace and not x.requires_grad else x + 1.0


class StepSize(nn.Module):
    """Mamba's step ``Delta = softplus(up(down(x)))``, per token and channel.

    ``down``: Linear(in -> rank, no bias); ``up``: Linear(rank -> out) with
    Mamba's initialisation (weights uniform in ``+-rank^-0.5``, bias the
    inverse softplus of a step drawn log-uniformly in [1e-3, 1e-1]).

    Args:
        in_dim (int): Width of the tokens it reads.
        out_dim (int): Channels it gates.
        rank (int): Bottleneck width (Mamba's ``dt_rank``).
    """

    extra_in_linears = True  # the backbone's linear init overwrites them

    def __init__(self, in_dim: int, out_dim: int, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.down = TokenLinear(in_dim, rank, bias=False)
        self.up = TokenLinear(rank, out_dim)

    def reset_extra_parameters(self) -> None:
        """Mamba's ``dt_proj`` initialisation
        (:func:`~.common.init_mamba_step`)."""
        init_mamba_step(self.up.weight, self.up.bias, self.rank)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, N, in_dim]`` -> ``[B, N, out_dim]``, positive."""
        return F.softplus(self.up(self.down(x)))


class LinearAttention(nn.Module):
    """The linear attention of the design space, with every switch; MILA's
    attention is one setting of it (:class:`~.mila_block.MILABlock`).

    Queries and keys are ``phi(.) = elu(.) + 1`` of a projection of ``x``;
    values are a third slice of that projection (``project_v``, the
    Transformer block: one ``qkv`` Linear) or ``x`` itself (the Mamba-style
    blocks, where the block's input projection plays that role: a ``qk``
    Linear, MILA's ``attn.qk``).

    Normalised, the output is ``q' . sum_j k'_j^T v'_j / (q . sum_j k_j +
    eps)`` per head (primes: RoPE-rotated q, k; input-gated v). MILA's
    authors divide by ``q . mean_j(k_j) + eps`` instead (``mean_normaliser``),
    which is the same with ``N * eps`` in place of ``eps``.

    Args:
        dim (int): Width of ``x`` and of the values (and of the output).
        num_heads (int): Heads of the multi-head form; must divide ``dim``.
        project_v (bool): Project the values from ``x`` (one ``qkv``
            Linear) rather than take ``x`` as the values (a ``qk`` Linear).
            Defaults to False.
        single_head (bool): One head whose queries and keys are
            ``single_head_dim`` wide, shared by all value channels.
            Defaults to False.
        single_head_dim (int): Width of those queries and keys.
            Defaults to 32.
        input_gate (bool): Gate the numerator's values by
            ``Delta = softplus(x W1 W2)``. Defaults to False.
        forget_gate (bool): Causal attention whose state decays by
            ``exp(Delta A)`` (:func:`~mila_det.ops.forget_gate.
            forget_gate_attention`). Defaults to False.
        scale_input (bool): With the forget gate, multiply each state input
            by its ``Delta`` as Mamba's kernel does. Defaults to False.
        shortcut (bool): Add ``D * v`` to the attention output.
            Defaults to False.
        normalize (bool): Divide by ``q . sum(k)`` (else by N).
            Defaults to True.
        mean_normaliser (bool): Add ``eps`` to ``q . mean(k)`` (MILA's
            official form) rather than to ``q . sum(k)``. Defaults to False.
        pos_encodings (Sequence[str]): Of ``'ape'``, ``'lepe'``, ``'rope'``
            (CPE lives in the block). Defaults to none.
        ape_grid (tuple[int, int], optional): Grid of the APE table (the
            stage's grid at the pre-training size); needed with ``'ape'``.
        dt_rank (int, optional): Bottleneck of the gates' ``Delta``.
            Defaults to ``ceil(dim / 16)``.
        qkv_bias (bool): Bias on the projection. Defaults to True.
        eps (float): Added to the normaliser. Defaults to 1e-6.
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 project_v: bool = False,
                 single_head: bool = False,
                 single_head_dim: int = 32,
                 input_gate: bool = False,
                 forget_gate: bool = False,
                 scale_input: bool = False,
                 shortcut: bool = False,
                 normalize: bool = True,
                 mean_normaliser: bool = False,
                 pos_encodings: Sequence[str] = (),
                 ape_grid: Optional[Tuple[int, int]] = None,
                 dt_rank: Optional[int] = None,
                 qkv_bias: bool = True,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = 1 if single_head else num_heads
        self.qk_dim = single_head_dim if single_head else dim
        if dim % self.num_heads or self.qk_dim % self.num_heads:
            raise ValueError(f'LinearAttention: num_heads={num_heads} must '
                             f'divide the width {dim}')
        self.project_v = project_v
        self.normalize = normalize
        self.mean_normaliser = mean_normaliser
        self.scale_input = scale_input
        self.eps = eps
        self.use_rope = 'rope' in pos_encodings
        if self.use_rope and self.qk_dim % 4:
            raise ValueError(f'LinearAttention: RoPE needs a q/k width '
                             f'divisible by 4, got {self.qk_dim}')
        if project_v:
            self.qkv = TokenLinear(dim, 2 * self.qk_dim + dim, bias=qkv_bias)
        else:
            self.qk = TokenLinear(dim, 2 * self.qk_dim, bias=qkv_bias)
        rank = dt_rank or math.ceil(dim / 16)
        self.input_gate = StepSize(dim, dim, rank) if input_gate else None
        if forget_gate:
            self.forget_gate = StepSize(dim, dim, rank)
            self.A_log = nn.Parameter(
                torch.empty(dim, self.qk_dim // self.num_heads))
        else:
            self.forget_gate = self.A_log = None
        self.D = nn.Parameter(torch.ones(dim)) if shortcut else None
        if 'ape' in pos_encodings:
            if ape_grid is None:
                raise ValueError('LinearAttention: APE needs ape_grid')
            self.ape_grid = tuple(ape_grid)
            self.absolute_pos_embed = nn.Parameter(
                torch.zeros(1, self.qk_dim, *self.ape_grid))
        else:
            self.absolute_pos_embed = None
        self.lepe = (nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
                     if 'lepe' in pos_encodings else None)
        self.reset_extra_parameters()

    def reset_extra_parameters(self) -> None:
        """``A_log = log(1..N)`` per channel
        (:func:`~.common.init_mamba_decay`), ``D = 1``, APE zero (the
        gates' ``Delta`` projections reset themselves)."""
        with torch.no_grad():
            if self.A_log is not None:
                init_mamba_decay(self.A_log)
            if self.D is not None:
                self.D.fill_(1.0)
            if self.absolute_pos_embed is not None:
                self.absolute_pos_embed.zero_()

    def ape_tokens(self, hw: Tuple[int, int]) -> Tensor:
        """The APE table on the grid ``hw`` (bicubic resize when it differs
        from the pre-training grid), as ``[1, N, qk_dim]``."""
        table = self.absolute_pos_embed
        if tuple(hw) != self.ape_grid:
            table = F.interpolate(table, size=tuple(hw), mode='bicubic',
                                  align_corners=False)
        return table.flatten(2).transpose(1, 2)

    def _eps_of_sum(self, n: int) -> float:
        """The ``eps`` of the form ``q . sum(k) + eps`` for ``n`` tokens."""
        return self.eps * n if self.mean_normaliser else self.eps

    def forward(self, x: Tensor, hw: Tuple[int, int],
                rope: Optional[Tensor] = None) -> Tensor:
        """Args: ``x: [B, N, dim]`` on the grid ``hw``; ``rope: [N,
        qk_dim / 2, 2]`` (built from ``hw`` when omitted and RoPE is on).
        Returns ``[B, N, dim]``."""
        n, d = x.shape[1], self.qk_dim
        if self.project_v:
            proj = self.qkv(x)
            qk, v = proj[..., :2 * d], proj[..., 2 * d:]
        else:
            qk, v = self.qk(x), x
        if self.project_v or self.absolute_pos_embed is not None:
            k = qk[..., d:]
            if self.absolute_pos_embed is not None:
                k = k + self.ape_tokens(hw).to(k.dtype)
            q, k = phi(qk[..., :d]), phi(k)  # each contiguous
        else:  # one pass over q and k, in place on the fresh projection
            q, k = phi(qk, inplace=True).chunk(2, dim=-1)
        v_num = v if self.input_gate is None else self.input_gate(x) * v
        if self.use_rope and rope is None:
            rope = rope_table(hw[0], hw[1], d, x.device)
        mila_operator = (self.use_rope and self.forget_gate is None
                         and self.normalize and d == self.dim
                         and v_num is v)
        q_num = k_num = None
        if self.use_rope and not mila_operator:  # it rotates q, k itself
            q_num, k_num = rotate(q, rope), rotate(k, rope)

        if self.forget_gate is not None:
            out = self._forget_gate(x, q, k, v_num, q_num, k_num)
        elif mila_operator:
            # MILA's operator: rope(q) . sum rope(k)^T v / N over
            # (q . mean(k) + eps'); eps' = eps / N is the form
            # q . sum(k) + eps.
            eps = self.eps if self.mean_normaliser else self.eps / n
            out = linear_attention(q, k, v.contiguous(), self.num_heads,
                                   rope, eps=eps)
        else:
            out = global_linear_attention(q, k, v, self.num_heads,
                                          self.normalize,
                                          self._eps_of_sum(n), q_num, k_num,
                                          v_num)
        if self.D is not None:
            out = out + self.D * v
        if self.lepe is not None:
            out = dwconv_tokens(self.lepe, v.contiguous(), hw, add_to=out)
        return out

    def _forget_gate(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor,
                     q_num: Optional[Tensor],
                     k_num: Optional[Tensor]) -> Tensor:
        """The causal scan; with RoPE the numerator uses the rotated q, k
        and the normaliser ``q_t . sum_{s<=t} k_s`` the plain ones."""
        n = q.shape[1]
        eps = self._eps_of_sum(n)
        delta = self.forget_gate(x)
        A = -torch.exp(self.A_log)
        if q_num is None:
            out = forget_gate_attention(q, k, v, delta, A, self.num_heads,
                                        eps, self.normalize,
                                        self.scale_input)
            return out if self.normalize else out / n
        out = forget_gate_attention(q_num, k_num, v, delta, A,
                                    self.num_heads, eps, False,
                                    self.scale_input)
        if not self.normalize:
            return out / n
        b, h = q.shape[0], self.num_heads
        with torch.autocast(q.device.type, enabled=False):
            ct = torch.promote_types(q.dtype, torch.float32)
            den = causal_normaliser(q, k, h, eps, ct)
            out = out.to(ct).view(b, n, h, self.dim // h) / den
        return out.reshape(b, n, self.dim).to(q.dtype)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, '
                f'qk_dim={self.qk_dim}, normalize={self.normalize}, '
                f'rope={self.use_rope}')


class DesignBlock(nn.Module):
    """One block of the design space on tokens ``[B, N, C]``.

    - ``'transformer'`` (the baseline): ``x + proj(attn(norm1(x)))``, then
      ``x + mlp(norm2(x))``.
    - ``'sub'`` (Mamba's block replaces the attention sub-block, MILA's
      block without positional encodings): ``g = SiLU(act_proj(n))``,
      ``v = SiLU(dwc(in_proj(n)))``, ``x + out_proj(attn(v) * g)``, then the
      MLP sub-block.
    - ``'all'`` (Mamba's block, expansion 2, replaces the whole block, no
      MLP): ``[u, z] = in_proj(n)`` (C -> 4C), ``v = SiLU(dwc(u))``,
      ``x + out_proj(attn(v) * SiLU(z))`` with attention at width 2C.

    With CPE, ``x + dwconv3x3(x)`` runs before each sub-block (two per block,
    one for ``'all'``). Both residual branches use stochastic depth.

    Args:
        dim (int): Token width C.
        num_heads (int): Attention heads (of the multi-head form).
        block (str): ``'transformer'``, ``'sub'`` or ``'all'``.
            Defaults to ``'transformer'``.
        mlp_ratio (float): MLP hidden width over C. Defaults to 4.
        drop_path (float): Stochastic depth rate. Defaults to 0.
        pos_encodings (Sequence[str]): Any of ``'ape'``, ``'lepe'``,
            ``'cpe'``, ``'rope'``. Defaults to none.
        **attn_kwargs: The attention's switches (see
            :class:`LinearAttention`: ``single_head``, ``single_head_dim``,
            ``input_gate``, ``forget_gate``, ``scale_input``, ``shortcut``,
            ``normalize``, ``mean_normaliser``, ``ape_grid``, ``qkv_bias``).
    """

    def __init__(self,
                 dim: int,
                 num_heads: int,
                 block: str = 'transformer',
                 mlp_ratio: float = 4.0,
                 drop_path: float = 0.0,
                 pos_encodings: Sequence[str] = (),
                 **attn_kwargs) -> None:
        super().__init__()
        if block not in BLOCK_DESIGNS:
            raise ValueError(f'DesignBlock: block must be one of '
                             f'{BLOCK_DESIGNS}, got {block!r}')
        self.block = block
        cpe = 'cpe' in pos_encodings
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) \
            if cpe else None
        self.norm1 = nn.LayerNorm(dim)
        rank = math.ceil(dim / 16)  # Mamba's dt_rank='auto', of the model
        if block == 'transformer':
            self.attn = LinearAttention(dim, num_heads, True,
                                        pos_encodings=pos_encodings,
                                        dt_rank=rank, **attn_kwargs)
            self.proj = TokenLinear(dim, dim)
        else:
            inner = dim if block == 'sub' else 2 * dim
            if block == 'sub':
                self.in_proj = TokenLinear(dim, dim)
                self.act_proj = TokenLinear(dim, dim)
            else:
                self.in_proj = TokenLinear(dim, 2 * inner)
            self.dwc = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
            self.attn = LinearAttention(inner, num_heads, False,
                                        pos_encodings=pos_encodings,
                                        dt_rank=rank, **attn_kwargs)
            self.out_proj = TokenLinear(inner, dim)
        self.drop_path = (DropPath(drop_path) if drop_path > 0 else
                          nn.Identity())
        if block != 'all':
            self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) \
                if cpe else None
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, hw: Tuple[int, int],
                rope: Optional[Tensor] = None) -> Tensor:
        """Args: ``x: [B, N, C]`` with ``N = H * W`` for ``hw = (H, W)``;
        ``rope``: the stage's RoPE table for the attention's q/k width.
        Returns ``[B, N, C]``."""
        # The projections may write their sums into the residual they are
        # given: the caller's x only after CPE has made it a new tensor.
        if self.cpe1 is not None:
            x = dwconv_tokens(self.cpe1, x, hw, residual=True)
            residual = x
        else:
            residual = x.clone() if no_grad_needed(x) else x
        n = self.norm1(x)
        if self.block == 'transformer':
            x = self.proj(self.attn(n, hw, rope), residual=residual,
                          drop_path=self.drop_path)
        else:
            if self.block == 'sub':
                gate = self.act_proj(n, act='silu')
                u = self.in_proj(n)
            else:
                u, z = self.in_proj(n).chunk(2, dim=-1)
                gate = F.silu(z)
            v = dwconv_tokens(self.dwc, u.contiguous(), hw, act='silu')
            x = self.out_proj(self.attn(v, hw, rope) * gate,
                              residual=residual, drop_path=self.drop_path)
        if self.block == 'all':
            return x
        if self.cpe2 is not None:
            x = dwconv_tokens(self.cpe2, x, hw, residual=True)
        return self.mlp(self.norm2(x), residual=x, drop_path=self.drop_path)
