"""One helper that makes a fast path a ``torch.library`` custom op.

A fast path is a pair written once, as flash-linear-attention writes its
kernels: ``forward(*args) -> (out, residuals)`` and
``backward(grad, saved, *args) -> grads``, where ``saved`` is what the
backward needs besides the inputs (the residuals, and the output when
``save_output``). :class:`FastPathOp` registers

- ``mila_det::<name>``: runs ``forward``, returns ``[out, *residuals]``
  (``out`` alone for a path without residuals);
- ``mila_det::<name>_backward``: runs ``backward`` on the saved tensors
  (never the forward again) and returns the gradients of ``grads_for``;
- the autograd formula that connects them, and the fake (meta) function
  both need for tracing.

Calling the :class:`FastPathOp` runs the op and returns ``out``: eager code,
``torch.compile`` and ``torch.export`` take this same entry, so a compiled
training step calls each path's forward once and its backward once, as
eager does. With a ``definition`` (the op's ``naive.py``), the op lowers to
it for the stock exporter (``torch.onnx.export(..., dynamo=True)``); see
:func:`register_export_lowering`.
"""
import inspect
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._guard import device_guard

NAMESPACE = 'mila_det'
_TENSOR_TYPES = (Tensor, Optional[Tensor])
_POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD

# op -> the definition it lowers to for export (see register_export_lowering)
EXPORT_LOWERINGS: Dict[torch._ops.OpOverload, Callable] = {}


