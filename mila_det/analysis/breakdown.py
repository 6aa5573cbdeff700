"""Where a forward pass spends its time, by class of operation.

One profiled run (PyTorch's profiler, CPU or CUDA activity) is split into
classes: projection / MLP GEMMs (matmuls and 1x1 convolutions), depthwise
convolutions, other (dense) convolutions, the attention or scan operators
(everything run inside one of mila_det's operators), norms, layout changes
(copies, concatenations, allocation) and element-wise work (the rest). Each
profiler event's own (self) time goes to one class: the class of its
outermost enclosing convolution, matmul or norm call if it has one, else its
own. Multiply-adds are computed from the recorded shapes for GEMMs and
convolutions, so every class that does arithmetic in those calls gets an
achieved rate.
"""
import contextlib
import importlib
import math
import time
from typing import Callable, Dict, Iterator, List, Optional

import torch

CLASSES = ('GEMM (projections, MLP)', 'depthwise conv', 'dense conv',
           'attention / scan', 'norms', 'layout / copies', 'element-wise')
OPERATORS = ('linear_attention', 'selective_scan', 'cross_scan',
             'cross_selective_scan')
_CONV = {'aten::conv2d', 'aten::convolution', 'aten::_convolution',
         'mkldnn::_convolution_pointwise', 'mkldnn::_convolution_pointwise_'}
_GEMM = {'aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm',
         'aten::matmul', 'aten::linear', 'aten::einsum',
         'mkldnn::_linear_pointwise'}
_NORM = {'aten::layer_norm', 'aten::native_layer_norm', 'aten::batch_norm',
         'aten::native_batch_norm', 'aten::_batch_norm_impl_index',
         'aten::group_norm', 'aten::native_group_norm'}
_LAYOUT = {'aten::copy_', 'aten::clone', 'aten::contiguous', 'aten::cat',
           'aten::stack', 'aten::_to_copy', 'aten::to', 'aten::empty',
           'aten::empty_strided', 'aten::empty_like', 'aten::resize_',
           'aten::flip', 'aten::zeros', 'aten::new_zeros', 'aten::fill_',
           'aten::zero_', 'aten::index_select'}
_RANGE = 'mila_det::'


@contextlib.contextmanager
def labelled_operators() -> Iterator[None]:
    """Run every mila_det operator inside a profiler range named
    ``mila_det::<op>`` (restored on exit)."""
    saved = []
    for op in OPERATORS:
        module = importlib.import_module(f'mila_det.ops.{op}')
        for table in [v for k, v in vars(module).items()
                      if k.endswith('IMPLS') and isinstance(v, dict)]:
            for backend, fn in list(table.items()):
                saved.append((table, backend, fn))

                def wrapped(*args, _fn=fn, _op=op):
                    with torch.profiler.record_function(_RANGE + _op):
                        return _fn(*args)
                table[backend] = wrapped
    try:
        yield
    finally:
        for table, backend, fn in saved:
            table[backend] = fn


def _outermost(event, names) -> Optional[object]:
    found, node = None, event
    while node is not None:
        if node.name in names:
            found = node
        node = node.cpu_parent
    return found


# The ranges labelled_operators opens (mila_det's own ops, such as the fused
# convolutions, are named ``mila_det::<op>`` too but are not all of them).
_RANGES = frozenset(_RANGE + op for op in OPERATORS)


def _inside_operator(event) -> bool:
    node = event
    while node is not None:
        if node.name in _RANGES:
            return True
        node = node.cpu_parent
    return False


def _conv_operands(event) -> tuple:
    """A convolution event's input shapes and arguments without the residual
    of oneDNN's fused add: ``(other, X, W, ...)`` in place, ``(X, other, W,
    ...)`` out of place (13 arguments, the plain variant has 10)."""
    shapes, args = event.input_shapes, event.concrete_inputs
    if event.name == 'mkldnn::_convolution_pointwise_':
        return shapes[1:], args[1:]
    if event.name == 'mkldnn::_convolution_pointwise' and len(shapes) == 13:
        return shapes[:1] + shapes[2:], args[:1] + args[2:]
    return shapes, args


def _conv_macs(event) -> float:
    """Multiply-adds of a convolution event from its shapes and arguments;
    ``(groups, kernel area)`` tell depthwise from dense."""
    shapes, args = _conv_operands(event)
    x, w = shapes[0], shapes[1]
    if len(x) != 4 or len(w) != 4:
        return 0.0
    if event.name.startswith('mkldnn'):
        padding, stride = args[3], args[4]
    else:
        stride, padding = args[3], args[4]
    stride = stride if isinstance(stride, list) and stride else [1, 1]
    padding = padding if isinstance(padding, list) and padding else [0, 0]
    h = (x[2] + 2 * padding[0] - w[2]) // stride[0] + 1
    wd = (x[3] + 2 * padding[-1] - w[3]) // stride[-1] + 1
    return float(x[0] * w[0] * h * wd * w[1] * w[2] * w[3])


