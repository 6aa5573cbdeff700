from ._dispatch import HAS_TRITON, resolve_backend
from .cross_scan import cross_merge, cross_scan
from .linear_attention import linear_attention, rope_table
from .selective_scan import selective_scan

__all__ = ['HAS_TRITON', 'resolve_backend', 'cross_scan', 'cross_merge',
           'linear_attention', 'rope_table', 'selective_scan']
