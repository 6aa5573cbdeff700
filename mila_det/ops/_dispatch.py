"""The one place that decides which backend runs an operator.

``auto`` picks Triton when the tensors live on CUDA and Triton imports, and
PyTorch otherwise. A ``backend=`` argument, or the ``MILA_DET_BACKEND``
environment variable, forces either; forcing one that cannot run raises a
``RuntimeError`` that says how to fix it. ``naive`` runs each operator's
plain reference (``naive.py``), for debugging and benchmarks.
"""
import os
from typing import Optional

import torch

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

BACKENDS = ('auto', 'torch', 'triton', 'naive')
BACKEND_ENV = 'MILA_DET_BACKEND'


def resolve_backend(op: str,
                    x: torch.Tensor,
                    backend: Optional[str] = None,
                    has_triton_kernel: bool = True) -> str:
    """Return ``'torch'``, ``'triton'`` or ``'naive'`` for running ``op``.

    Args:
        op (str): Name of the operator, used in error messages.
        x (Tensor): A representative input (its device decides ``auto``).
        backend (str, optional): ``'auto'``, ``'torch'``, ``'triton'`` or
            ``'naive'``.
            Defaults to the ``MILA_DET_BACKEND`` environment variable, or
            ``'auto'`` when it is unset.
        has_triton_kernel (bool): Whether ``op`` has a Triton kernel.
            Defaults to True.
    """
    if backend is None:
        backend = os.environ.get(BACKEND_ENV, 'auto') or 'auto'
    backend = backend.lower()
    if backend not in BACKENDS:
        raise ValueError(f'{op}: unknown backend {backend!r}; expected one '
                         f'of {BACKENDS} (argument backend= or the '
                         f'{BACKEND_ENV} environment variable)')
    interpret = os.environ.get('TRITON_INTERPRET', '0') == '1'
    triton_can_run = (HAS_TRITON and has_triton_kernel
                      and (x.is_cuda or interpret))
    if backend == 'auto':
        return 'triton' if (triton_can_run and x.is_cuda) else 'torch'
    if backend == 'triton' and not triton_can_run:
        if not HAS_TRITON:
            why = 'Triton is not installed (pip install triton)'
        elif not has_triton_kernel:
            why = f'{op} has no Triton kernel; use backend="torch"'
        else:
            why = (f'the tensors are on {x.device}; move them to a CUDA '
                   'device, or set TRITON_INTERPRET=1 to run the kernels '
                   'on CPU in the (slow) interpreter')
        raise RuntimeError(f'{op}: backend "triton" was forced but cannot '
                           f'run: {why}. Unset {BACKEND_ENV} or pass '
                           'backend="auto" to let mila_det choose.')
    return backend