def _conv_class(event) -> str:
    shapes = _conv_operands(event)[0]
    x, w = shapes[0], shapes[1]
    if len(w) == 4 and w[1] == 1 and len(x) == 4 and x[1] > 1:
        return 'depthwise conv'
    if len(w) == 4 and w[2] == w[3] == 1:
        return 'GEMM (projections, MLP)'
    return 'dense conv'


def _gemm_macs(event) -> float:
    shapes = [s for s in event.input_shapes if s]
    name = event.name
    try:
        if name in ('aten::mm', 'aten::matmul') and len(shapes) >= 2:
            a, b = shapes[0], shapes[1]
            return float(math.prod(a[:-1]) * a[-1] * b[-1])
        if name == 'aten::addmm':
            a, b = shapes[1], shapes[2]
            return float(a[0] * a[1] * b[1])
        if name in ('aten::bmm', 'aten::baddbmm'):
            a, b = shapes[-2], shapes[-1]
            return float(a[0] * a[1] * a[2] * b[2])
        if name in ('aten::linear', 'mkldnn::_linear_pointwise'):
            x, w = shapes[0], shapes[1]
            return float(math.prod(x[:-1]) * w[0] * w[1])
    except (IndexError, TypeError):
        pass
    return 0.0


def op_class_breakdown(step: Callable[[], None]) -> Dict[str, dict]:
    """Profile one call of ``step`` and split its time by class.

    Returns:
        dict: class -> ``{'seconds', 'macs', 'events'}``, plus ``'total'``
        with the profiled wall time of the step.
    """
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU]
    with labelled_operators(), profile(activities=activities,
                                       record_shapes=True) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    out: Dict[str, dict] = {c: dict(seconds=0.0, macs=0.0, events=0)
                            for c in CLASSES}
    counted = set()
    events: List = list(prof.events())
    for ev in events:
        if ev.name.startswith(_RANGE):
            continue
        if _inside_operator(ev):
            cls, macs_from = 'attention / scan', _outermost(ev, _GEMM)
        else:
            conv = _outermost(ev, _CONV)
            gemm = _outermost(ev, _GEMM)
            norm = _outermost(ev, _NORM)
            if conv is not None:
                cls, macs_from = _conv_class(conv), conv
            elif gemm is not None:
                cls, macs_from = 'GEMM (projections, MLP)', gemm
            elif norm is not None:
                cls, macs_from = 'norms', None
            elif ev.name in _LAYOUT:
                cls, macs_from = 'layout / copies', None
            else:
                cls, macs_from = 'element-wise', None
        slot = out[cls]
        slot['seconds'] += ev.self_cpu_time_total / 1e6
        slot['events'] += 1
        if macs_from is not None and id(macs_from) not in counted:
            counted.add(id(macs_from))
            slot['macs'] += (_conv_macs(macs_from)
                             if macs_from.name in _CONV else
                             _gemm_macs(macs_from))
    out['total'] = dict(seconds=wall, macs=sum(out[c]['macs']
                                               for c in CLASSES), events=0)
    return out


def format_breakdown(result: Dict[str, dict], peak: float) -> List[str]:
    """Table lines: time, share, multiply-adds and achieved rate per class
    (rate also as a share of ``peak`` FLOP/s)."""
    total = result['total']['seconds']
    summed = sum(result[c]['seconds'] for c in CLASSES)
    lines = [f'  {"class":26s} {"ms":>8s} {"share":>6s} {"GMAC":>8s} '
             f'{"GFLOP/s":>8s} {"of peak":>7s}']
    for c in CLASSES:
        r = result[c]
        rate = 2 * r['macs'] / r['seconds'] if r['seconds'] and r['macs'] \
            else 0.0
        lines.append(
            f'  {c:26s} {r["seconds"] * 1e3:8.1f} '
            f'{r["seconds"] / summed * 100 if summed else 0:5.1f}% '
            f'{r["macs"] / 1e9:8.2f} '
            + (f'{rate / 1e9:8.1f} {rate / peak * 100:6.1f}%' if rate
               else f'{"-":>8s} {"-":>7s}'))
    lines.append(f'  {"sum of classes":26s} {summed * 1e3:8.1f}   (the '
                 f'profiled forward took {total * 1e3:.1f} ms wall; sum / '
                 f'wall = {summed / total * 100:.0f}%)')
    return lines
