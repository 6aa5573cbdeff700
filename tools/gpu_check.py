"""Prove mila_det's GPU path in one command, on an offline CUDA machine.

    python tools/gpu_check.py OUT_DIR [--wheels WHEEL_DIR]
    make gpu-check                     # OUT_DIR = work_dirs/gpu_check

It needs torch (a CUDA build) and triton. Whatever else is missing
(mmengine, mmdet, mmcv without its compiled ops, mila_det itself) is
installed from ``--wheels``, a folder filled beforehand by
``tools/gpu_wheels.sh WHEEL_DIR`` on a machine with pip access; nothing is
fetched from the network. Then, printing progress as it goes:

1. operators: every Triton forward and backward (linear attention, selective
   scan, cross scan / merge, the VMamba 2-D scan, the forget gate) against
   its reference, on
   CUDA tensors in fp32, bf16 and fp16: outputs and every input's gradient,
   at odd small sizes (reference: the token-by-token definition) and at the
   shapes of a 1x3x800x1280 detection input (reference: the PyTorch path,
   itself tested against the definition in the test suite);
2. backbones: MILA-T and VMamba-T forward and backward with
   ``backend='triton'`` against ``backend='torch'``, and under bf16 and fp16
   autocast with no NaN or Inf;
3. timing (CUDA events, after warm-up): each backbone's forward and
   forward+backward at 1x3x800x1280 and 64x3x224x224, Triton and PyTorch
   paths, images/s and allocator peak memory; each operator alone at the
   stage-1 shape;
4. detector: whether mmcv's compiled CUDA ops are there (its extension built
   with CUDA, and nms and RoIAlign run on CUDA tensors). When they are, one
   Mask R-CNN training step (fp16 AMP, set up as ``tools/train.py --amp``
   does) and one inference step (fp32, as ``tools/test.py``) of
   ``configs/mask_rcnn_mila_t_1x.py`` and ``configs/mask_rcnn_vmamba_t_1x.py``
   with random weights on a synthetic batch at 800x1216 (the config's
   images per GPU): finite losses and detections, milliseconds per step
   (median of three, after a warm-up step) and allocator peak memory. When they are not (e.g.
   mmcv from ``tools/gpu_wheels.sh``, built without ops), the report says
   that the detector cannot train on this machine and how to build mmcv
   with CUDA ops (``make env`` does it); the exit status is then decided by
   the other checks, unless ``--require-detector`` is given.

It writes ``report.md`` and ``report.json`` to OUT_DIR and exits with 1 if
any correctness check failed (2 if it could not run). Budget on one modern
GPU, about 7 minutes in all: operators ~1.5 min (interpreter-free compile
of every kernel variant dominates), backbones ~1.5 min, timing ~2.5 min,
detector ~1 min.

``--interpret`` runs the operator checks on the CPU in Triton's interpreter
at small shapes only (the test suite uses it); it must be given before
Triton is imported, so it sets ``TRITON_INTERPRET=1`` itself.
"""
import argparse
import copy
import importlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

# dtype -> max error relative to the reference's largest magnitude, for
# outputs and gradients; the reference runs in fp32 on the same (rounded)
# inputs, so these bound the kernel's own rounding: fp32 accumulation order,
# and for bf16/fp16 the rounding of inputs read and outputs written.
TOLERANCES = {'float32': 2e-4, 'bfloat16': 3e-2, 'float16': 5e-3}
BUDGET_S = {'operators': 90, 'backbones': 90, 'timing': 150,
            'detector': 60}
REQUIRED = ('mmengine', 'mmdet', 'mmcv', 'mila_det')
TOOLS = os.path.dirname(os.path.abspath(__file__))
DETECTORS = {'MILA-T': 'configs/mask_rcnn_mila_t_1x.py',
             'VMamba-T': 'configs/mask_rcnn_vmamba_t_1x.py'}
DETECTOR_SIZE = (800, 1216)


