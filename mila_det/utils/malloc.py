"""Keep freed memory in the process instead of handing it back to the OS.

glibc serves every block above a threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on ``free``. Backbone activations at detection sizes
are tens to hundreds of MiB, so each forward pass on the CPU maps, faults in
(page by page, zero-filled) and unmaps gigabytes: about a quarter of the
VMamba-T forward time at 800x1280 on our 2-core machine. With
:func:`keep_freed_memory` large blocks come from the heap and freed ones are
reused. The price is that the process keeps its peak footprint, which a
training or inference process reaches again on the next step anyway.
PyTorch's CPU tuning guide gets the same effect by preloading jemalloc or
tcmalloc; this needs no extra library.

The entry points in ``tools/`` call it at start; ``MILA_DET_MALLOC=default``
leaves glibc alone. Other C libraries are left alone too.
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
