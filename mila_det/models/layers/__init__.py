from .mila_block import LinearAttention, MILABlock, Mlp
from .vmamba_block import SS2D, LayerNorm2d, Linear2d, VSSBlock

__all__ = ['LinearAttention', 'MILABlock', 'Mlp', 'SS2D', 'LayerNorm2d',
           'Linear2d', 'VSSBlock']
