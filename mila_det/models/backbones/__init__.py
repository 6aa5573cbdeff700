from .design_space import LinearAttentionTransformer
from .mila import MILA, MLLA
from .vmamba import MM_VSSM, VMamba

__all__ = ['MILA', 'MLLA', 'VMamba', 'MM_VSSM', 'LinearAttentionTransformer']