def log(msg: str) -> None:
    print(f'[gpu_check {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def ensure_stack(wheels: Optional[str]) -> None:
    """Import the OpenMMLab pieces, installing them from ``wheels`` (no
    index, no network) when they are missing."""
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if importlib.util.find_spec('pkg_resources') is None:
        missing.append('setuptools<81')  # mmengine imports pkg_resources
    if not missing:
        return
    if not wheels:
        raise SystemExit(
            f'gpu_check: {", ".join(missing)} not installed and no --wheels '
            'folder given. On a machine with pip access run '
            '`bash tools/gpu_wheels.sh WHEEL_DIR`, copy WHEEL_DIR here and '
            'pass --wheels WHEEL_DIR.')
    log(f'installing {", ".join(missing)} from {wheels} (no index)')
    cmd = [sys.executable, '-m', 'pip', 'install', '--no-index',
           '--find-links', wheels, *missing]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f'gpu_check: `{" ".join(cmd)}` failed; was '
                         f'{wheels} made for Python '
                         f'{sys.version_info.major}.{sys.version_info.minor}?')
    importlib.invalidate_caches()


class Report:
    """Checks and timings, printed as they come and written at the end."""

    def __init__(self) -> None:
        self.checks: List[dict] = []
        self.timings: List[dict] = []
        self.env: Dict[str, str] = {}
        # ran: whether the Mask R-CNN steps ran; reason: why not, and how
        self.detector: Dict[str, object] = {}

    def check(self, part: str, name: str, fn: Callable[[], float],
              tol: float) -> None:
        start = time.perf_counter()
        try:
            err = float(fn())
            ok = math.isfinite(err) and err <= tol
            detail = f'max rel err {err:.2e} (tol {tol:.0e})'
        except Exception as exc:  # a failed check is reported, not fatal
            ok, err = False, float('nan')
            detail = f'{type(exc).__name__}: {exc}'[:400]
            traceback.print_exc()
        self.checks.append(dict(part=part, name=name, ok=ok, error=err,
                                tol=tol, detail=detail,
                                seconds=round(time.perf_counter() - start,
                                              2)))
        log(f'{"ok  " if ok else "FAIL"} {part}: {name}: {detail}')

    @property
    def ok(self) -> bool:
        return all(c['ok'] for c in self.checks)

    def write(self, out: str) -> None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, 'report.json'), 'w') as f:
            json.dump(dict(env=self.env, ok=self.ok, checks=self.checks,
                           timings=self.timings, detector=self.detector),
                      f, indent=1)
        lines = ['# mila_det GPU check', '']
        lines += [f'- {k}: {v}' for k, v in self.env.items()]
        lines += ['', f'Correctness: **{"PASS" if self.ok else "FAIL"}** '
                  f'({sum(c["ok"] for c in self.checks)}/{len(self.checks)}'
                  ' checks)', '', '| part | check | result |',
                  '|---|---|---|']
        lines += [f'| {c["part"]} | {c["name"]} | '
                  f'{"ok" if c["ok"] else "**FAIL**"}: {c["detail"]} |'
                  for c in self.checks]
        if self.detector:
            lines += ['', '## Detector (Mask R-CNN)', '',
                      self.detector['summary']]
            if not self.detector['ran']:
                lines += ['', f'Why: {self.detector["reason"]}', '',
                          f'How to fix: {self.detector["how"]}']
        if self.timings:
            lines += ['', '| what | backend | shape | ms | images/s | '
                      'peak MiB |', '|---|---|---|---|---|---|']
            lines += [f'| {t["what"]} | {t["backend"]} | {t["shape"]} | '
                      f'{t["ms"]:.2f} | {t.get("images_per_s", "")} | '
                      f'{t.get("peak_mib", "")} |' for t in self.timings]
        with open(os.path.join(out, 'report.md'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
        log(f'wrote {out}/report.md and report.json')


def rel_err(got, want) -> float:
    want = want.double()
    return ((got.double() - want).abs().max() /
            want.abs().max().clamp_min(1e-12)).item()


def compare(run: Callable, ref: Callable, inputs: list) -> float:
    """Largest relative error over the output and every input's gradient of
    ``run`` against ``ref``; ``ref`` sees fp32 copies of the same inputs."""
    import torch
    leaves = [x.detach().requires_grad_() for x in inputs]
    leaves32 = [x.detach().float().requires_grad_() for x in inputs]
    out = run(*leaves)
    want = ref(*leaves32)
    dy = torch.randn(want.shape, device=want.device,
                     generator=torch.Generator(want.device).manual_seed(0))
    grads = torch.autograd.grad(out.float(), leaves, dy)
    grads32 = torch.autograd.grad(want, leaves32, dy)
    return max([rel_err(out, want)] +
               [rel_err(g, w) for g, w in zip(grads, grads32)])


def operator_cases(device, dtype, full: bool):
    """(name, run, reference, inputs, at a backbone's stage shape) for
    every operator: odd small shapes, and with ``full`` the stage shapes of
    MILA-T / VMamba-T at 800x1280."""
    import torch
    from mila_det.ops import (cross_merge, cross_scan, cross_selective_scan,
                              forget_gate_attention, linear_attention,
                              rope_table, selective_scan)
    from mila_det.ops.forget_gate import (chunk_forget_gate_attention,
                                          naive_forget_gate_attention)
    from mila_det.ops.cross_scan import naive_cross_merge, naive_cross_scan
    from mila_det.ops.cross_selective_scan import (
        chunk_cross_selective_scan, naive_cross_selective_scan)
    from mila_det.ops.linear_attention import (naive_linear_attention,
                                               parallel_linear_attention)
    from mila_det.ops.selective_scan import (chunk_selective_scan,
                                             naive_selective_scan)
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) *
                scale).to(dtype)

    def positive(*shape):
        return (torch.rand(*shape, generator=g, device=device) + 0.5).to(dtype)

    cases = []
    # linear attention: (B, H, W, C, heads); 7x9 with C = 60 is the odd case
    la_shapes = [(2, 7, 9, 60, 2, 'naive')]
    if full:
        la_shapes += [(1, 200, 320, 64, 2, 'torch'),
                      (2, 25, 40, 512, 16, 'torch')]
    for b, h, w, c, heads, ref_name in la_shapes:
        table = rope_table(h, w, c, device)
        ref = (naive_linear_attention if ref_name == 'naive'
               else parallel_linear_attention)
        cases.append((
            f'linear_attention B{b} {h}x{w} C{c} h{heads}',
            lambda q, k, v, t=table, n=heads: linear_attention(
                q, k, v, n, t, backend='triton'),
            lambda q, k, v, t=table, n=heads, r=ref: r(q, k, v, n, t),
            [positive(b, h * w, c), positive(b, h * w, c),
             randn(b, h * w, c)], ref_name == 'torch'))
    # selective scan: (B, channels, groups, N, L)
    ss_shapes = [(2, 24, 4, 1, 63, 'naive'), (1, 30, 2, 4, 37, 'naive')]
    if full:
        ss_shapes += [(1, 384, 4, 1, 200 * 320, 'torch')]
    for b, ch, grp, n, length, ref_name in ss_shapes:
        ref = naive_selective_scan if ref_name == 'naive' else \
            chunk_selective_scan
        cases.append((
            f'selective_scan B{b} D{ch} G{grp} N{n} L{length}',
            lambda u, dt, A, B, C, D, bias: selective_scan(
                u, dt, A, B, C, D, bias, True, backend='triton'),
            lambda u, dt, A, B, C, D, bias, r=ref: r(u, dt, A, B, C, D,
                                                      bias, True),
            [randn(b, ch, length), randn(b, ch, length, scale=0.5),
             -positive(ch, n).float(), randn(b, grp, n, length),
             randn(b, grp, n, length), randn(ch).float(),
             randn(ch, scale=0.5).float()], ref_name == 'torch'))
    # forget gate (design space): (B, L, heads, head width); the stage shape
    # is the design-space baseline's stage 1 (96 channels, 3 heads of 32)
    fg_shapes = [(2, 63, 2, 8, 'naive')]
    if full:
        fg_shapes += [(1, 200 * 320, 3, 32, 'torch')]
    for b, length, heads, d, ref_name in fg_shapes:
        ref = naive_forget_gate_attention if ref_name == 'naive' else \
            chunk_forget_gate_attention
        c = heads * d
        cases.append((
            f'forget_gate B{b} L{length} h{heads}x{d}',
            lambda q, k, v, dt, A, n=heads: forget_gate_attention(
                q, k, v, dt, A, n, backend='triton'),
            lambda q, k, v, dt, A, n=heads, r=ref: r(q, k, v, dt, A, n, 1e-6,
                                                      True, False),
            [positive(b, length, c), positive(b, length, c),
             randn(b, length, c), positive(b, length, c) * 0.1,
             -positive(c, d).float()], ref_name == 'torch'))
    # cross scan and merge
    for b, c, h, w in [(2, 12, 7, 9)] + ([(1, 192, 200, 320)] if full else []):
        stage = h > 100
        cases.append((f'cross_scan B{b} C{c} {h}x{w}',
                      lambda x: cross_scan(x, backend='triton'),
                      naive_cross_scan, [randn(b, c, h, w)], stage))
        cases.append((f'cross_merge B{b} C{c} {h}x{w}',
                      lambda y, h=h, w=w: cross_merge(y, h, w,
                                                      backend='triton'),
                      lambda y, h=h, w=w: naive_cross_merge(y, h, w),
                      [randn(b, 4, c, h * w)], stage))
    # the VMamba 2-D scan: (B, Di, H, W, N, R)
    vs_shapes = [(2, 12, 7, 9, 1, 2, 'naive')]
    if full:
        vs_shapes += [(1, 96, 200, 320, 1, 6, 'torch')]
    for b, inner, h, w, n, r, ref_name in vs_shapes:
        ref = naive_cross_selective_scan if ref_name == 'naive' else \
            chunk_cross_selective_scan
        cases.append((
            f'cross_selective_scan B{b} Di{inner} {h}x{w} N{n}',
            lambda *a: cross_selective_scan(*a, backend='triton'), ref,
            [randn(b, inner, h, w), randn(4, r + 2 * n, inner, scale=0.3),
             randn(4, inner, r, scale=0.3), randn(4, inner, scale=0.5),
             randn(4 * inner, n, scale=0.5), randn(4 * inner)],
            ref_name == 'torch'))
    return cases


