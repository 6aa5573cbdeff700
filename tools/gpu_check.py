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
   stage-1 shape.

It writes ``report.md`` and ``report.json`` to OUT_DIR and exits with 1 if
any correctness check failed (2 if it could not run). Budget on one modern
GPU, about 6 minutes in all: operators ~1.5 min (interpreter-free compile
of every kernel variant dominates), backbones ~1.5 min, timing ~2.5 min.

``--interpret`` runs the operator checks on the CPU in Triton's interpreter
at small shapes only (the test suite uses it); it must be given before
Triton is imported, so it sets ``TRITON_INTERPRET=1`` itself.
"""
import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

# dtype -> max error relative to the reference's largest magnitude, for
# outputs and gradients; the reference runs in fp32 on the same (rounded)
# inputs, so these bound the kernel's own rounding: fp32 accumulation order,
# and for bf16/fp16 the rounding of inputs read and outputs written.
TOLERANCES = {'float32': 2e-4, 'bfloat16': 3e-2, 'float16': 5e-3}
BUDGET_S = {'operators': 90, 'backbones': 90, 'timing': 150}
REQUIRED = ('mmengine', 'mmdet', 'mmcv', 'mila_det')


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
                           timings=self.timings), f, indent=1)
        lines = ['# mila_det GPU check', '']
        lines += [f'- {k}: {v}' for k, v in self.env.items()]
        lines += ['', f'Correctness: **{"PASS" if self.ok else "FAIL"}** '
                  f'({sum(c["ok"] for c in self.checks)}/{len(self.checks)}'
                  ' checks)', '', '| part | check | result |',
                  '|---|---|---|']
        lines += [f'| {c["part"]} | {c["name"]} | '
                  f'{"ok" if c["ok"] else "**FAIL**"}: {c["detail"]} |'
                  for c in self.checks]
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
    previous = os.environ.get('MILA_DET_BACKEND')
    os.environ['MILA_DET_BACKEND'] = backend
    try:
        return fn()
    finally:
        if previous is None:
            del os.environ['MILA_DET_BACKEND']
        else:
            os.environ['MILA_DET_BACKEND'] = previous


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('out', help='folder for report.md and report.json')
    parser.add_argument('--wheels', help='local wheel folder (from '
                        'tools/gpu_wheels.sh) for missing packages')
    parser.add_argument('--interpret', action='store_true',
                        help='operator checks only, on CPU in the Triton '
                        'interpreter, small shapes')
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
    for part, run in parts:
        log(f'{part} (budget {BUDGET_S[part]} s)')
        t0 = time.perf_counter()
        run()
        log(f'{part} took {time.perf_counter() - t0:.0f} s')
    report.env['seconds'] = f'{time.perf_counter() - started:.0f}'
    report.write(args.out)
    log('PASS' if report.ok else 'FAIL: see the report')
    return 0 if report.ok else 1


if __name__ == '__main__':
    sys.exit(main())
