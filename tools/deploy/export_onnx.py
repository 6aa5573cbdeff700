"""Export a config's backbone (optionally with its neck) to ONNX and check it
against PyTorch with onnxruntime.

    python tools/deploy/export_onnx.py configs/mask_rcnn_mila_t_1x.py \\
        [--checkpoint FILE] [--shape H W] [--dynamic] [--neck] [--out FILE]

The model is captured with ``torch.export`` (each ``mila_det`` fast path is
one node, see ``mila_det/ops/_op.py``), the operators are
decomposed into plain PyTorch (``export_decompositions``), the chunk
recurrence of the VMamba scan is lowered to an ONNX ``Scan``
(:func:`mila_det_linear_recurrence`), and ``torch.onnx.export(dynamo=True)``
writes the model (opset 18). onnxruntime then runs it on a random input and
the tool prints the largest difference from PyTorch and both latencies.

With ``--dynamic`` the height and width are symbolic: any multiple of 32
from 64 up (MMDetection pads detector inputs to multiples of 32); RoPE tables
and scan lengths are computed from the input in the graph.

Needs ``pip install mila_det[deploy]`` (onnx, onnxscript, onnxruntime).
"""
import argparse
import os
import os.path as osp
import statistics
import time
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

try:
    import onnxscript
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.tensor_typing import TFloat
    HAS_ONNXSCRIPT = True
except ImportError:
    HAS_ONNXSCRIPT = False

# Dynamic sizes are multiples of this, at least twice it (every stage of
# a stride-32 backbone keeps two rows or more).
SIZE_DIVISOR = 32

if HAS_ONNXSCRIPT:

    @onnxscript.script(default_opset=op)
    def mila_det_linear_recurrence(a: TFloat, b: TFloat) -> TFloat:
        """``h[t] = a[t] * h[t-1] + b[t]`` along axis 0 from a zero state:
        an ONNX ``Scan`` whose body is one multiply-add."""

        def step(h, a_t, b_t):
            h_next = a_t * h + b_t
            h_out = op.Identity(h_next)
            return h_next, h_out

        start = op.CastLike(op.ConstantOfShape(op.Shape(b, start=1)), b)
        last, states = op.Scan(start, a, b, body=step, num_scan_inputs=2)
        return states


def onnx_translation_table() -> dict:
    """``custom_translation_table`` of ``torch.onnx.export`` for the one
    ``mila_det`` op left after :func:`export_decompositions`."""
    if not HAS_ONNXSCRIPT:
        raise ImportError('ONNX export needs onnxscript, onnx and onnxruntime:'
                          ' pip install mila_det[deploy]')
    import mila_det.ops  # noqa: F401  (registers torch.ops.mila_det)
    return {torch.ops.mila_det.linear_recurrence.default:
            mila_det_linear_recurrence}


class BackboneWithNeck(nn.Module):
    """``neck(backbone(x))`` as one module (a tuple of maps out)."""

    def __init__(self, backbone: nn.Module, neck: nn.Module) -> None:
        super().__init__()
        self.backbone, self.neck = backbone, neck

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        return tuple(self.neck(self.backbone(x)))


def build_model(config: str, checkpoint: Optional[str] = None,
                with_neck: bool = False,
                cfg_options: Optional[dict] = None) -> nn.Module:
    """The config's backbone (and neck) in eval mode: random weights, or
    those of ``checkpoint`` (a detector or an official backbone file)."""
    from mmengine.config import Config

    import mila_det  # noqa: F401  (registers the backbones)
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return build_from_cfg(cfg.model.backbone,
                          cfg.model.get('neck') if with_neck else None,
                          checkpoint, MODELS)


