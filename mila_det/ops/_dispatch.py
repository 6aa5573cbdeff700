"""The one place that decides which backend runs an operator.

``auto`` picks Triton when the tensors live on CUDA, Triton imports and the
kernel supports the inputs, and PyTorch otherwise. A ``backend=`` argument,
or the ``MILA_DET_BACKEND`` environment variable, forces one; forcing one
that cannot run raises a ``RuntimeError`` that says how to fix it. ``naive``
runs each operator's plain reference (``naive.py``), for debugging and
benchmarks.

Operators call :func:`dispatch` with their implementations and receive the
one to run; no operator or model chooses a backend itself.

Until the kernels have been verified on the GPUs users run, a Triton kernel
that ``auto`` picked and that fails to compile or launch does not end the
run: the first call of each operator variant (operator, device, dtype,
whether gradients are needed) runs its forward, and its backward where a
gradient is needed, on detached views of the inputs first, and every later
forward is guarded too. If one raises one of Triton's own compile or launch
errors (:data:`KERNEL_ERRORS`, by type), one warning gives the operator and
the error's text, and the operator runs in PyTorch for the rest of the
process. Every other exception (a bug, running out of memory, activation
checkpointing's control flow) propagates. A backward that first fails on a
later shape still raises. A forced ``triton`` raises instead.

``MILA_DET_BACKEND`` is read once, when this module is imported
(:data:`BACKEND`).
"""
import contextlib
import os
import warnings
from typing import (Any, Callable, Dict, Iterator, Mapping, Optional,
                    Tuple)

import torch

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

BACKENDS = ('auto', 'torch', 'triton', 'naive')
BACKEND_ENV = 'MILA_DET_BACKEND'


def backend_setting(environ: Mapping[str, str] = os.environ) -> str:
    """The backend ``MILA_DET_BACKEND`` asks for (``'auto'`` when unset),
    lower-cased; read once, when this module is imported."""
    return (environ.get(BACKEND_ENV) or 'auto').lower()


