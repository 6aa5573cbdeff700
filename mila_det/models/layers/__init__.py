from .common import (LayerNorm2d, Mlp, TokenLinear, dwconv_tokens,
                     init_mamba_decay, init_mamba_step)
from .design_block import DesignBlock, LinearAttention
from .embed import (ConvDownsample, ConvLayer, ConvStem, PatchEmbed,
                    PatchMerging2x2)
from .fused import cpu_fusion, cpu_fusion_enabled, set_cpu_fusion
from .mila_block import MILABlock
from .vmamba_block import SS2D, VSSBlock

__all__ = ['LayerNorm2d', 'Mlp', 'TokenLinear', 'dwconv_tokens',
           'init_mamba_decay', 'init_mamba_step', 'ConvDownsample',
           'ConvLayer', 'ConvStem', 'PatchEmbed', 'PatchMerging2x2',
           'cpu_fusion', 'cpu_fusion_enabled', 'set_cpu_fusion',
           'LinearAttention', 'DesignBlock', 'MILABlock', 'SS2D', 'VSSBlock']
