from .common import LayerNorm2d, Mlp, TokenLinear, dwconv_tokens
from .fused import cpu_fusion, cpu_fusion_enabled, set_cpu_fusion
from .mila_block import LinearAttention, MILABlock
from .vmamba_block import SS2D, VSSBlock

__all__ = ['LayerNorm2d', 'Mlp', 'TokenLinear', 'dwconv_tokens',
           'cpu_fusion', 'cpu_fusion_enabled', 'set_cpu_fusion',
           'LinearAttention', 'MILABlock', 'SS2D', 'VSSBlock']
