"""MILA's block: one point of the design space's block.

MILA: "Demystify Mamba in Vision: A Linear Attention Perspective"
(Han et al., NeurIPS 2024). Its block is the design space's ``'sub'`` block
(Mamba's block in place of the attention sub-block, MLP kept) with CPE,
LePE and RoPE, normalised as in the authors' code (``q . mean(k) + 1e-6``).
Parameter names follow the official checkpoints (``cpe1``, ``in_proj``,
``act_proj``, ``dwc``, ``attn.qk``, ``attn.lepe``, ``out_proj``, ``cpe2``,
``mlp.fc1``, ``mlp.fc2``).
"""
from .design_block import DesignBlock

# MILA's positional encodings, in the order the design space lists them.
MILA_POS_ENCODINGS = ('lepe', 'cpe', 'rope')


class MILABlock(DesignBlock):
    """One MILA block on tokens ``[B, N, C]``:
    :class:`~.design_block.DesignBlock` with ``block='sub'``,
    ``pos_encodings=('lepe', 'cpe', 'rope')`` and ``mean_normaliser=True``.

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
        super().__init__(dim, num_heads, block='sub', mlp_ratio=mlp_ratio,
                         drop_path=drop_path,
                         pos_encodings=MILA_POS_ENCODINGS, qkv_bias=qkv_bias,
                         mean_normaliser=True)
