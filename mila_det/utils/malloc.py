"""Keep freed memory in the process instead of handing it back to the OS.

glibc serves every block above a threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on ``free``. :func:`keep_freed_memory` sets
``M_MMAP_MAX`` to 0 and ``M_TRIM_THRESHOLD`` to -1 (``mallopt(3)``), so
large blocks come from the heap, freed ones are reused, and the heap is never
trimmed. The process therefore keeps its peak footprint.

The entry points in ``tools/`` call it at start; ``MILA_DET_MALLOC=default``
leaves glibc alone. With other C libraries it does nothing.
"""
import ctypes
import ctypes.util
import os

ENV = 'MILA_DET_MALLOC'
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve large blocks from glibc's heap and never trim it.

    Returns:
        bool: Whether the setting was applied (False off glibc, or when
        ``MILA_DET_MALLOC=default``).
    """
    if os.environ.get(ENV, '').lower() == 'default':
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # A trim threshold of -1 turns trimming off altogether (mallopt(3)); any
    # finite one (at most 2 GiB) is crossed when a 2048^2 forward frees its
    # activations, and the next pass faults them all in again.
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1))