BACKEND = backend_setting()


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run every operator called inside on ``backend`` (``'auto'``,
    ``'torch'``, ``'triton'`` or ``'naive'``) unless a call passes its own
    ``backend=``: the run-time counterpart of ``MILA_DET_BACKEND``."""
    global BACKEND
    if backend.lower() not in BACKENDS:
        raise ValueError(f'unknown backend {backend!r}; expected one of '
                         f'{BACKENDS}')
    previous, BACKEND = BACKEND, backend.lower()
    try:
        yield
    finally:
        BACKEND = previous


# Triton reads TRITON_INTERPRET when it is imported, so this module does too.
TRITON_INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'


def requested_backend(op: str, backend: Optional[str] = None) -> str:
    """The backend asked for: ``backend``, else :data:`BACKEND` (the
    ``MILA_DET_BACKEND`` setting at import), lower-cased and checked."""
    backend = BACKEND if backend is None else backend.lower()
    if backend not in BACKENDS:
        raise ValueError(f'{op}: unknown backend {backend!r}; expected one '
                         f'of {BACKENDS} (argument backend= or the '
                         f'{BACKEND_ENV} environment variable)')
    return backend


def resolve_backend(op: str,
                    x: torch.Tensor,
                    backend: Optional[str] = None,
                    has_triton_kernel: bool = True,
                    triton_unsupported: Optional[str] = None) -> str:
    """Return ``'torch'``, ``'triton'`` or ``'naive'`` for running ``op``.

    Args:
        op (str): Name of the operator, used in error messages.
        x (Tensor): A representative input (its device decides ``auto``).
        backend (str, optional): ``'auto'``, ``'torch'``, ``'triton'`` or
            ``'naive'``. Defaults to the ``MILA_DET_BACKEND`` environment
            variable, or ``'auto'`` when it is unset.
        has_triton_kernel (bool): Whether ``op`` has a Triton kernel.
            Defaults to True.
        triton_unsupported (str, optional): Why the Triton kernel cannot take
            these particular inputs (an odd head width, float64), or None
            when it can. ``auto`` then runs PyTorch; a forced ``triton``
            raises with this reason. Defaults to None.
    """
    backend = requested_backend(op, backend)
    on_device = x.is_cuda or TRITON_INTERPRET
    triton_can_run = (HAS_TRITON and has_triton_kernel and on_device
                      and triton_unsupported is None)
    if backend == 'auto':
        return 'triton' if (triton_can_run and x.is_cuda) else 'torch'
    if backend == 'triton' and not triton_can_run:
        if not HAS_TRITON:
            why = 'Triton is not installed (pip install triton)'
        elif not has_triton_kernel:
            why = f'{op} has no Triton kernel; use backend="torch"'
        elif not on_device:
            why = (f'the tensors are on {x.device}; move them to a CUDA '
                   'device, or set TRITON_INTERPRET=1 (before importing '
                   'mila_det) to run the kernels on CPU in the interpreter')
        else:
            why = f'{triton_unsupported}; use backend="torch" or "auto"'
        raise RuntimeError(f'{op}: backend "triton" was forced but cannot '
                           f'run: {why}. Unset {BACKEND_ENV} or pass '
                           'backend="auto" to let mila_det choose.')
    return backend


def dispatch(op: str,
             x: torch.Tensor,
             backend: Optional[str],
             impls: Dict[str, Callable],
             triton_unsupported: Optional[str] = None) -> Callable:
    """The implementation of ``op`` to run on inputs like ``x``.

    Args:
        op (str): Name of the operator, used in error messages.
        x (Tensor): A representative input.
        backend (str, optional): As in :func:`resolve_backend`.
        impls (dict): ``{'naive': f, 'torch': g, 'triton': h}``, each taking
            the operator's arguments; no ``'triton'`` entry means no kernel.
        triton_unsupported (str, optional): As in :func:`resolve_backend`.

    Returns:
        Callable: The implementation to call.
    """
    requested = requested_backend(op, backend)
    name = resolve_backend(op, x, requested, 'triton' in impls,
                           triton_unsupported)
    if name == 'triton' and requested == 'auto':
        return _guarded(op, impls['triton'], impls['torch'])
    return impls[name]


# (op, device, dtype, needs grad) -> None if the kernels ran, else the error
_TRIED: Dict[Tuple[Any, ...], Optional[str]] = {}


def _kernel_errors() -> Tuple[type, ...]:
    """Triton's own compile and launch errors, by name: what ``auto``
    falls back from. Any other exception is a bug and propagates."""
    if not HAS_TRITON:
        return ()
    import importlib
    names = (('triton.errors', 'TritonError'),
             ('triton.compiler.errors', 'CompilationError'),
             ('triton.runtime.errors', 'OutOfResources'),
             ('triton.runtime.errors', 'PTXASError'))
    found = []
    for module, name in names:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


KERNEL_ERRORS = _kernel_errors()


def _guarded(op: str, triton_impl: Callable,
             torch_impl: Callable) -> Callable:
    """``triton_impl``, falling back to ``torch_impl`` for good when the
    kernels raise one of :data:`KERNEL_ERRORS` on their first use (see the
    module docstring)."""

    def run(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in tensors)
        key = (op, tensors[0].device, tensors[0].dtype, needs_grad)
        if _TRIED.get(key) is not None:
            return torch_impl(*args)
        try:
            if key not in _TRIED:
                # Outer saved-tensor hooks (activation checkpointing,
                # offloading) must not see the probe's graph.
                with torch.autograd.graph.saved_tensors_hooks(
                        lambda t: t, lambda t: t):
                    _probe(triton_impl, args, needs_grad)
                _TRIED[key] = None
            return triton_impl(*args)
        except KERNEL_ERRORS as err:
            _TRIED[key] = f'{type(err).__name__}: {err}'
            warnings.warn(
                f'mila_det: the Triton kernels of {op} failed on {key[1]} '
                f'({key[2]}): {_TRIED[key][:500]}. Running {op} in PyTorch '
                f'for the rest of this process. Set {BACKEND_ENV}=triton to '
                f'make this an error, or {BACKEND_ENV}=torch to skip the '
                'kernels.', RuntimeWarning, stacklevel=2)
            return torch_impl(*args)

    return run


def _probe(impl: Callable, args: tuple, needs_grad: bool) -> None:
    """Run ``impl`` forward (and backward when ``needs_grad``) on detached
    views of ``args`` (the kernels write only to new buffers)."""
    copies = [a.detach().requires_grad_(a.requires_grad and needs_grad)
              if isinstance(a, torch.Tensor) else a for a in args]
    with torch.enable_grad() if needs_grad else torch.no_grad():
        out = impl(*copies)
        leaves = [c for c in copies
                  if isinstance(c, torch.Tensor) and c.requires_grad]
        if leaves and out.requires_grad:
            torch.autograd.grad(out, leaves, torch.ones_like(out),
                                allow_unused=True)