def check_operators(report: Report, device, full: bool,
                    dtypes=('float32', 'bfloat16', 'float16')) -> None:
    import torch
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for name, run, ref, inputs, _ in operator_cases(device, dtype,
                                                        full):
            report.check('operators', f'{name} {dtype_name}',
                         lambda: compare(run, ref, inputs),
                         TOLERANCES[dtype_name])


BACKBONES = {'MILA-T': dict(type='MILA', arch='tiny', drop_path_rate=0.0),
             'VMamba-T': dict(type='VMamba', arch='tiny',
                              drop_path_rate=0.0)}


def build(name: str, device):
    from mmdet.registry import MODELS

    import mila_det  # noqa: F401  (registers the backbones)
    model = MODELS.build(dict(BACKBONES[name]))
    model.init_weights()
    return model.to(device)


def with_backend(backend: str, fn: Callable):
    """``fn()`` with every operator on ``backend`` (the setting is read
    once at import, so the environment variable would not switch it)."""
    from mila_det.ops import use_backend
    with use_backend(backend):
        return fn()


def check_backbones(report: Report, device) -> None:
    import torch
    x = torch.randn(2, 3, 256, 384, device=device)
    for name in BACKBONES:
        model = build(name, device).train()

        def run(backend, model=model):
            def go():
                model.zero_grad(set_to_none=True)
                outs = model(x)
                sum(o.float().square().mean() for o in outs).backward()
                return [o.detach() for o in outs], [
                    p.grad.detach().clone() for p in model.parameters()]
            return with_backend(backend, go)

        def triton_vs_torch():
            (o1, g1), (o2, g2) = run('triton'), run('torch')
            return max([rel_err(a, b) for a, b in zip(o1, o2)] +
                       [rel_err(a, b) for a, b in zip(g1, g2)])

        report.check('backbones', f'{name} triton vs torch, fwd+bwd',
                     triton_vs_torch, 1e-3)
        for dtype in (torch.bfloat16, torch.float16):
            def finite(dtype=dtype, model=model):
                def go():
                    model.zero_grad(set_to_none=True)
                    with torch.autocast('cuda', dtype=dtype):
                        outs = model(x)
                    loss = sum(o.float().square().mean() for o in outs)
                    loss.backward()
                    bad = [n for n, p in model.named_parameters()
                           if not torch.isfinite(p.grad).all()]
                    bad += [f'out{i}' for i, o in enumerate(outs)
                            if not torch.isfinite(o).all()]
                    if bad:
                        raise FloatingPointError(f'NaN/Inf in {bad[:5]}')
                    return 0.0
                return with_backend('triton', go)
            report.check('backbones', f'{name} autocast {dtype}, finite',
                         finite, 0.0)