class FastPathOp:
    """A fast path registered as ``mila_det::<name>`` with its backward.

    Args:
        name (str): Op name inside the ``mila_det`` namespace.
        forward (Callable): ``forward(*args) -> (out, residuals)``; its type
            annotations (``Tensor``, ``Optional[Tensor]``, ``int``,
            ``float``, ``bool``, ``Optional[int]``) give the op's schema.
            ``out`` and the residuals must be new tensors.
        backward (Callable, optional): ``backward(grad, saved, *args)`` ->
            one gradient (or None) per name in ``grads_for``; None for an
            inference-only path (no autograd formula is registered, so a
            call that needs a gradient raises).
        fake (Callable): ``fake(*args) -> (out, residuals)`` as empty
            tensors of the real shapes, dtypes and strides.
        grads_for (Sequence[str]): The tensor arguments that get a
            gradient; every other argument gets None.
        save_output (bool): Hand ``out`` to ``backward`` first in
            ``saved``. Defaults to False.
        residuals (bool): Whether ``forward`` returns residuals; without,
            the op returns ``out`` alone (a plain tensor node in exported
            graphs). Defaults to False.
        definition (Callable, optional): The plain PyTorch computation of
            ``out`` from ``args`` that the op lowers to for export.
            Defaults to None.
    """

    def __init__(self,
                 name: str,
                 forward: Callable,
                 backward: Optional[Callable],
                 fake: Callable,
                 grads_for: Sequence[str] = (),
                 save_output: bool = False,
                 residuals: bool = False,
                 definition: Optional[Callable] = None) -> None:
        self.name, self.forward, self.backward = name, forward, backward
        signature = inspect.signature(forward)
        params = list(signature.parameters.values())
        self.arg_names = [p.name for p in params]
        unknown = set(grads_for) - {p.name for p in params
                                    if p.annotation in _TENSOR_TYPES}
        if unknown:
            raise ValueError(f'{name}: grads_for names {sorted(unknown)}, '
                             'which are not tensor arguments')
        self.grad_index = [self.arg_names.index(n) for n in grads_for]
        self.save_output, self.residuals = save_output, residuals

        def outputs(out: Tensor, kept: Sequence[Tensor]):
            if residuals:
                return [out, *kept]
            if kept:
                raise RuntimeError(f'{name}: the forward returned residuals '
                                   'but the op was declared without them')
            return out

        def run(*args):
            return outputs(*self.forward(*args))

        run.__signature__ = signature.replace(
            return_annotation=List[Tensor] if residuals else Tensor)
        self.op = torch.library.custom_op(f'{NAMESPACE}::{name}', run,
                                          mutates_args=())

        def run_fake(*args):
            return outputs(*fake(*args))

        self.op.register_fake(run_fake)

        if backward is not None:  # else: no gradient flows through it
            def run_backward(*args):
                grad, saved, inputs = args[0], args[1], args[2:]
                grads = self.backward(grad, saved, *inputs)
                return [_placeholder(g, inputs[i], grad)
                        for g, i in zip(grads, self.grad_index)]

            def fake_backward(grad, saved, *inputs):
                return [_placeholder(None, inputs[i], grad)
                        for i in self.grad_index]

            run_backward.__signature__ = signature.replace(
                parameters=[
                    inspect.Parameter('grad', _POSITIONAL, annotation=Tensor),
                    inspect.Parameter('saved', _POSITIONAL,
                                      annotation=List[Tensor])
                ] + params,
                return_annotation=List[Tensor])
            self.backward_op = torch.library.custom_op(
                f'{NAMESPACE}::{name}_backward', run_backward,
                mutates_args=())
            self.backward_op.register_fake(fake_backward)
            self.op.register_autograd(
                self._autograd_backward, setup_context=self._setup_context)
        if definition is not None:
            def lowering(*args):
                # the residuals are unused in an inference graph
                return outputs(definition(*args), fake(*args)[1])

            register_export_lowering(self.default, lowering)

    @property
    def default(self) -> torch._ops.OpOverload:
        """The registered overload, ``torch.ops.mila_det.<name>.default``."""
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default

    def __call__(self, *args) -> Tensor:
        # Mixed devices would reach the fake (meta) kernel or the wrong
        # one: refuse them by name.
        device_guard(self.name, **{n: a for n, a in zip(self.arg_names, args)
                                   if isinstance(a, Tensor)})
        return self.op(*args)[0] if self.residuals else self.op(*args)

    def _setup_context(self, ctx, inputs: Tuple, output) -> None:
        out, *residuals = output if self.residuals else [output]
        ctx.mark_non_differentiable(*residuals)
        ctx.set_materialize_grads(False)
        saved = ([out] if self.save_output else []) + residuals
        tensors = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in tensors), *saved)
        ctx.layout = (tensors, len(inputs))
        ctx.constants = [None if isinstance(a, Tensor) else a
                         for a in inputs]

    def _autograd_backward(self, ctx, grads):
        grads = grads if self.residuals else [grads]
        tensors, count = ctx.layout
        saved = ctx.saved_tensors
        inputs = list(ctx.constants)
        for i, t in zip(tensors, saved):
            inputs[i] = t
        result: List[Optional[Tensor]] = [None] * count
        if grads[0] is None:
            return tuple(result)
        computed = self.backward_op(grads[0], list(saved[len(tensors):]),
                                    *inputs)
        for i, g in zip(self.grad_index, computed):
            result[i] = None if inputs[i] is None else g
        return tuple(result)


def _placeholder(grad: Optional[Tensor], like: Optional[Tensor],
                 ref: Tensor) -> Tensor:
    """``grad`` in the backward op's list of gradients: an empty tensor
    (on ``ref``'s device) for an absent optional input, zeros where the
    backward returned None."""
    if like is None:
        return ref.new_empty(0)
    return torch.zeros_like(like) if grad is None else grad


def register_export_lowering(op: torch._ops.OpOverload,
                             fn: Callable) -> None:
    """Lower ``op`` to ``fn`` in the stock exporter.

    ``torch.onnx.export(..., dynamo=True)`` decomposes an op it cannot
    translate with the function it finds in torch's decomposition table.
    torch.library has no public call that registers a decomposition for
    export only (a CompositeImplicitAutograd kernel would also be inlined
    by torch.compile, which would then run the definition instead of the
    fast path), so this uses ``torch._decomp.register_decomposition``;
    torch.compile does not apply that table to custom ops. The lowering is
    also kept in :data:`EXPORT_LOWERINGS` for ``run_decompositions``.
    """
    from torch._decomp import register_decomposition
    register_decomposition(op)(fn)
    EXPORT_LOWERINGS[op] = fn