def build_from_cfg(backbone_cfg: dict, neck_cfg: Optional[dict] = None,
                   checkpoint: Optional[str] = None,
                   registry=None) -> nn.Module:
    """:func:`build_model` from the config dicts themselves."""
    import copy

    import mila_det  # noqa: F401
    if registry is None:
        from mmdet.registry import MODELS as registry
        from mmdet.utils import register_all_modules
        register_all_modules(init_default_scope=True)
    backbone_cfg = copy.deepcopy(dict(backbone_cfg))
    backbone_cfg.pop('init_cfg', None)
    backbone_cfg.pop('pretrained', None)
    if checkpoint:
        backbone_cfg['init_cfg'] = dict(type='Pretrained',
                                        checkpoint=checkpoint)
    backbone = registry.build(backbone_cfg)
    if checkpoint:
        backbone.init_weights()
    model = backbone
    if neck_cfg is not None:
        neck = registry.build(copy.deepcopy(dict(neck_cfg)))
        if checkpoint:
            from mila_det.utils.checkpoint import (load_checkpoint_file,
                                                   select_state_dict)
            state = select_state_dict(load_checkpoint_file(checkpoint),
                                      checkpoint, prefix='neck.')
            neck.load_state_dict(state)
        model = BackboneWithNeck(backbone, neck)
    return model.eval()


def dynamic_shapes(dynamic: bool) -> Optional[tuple]:
    """Symbolic height and width (multiples of :data:`SIZE_DIVISOR`, at
    least twice it), or None for a fixed-size export."""
    if not dynamic:
        return None
    dim = torch.export.Dim
    return ({2: SIZE_DIVISOR * dim('height_div32', min=2, max=1024),
             3: SIZE_DIVISOR * dim('width_div32', min=2, max=1024)}, )