def cuda_time(fn: Callable, warmup: int = 3, repeat: int = 10) -> float:
    """Median milliseconds of ``fn`` by CUDA events, after warm-up."""
    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def time_all(report: Report, device) -> None:
    import torch
    for name in BACKBONES:
        model = build(name, device)
        for shape in ((1, 3, 800, 1280), (64, 3, 224, 224)):
            x = torch.randn(*shape, device=device)
            for backend in ('triton', 'torch'):
                for mode in ('forward', 'forward+backward'):
                    def step(model=model, x=x, mode=mode):
                        if mode == 'forward':
                            with torch.no_grad():
                                model.eval()(x)
                        else:
                            outs = model.train()(x)
                            sum(o.float().mean() for o in outs).backward()
                    torch.cuda.reset_peak_memory_stats(device)
                    ms = with_backend(backend, lambda: cuda_time(step))
                    report.timings.append(dict(
                        what=f'{name} {mode}', backend=backend,
                        shape='x'.join(map(str, shape)), ms=ms,
                        images_per_s=round(shape[0] * 1000 / ms, 1),
                        peak_mib=round(torch.cuda.max_memory_allocated(
                            device) / 2**20)))
                    log(f'{name} {mode} {backend} {shape}: {ms:.1f} ms')
        del model
        torch.cuda.empty_cache()
    for name, run, ref, inputs, stage in operator_cases(
            device, torch.float32, True):
        if not stage:
            continue
        for backend, fn in (('triton', run), ('torch', ref)):
            ms = cuda_time(lambda: fn(*inputs))
            report.timings.append(dict(what=name, backend=backend,
                                       shape='(stage)', ms=ms))
            log(f'{name} {backend}: {ms:.2f} ms')


def _load_tool(name: str):
    """A module of tools/ by file name (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f'_mila_det_tools_{name}', os.path.join(TOOLS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe_mmcv_cuda_ops(device='cuda') -> Tuple[bool, str]:
    """Whether mmcv's compiled ops run on ``device``: (True, what was found)
    or (False, why not)."""
    import torch
    try:
        import mmcv
        from mmcv.ops import RoIAlign, get_compiling_cuda_version, nms
    except (ImportError, OSError) as exc:
        return False, ('mmcv has no compiled ops (`from mmcv.ops import '
                       f'nms` fails: {type(exc).__name__}: {exc})')
    built = get_compiling_cuda_version()
    if built == 'not available':
        return False, (f'mmcv {mmcv.__version__} was compiled without CUDA: '
                       'its nms and RoIAlign run on CPU tensors only')
    try:
        boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.],
                              [50., 50., 60., 60.]], device=device)
        kept = nms(boxes, torch.tensor([0.9, 0.8, 0.7], device=device),
                   0.5)[1]
        feats = torch.randn(1, 4, 16, 16, device=device)
        rois = torch.tensor([[0., 2., 2., 12., 12.]], device=device)
        pooled = RoIAlign((7, 7), 1.0, 2)(feats, rois)
        if device != 'cpu':
            torch.cuda.synchronize(device)
    except RuntimeError as exc:  # e.g. no kernel image for this GPU
        return False, (f'mmcv {mmcv.__version__} (compiled with CUDA '
                       f'{built}) fails on this GPU: {exc}'.strip()[:400])
    if kept.numel() != 2 or tuple(pooled.shape) != (1, 4, 7, 7):
        return False, (f'mmcv {mmcv.__version__} ops give wrong results on '
                       f'{device}: nms kept {kept.numel()} of 3 boxes (want '
                       f'2), RoIAlign shape {tuple(pooled.shape)}')
    return True, f'mmcv {mmcv.__version__}, ops compiled with CUDA {built}'


def how_to_build_mmcv() -> str:
    """How to get mmcv 2.1.0 with CUDA ops on this machine."""
    import torch
    try:
        toolchain = _load_tool('cuda_toolchain')
        archs = toolchain.arch_list([c for _, c in toolchain.local_gpus()])
    except Exception:  # the hint must not fail the report
        archs = ''
    cuda = torch.version.cuda or 'X.Y'
    return ('in this repository, `make env` builds it (it checks first that '
            f'nvcc is from a CUDA {cuda.split(".")[0]}.x toolkit, as torch '
            f'{torch.__version__} needs; see the README, "On a GPU '
            'machine"); in another environment: `pip uninstall -y mmcv && '
            f'FORCE_CUDA=1 MMCV_WITH_OPS=1 TORCH_CUDA_ARCH_LIST="{archs or "X.Y"}" '
            'CUDA_HOME=/path/to/cuda pip install --no-cache-dir '
            '--no-build-isolation mmcv==2.1.0` (CUDA_HOME: a CUDA '
            f'{cuda} toolkit; --no-cache-dir: pip may hold a wheel built '
            'without CUDA ops or for another GPU).')


def _amp_config(config: str, device: 'torch.device', work_dir: str,
                cfg_options: Optional[dict] = None):
    """The config as ``tools/train.py --amp`` builds it (its own
    ``build_config``), with a random-weight backbone. AMP is fp16 with
    dynamic loss scaling on CUDA; without CUDA, train.py's CPU fallback
    (bf16 autocast)."""
    train = _load_tool('train')
    cfg = train.build_config(argparse.Namespace(
        config=config, launcher='none', work_dir=work_dir, amp=True,
        auto_scale_lr=False, resume=None,
        cfg_options={'model.backbone.init_cfg': None,
                     **copy.deepcopy(cfg_options or {})}))
    if device.type == 'cuda' and cfg.optim_wrapper.type != 'AmpOptimWrapper':
        raise RuntimeError('tools/train.py --amp did not choose '
                           f'AmpOptimWrapper ({cfg.optim_wrapper.type})')
    return cfg


def detector_step(config: str, device, height: int = DETECTOR_SIZE[0],
                  width: int = DETECTOR_SIZE[1], batch: Optional[int] = None,
                  warmup: int = 1, repeat: int = 1,
                  work_dir: str = 'work_dirs/gpu_check',
                  cfg_options: Optional[dict] = None) -> dict:
    """Mask R-CNN training and inference steps of ``config`` on ``device``.

    The model has random weights (backbone ``init_cfg=None``); the batch is
    synthetic (``mila_det.utils.synthetic``), ``batch`` images of
    ``height`` x ``width`` (default: the config's images per GPU). Training
    runs through the config's optimiser wrapper as ``tools/train.py --amp``
    sets it up; inference as ``tools/test.py`` runs it (``test_step``).
    ``cfg_options`` are further ``--cfg-options`` (the tests use fewer
    proposals to run on CPU).

    Returns:
        dict: ``train_ms`` / ``infer_ms`` (median wall time per step after
        ``warmup`` steps, synchronised on CUDA), ``train_peak_mib`` /
        ``infer_peak_mib`` (allocator peak on CUDA, else None), ``losses``
        (name -> float, last training step), ``detections`` (boxes of the
        first image), ``optim_wrapper`` and ``shape``.

    Raises:
        FloatingPointError: a loss or a detection is not finite.
    """
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.optim import build_optim_wrapper

    import mila_det  # noqa: F401  (registers the backbones)
    from mila_det.utils.synthetic import synthetic_det_batch
    register_all_modules()
    device = torch.device(device)
    cfg = _amp_config(config if os.path.isabs(config) else
                      os.path.join(os.path.dirname(TOOLS), config), device,
                      work_dir, cfg_options)
    batch = batch or cfg.train_dataloader.batch_size
    model = MODELS.build(cfg.model)
    model.init_weights()
    model = model.to(device)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    images, samples = synthetic_det_batch(batch, height, width)
    # pixel values as the data pipeline gives them (0..255, normalised by
    # the model's data preprocessor)
    data = dict(inputs=[(img * 50 + 110).clamp(0, 255) for img in images],
                data_samples=samples)
    cuda = device.type == 'cuda'

    def timed(step: Callable) -> Tuple[float, Optional[int], object]:
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times, out = [], None
        for _ in range(max(repeat, 1)):
            start = time.perf_counter()
            out = step()
            if cuda:
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) * 1000)
        peak = (round(torch.cuda.max_memory_allocated(device) / 2**20)
                if cuda else None)
        return sorted(times)[len(times) // 2], peak, out

    model.train()
    train_ms, train_peak, log_vars = timed(
        lambda: model.train_step(data, optim_wrapper))
    losses = {k: float(v.detach()) if torch.is_tensor(v) else float(v)
              for k, v in log_vars.items()}
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f'non-finite training losses: {bad}')
    model.eval()
    with torch.no_grad():
        infer_ms, infer_peak, results = timed(lambda: model.test_step(data))
    pred = results[0].pred_instances
    if not (torch.isfinite(pred.bboxes).all() and
            torch.isfinite(pred.scores).all()):
        raise FloatingPointError('non-finite detections')
    return dict(train_ms=train_ms, infer_ms=infer_ms,
                train_peak_mib=train_peak, infer_peak_mib=infer_peak,
                losses=losses, detections=len(pred.bboxes),
                optim_wrapper=cfg.optim_wrapper.type,
                shape=f'{batch}x3x{height}x{width}')


def check_detector(report: Report, device,
                   probe: Optional[Callable[[], Tuple[bool, str]]] = None,
                   size: Tuple[int, int] = DETECTOR_SIZE,
                   warmup: int = 1, repeat: int = 3,
                   cfg_options: Optional[Dict[str, dict]] = None) -> None:
    """The detector part: the mmcv probe, then a training and an inference
    step per detector config (see ``detector_step``), or why not.
    ``cfg_options`` maps a DETECTORS name to further ``--cfg-options`` for
    it (the tests shrink the models to run on CPU)."""
    import torch
    ok, detail = (probe or (lambda: probe_mmcv_cuda_ops(device)))()
    if not ok:
        report.detector = dict(
            ran=False, reason=detail, how=how_to_build_mmcv(),
            summary='**NOT RUN: the detector cannot train on this machine**'
                    ' (Mask R-CNN needs mmcv\'s CUDA ops for RoIAlign and '
                    'NMS on CUDA tensors).')
        log(f'detector: NOT RUN: {detail}')
        log(f'detector: to build mmcv with CUDA ops: '
            f'{report.detector["how"]}')
        return
    log(f'detector: {detail}')
    report.detector = dict(ran=True, mmcv=detail, summary=(
        f'{detail}. One training step (fp16 AMP) and one inference step '
        f'per config, random weights, synthetic batch at {size[0]}x'
        f'{size[1]}.'))
    for name, config in DETECTORS.items():
        result = {}

        def run(config=config, result=result):
            result.update(detector_step(config, device, *size,
                                        warmup=warmup, repeat=repeat,
                                        cfg_options=(cfg_options or
                                                     {}).get(name)))
            return 0.0

        report.check('detector', f'Mask R-CNN {name} ({config}) train + '
                     'inference step, finite', run, 0.0)
        if result:
            for mode in ('train', 'infer'):
                ms = result[f'{mode}_ms']
                images = int(result['shape'].split('x')[0])
                amp = ('fp16 AMP' if result['optim_wrapper'] ==
                       'AmpOptimWrapper' else result['optim_wrapper'])
                report.timings.append(dict(
                    what=f'Mask R-CNN {name} ' + (
                        f'training step ({amp})' if mode == 'train' else
                        'inference step'),
                    backend='auto', shape=result['shape'], ms=ms,
                    images_per_s=round(images * 1000 / ms, 1),
                    peak_mib=result[f'{mode}_peak_mib']))
                log(f'Mask R-CNN {name} {mode}: {ms:.1f} ms, peak '
                    f'{result[f"{mode}_peak_mib"]} MiB')
            log(f'Mask R-CNN {name} losses: ' + ', '.join(
                f'{k} {v:.3f}' for k, v in result['losses'].items()))
        if torch.device(device).type == 'cuda':
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out', help='folder for report.md and report.json')
    parser.add_argument('--wheels', help='local wheel folder (from '
                        'tools/gpu_wheels.sh) for missing packages')
    parser.add_argument('--interpret', action='store_true',
                        help='operator checks only, on CPU in the Triton '
                        'interpreter, small shapes')
    parser.add_argument('--no-detector', action='store_true',
                        help='skip the Mask R-CNN training and inference '
                        'steps (part 4)')
    parser.add_argument('--require-detector', action='store_true',
                        help='exit with 1 when the detector cannot run '
                        '(mmcv without CUDA ops)')
    args = parser.parse_args(argv)
    if args.interpret:
        os.environ['TRITON_INTERPRET'] = '1'
    try:
        import torch
    except ImportError:
        print('gpu_check: torch is not installed', file=sys.stderr)
        return 2
    if not args.interpret and not torch.cuda.is_available():
        print('gpu_check: no CUDA device is visible to torch '
              f'{torch.__version__} (CUDA build: {torch.version.cuda}); run '
              'it on a GPU machine, or pass --interpret to check the '
              'operators in the Triton interpreter on CPU.', file=sys.stderr)
        return 2
    if importlib.util.find_spec('triton') is None:
        print('gpu_check: triton is not installed', file=sys.stderr)
        return 2
    ensure_stack(args.wheels)
    report = Report()
    device = torch.device('cpu' if args.interpret else 'cuda')
    report.env = dict(
        torch=torch.__version__, cuda=str(torch.version.cuda),
        triton=importlib.import_module('triton').__version__,
        device=('CPU (Triton interpreter)' if args.interpret else
                torch.cuda.get_device_name(device)),
        python=sys.version.split()[0])
    log(f'{report.env}')
    started = time.perf_counter()
    parts = [('operators', lambda: check_operators(
        report, device, full=not args.interpret,
        dtypes=('float32', ) if args.interpret else
        ('float32', 'bfloat16', 'float16')))]
    if not args.interpret:
        parts += [('backbones', lambda: check_backbones(report, device)),
                  ('timing', lambda: time_all(report, device))]
        if not args.no_detector:
            parts += [('detector', lambda: check_detector(
                report, device, repeat=3))]
    for part, run in parts:
        log(f'{part} (budget {BUDGET_S[part]} s)')
        t0 = time.perf_counter()
        run()
        log(f'{part} took {time.perf_counter() - t0:.0f} s')
    report.env['seconds'] = f'{time.perf_counter() - started:.0f}'
    report.write(args.out)
    detector_missing = bool(report.detector) and not report.detector['ran']
    log(('PASS' if report.ok else 'FAIL: see the report') +
        (' (operators and backbones only: the detector cannot train here, '
         'see the report)' if detector_missing else ''))
    if detector_missing and args.require_detector:
        return 1
    return 0 if report.ok else 1


if __name__ == '__main__':
    sys.exit(main())