def export_program(model: nn.Module, x: Tensor,
                   dynamic: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` on ``x``, the ``mila_det`` ops then
    decomposed into plain PyTorch (only the chunk recurrence stays)."""
    from mila_det.ops._export import export_decompositions
    if dynamic and (x.shape[-2] % SIZE_DIVISOR or x.shape[-1] % SIZE_DIVISOR
                    or min(x.shape[-2:]) < 2 * SIZE_DIVISOR):
        raise ValueError(f'--dynamic exports at a size that is a multiple of '
                         f'{SIZE_DIVISOR} and at least {2 * SIZE_DIVISOR}; '
                         f'got {tuple(x.shape[-2:])}')
    with torch.no_grad():
        program = torch.export.export(model, (x, ),
                                      dynamic_shapes=dynamic_shapes(dynamic))
    return program.run_decompositions(export_decompositions())


def export_onnx(model: nn.Module, shape: Sequence[int], out: str,
                dynamic: bool = False, opset: int = 18,
                optimize: bool = False) -> str:
    """Write ``model`` on a ``[1, 3, H, W]`` input to ``out`` as ONNX.

    ``optimize`` runs onnxscript's graph optimizer too (slow on these
    graphs, and onnxruntime folds and fuses the same when it loads one).
    """
    x = torch.randn(1, 3, *shape)
    program = export_program(model, x, dynamic)
    n_outputs = len(program.graph_signature.user_outputs)
    onnx_program = torch.onnx.export(
        program, (x, ), dynamo=True, opset_version=opset, optimize=optimize,
        custom_translation_table=onnx_translation_table(),
        input_names=['image'],
        output_names=[f'out{i}' for i in range(n_outputs)])
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    onnx_program.save(out)
    return out


def _median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def check_onnx(model: nn.Module, path: str, shape: Sequence[int],
               repeat: int = 3, seed: int = 0,
               threads: Optional[int] = None) -> Dict[str, float]:
    """Run ``path`` in onnxruntime and ``model`` in PyTorch on one random
    ``[1, 3, H, W]`` input.

    Returns:
        dict: ``max_abs_err`` (over all outputs), ``max_rel_err`` (divided
        by the largest PyTorch magnitude), ``torch_ms`` and ``ort_ms``
        (medians of ``repeat`` runs after one warm-up; 0 when ``repeat``
        is 0), both engines on ``threads`` CPU threads when given.
    """
    import onnxruntime as ort
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, *shape, generator=gen)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        torch.set_num_threads(threads)
    session = ort.InferenceSession(path, options,
                                   providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: x.numpy()}
    got = session.run(None, feed)
    with torch.no_grad():
        want = model(x)
    want = [want] if isinstance(want, Tensor) else list(want)
    if len(got) != len(want):
        raise RuntimeError(f'onnxruntime gave {len(got)} outputs, PyTorch '
                           f'{len(want)}')
    err = scale = 0.0
    for g, w in zip(got, want):
        if tuple(g.shape) != tuple(w.shape):
            raise RuntimeError(f'output shape {tuple(g.shape)} from '
                               f'onnxruntime, {tuple(w.shape)} from PyTorch')
        err = max(err, (torch.from_numpy(g) - w).abs().max().item())
        scale = max(scale, w.abs().max().item())
    result = dict(max_abs_err=err, max_rel_err=err / max(scale, 1e-12),
                  torch_ms=0.0, ort_ms=0.0)
    if repeat:
        with torch.no_grad():
            result['torch_ms'] = _median_ms(lambda: model(x), repeat)
        result['ort_ms'] = _median_ms(lambda: session.run(None, feed), repeat)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='a config of configs/')
    parser.add_argument('--checkpoint', help='detector or backbone weights '
                        '(random weights when omitted)')
    parser.add_argument('--shape', type=int, nargs=2, default=(224, 320),
                        metavar=('H', 'W'),
                        help='input height and width. Defaults to 224 320.')
    parser.add_argument('--dynamic', action='store_true',
                        help='symbolic height and width (multiples of 32)')
    parser.add_argument('--neck', action='store_true',
                        help="export the config's neck too (FPN)")
    parser.add_argument('--out', help='ONNX file. Defaults to '
                        'work_dirs/deploy/<config>.onnx')
    parser.add_argument('--check-shape', type=int, nargs=2,
                        metavar=('H', 'W'), help='also check onnxruntime '
                        'at this size (needs --dynamic)')
    parser.add_argument('--repeat', type=int, default=5,
                        help='timed runs per engine. Defaults to 5.')
    parser.add_argument('--threads', type=int,
                        help='CPU threads of both engines (their defaults '
                        'when omitted)')
    parser.add_argument('--optimize', action='store_true',
                        help="run onnxscript's optimizer on the graph (slow;"
                        ' onnxruntime optimizes it when loading anyway)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys, as in tools/train.py')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not HAS_ONNXSCRIPT:
        raise SystemExit('export_onnx.py needs onnx, onnxscript and '
                         'onnxruntime: pip install mila_det[deploy]')
    name = osp.splitext(osp.basename(args.config))[0]
    out = args.out or osp.join('work_dirs', 'deploy', f'{name}.onnx')
    torch.manual_seed(0)
    model = build_model(args.config, args.checkpoint, args.neck,
                        args.cfg_options)
    what = 'backbone + neck' if args.neck else 'backbone'
    start = time.perf_counter()
    export_onnx(model, args.shape, out, args.dynamic,
                optimize=args.optimize)
    print(f'exported {what} of {name} to {out} '
          f'({osp.getsize(out) / 2**20:.1f} MiB, '
          f'{time.perf_counter() - start:.0f} s, '
          f'{"dynamic H, W" if args.dynamic else "fixed size"})')
    shapes = [tuple(args.shape)]
    if args.check_shape:
        if not args.dynamic:
            raise SystemExit('--check-shape needs --dynamic')
        shapes.append(tuple(args.check_shape))
    for shape in shapes:
        r = check_onnx(model, out, shape, args.repeat, threads=args.threads)
        print(f'1x3x{shape[0]}x{shape[1]}: max |onnxruntime - PyTorch| = '
              f'{r["max_abs_err"]:.2e} (relative {r["max_rel_err"]:.2e}); '
              f'latency PyTorch {r["torch_ms"]:.1f} ms, onnxruntime '
              f'{r["ort_ms"]:.1f} ms (median of {args.repeat})')


if __name__ == '__main__':
    main()
