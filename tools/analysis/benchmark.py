"""Latency, throughput, peak memory and efficiency of a backbone or detector.

    python tools/analysis/benchmark.py --backbone vmamba_t --compare-naive
    python tools/analysis/benchmark.py --backbone mila_t --shape 800 1280
    python tools/analysis/benchmark.py configs/mask_rcnn_mila_t_1x.py \\
        --mode train --shape 800 1216 \\
        [--cfg-options model.backbone.with_cp=True]
    python tools/analysis/benchmark.py --backbone mila_t --breakdown
    python tools/analysis/benchmark.py --sweep --repeat 1
    python tools/analysis/benchmark.py --backbone mila_t --peak-sizes 256 512

Efficiency is ``FLOPs / time / R``, where R (the yardstick) is the best
fp32 rate this machine reaches on a large square product through the
libraries PyTorch ships, measured in the same run (before and after the
model, the better of the two): ``torch.mm`` (MKL's sgemm on CPU), oneDNN's
matmul and oneDNN's 1x1 convolution, at 2048^2 and 4096^2. The fastest
library differs between machines (on one AMD EPYC oneDNN ran twice as fast
as MKL), so only the best is a bound the model cannot beat. The efficiency
is also printed, in brackets, against ``torch.mm`` at the first size (``mm
2048``), the yardstick of the earlier figures. ``--peak-sizes N [N ...]``
sets the sizes (default 2048 4096; measuring those takes ~20 s on two
cores, twice per run): small ones are quick but understate the peak, so
they are for checking that the tool runs, not for figures. FLOPs are
2 x the multiply-adds of the FLOP tool (the backbone's, or with a detector
config the whole detector's forward), x3 for ``--mode train``.
``--breakdown`` profiles one step and splits its time by class of operation
(mila_det.analysis.breakdown).
"""
import argparse
import os
import statistics
import sys
import threading
import time
import warnings
from typing import Callable, Dict

import torch

# MMEngine imports pkg_resources, which setuptools deprecates loudly: silence
# exactly that notice, before MMEngine or MMDetection is imported.
warnings.filterwarnings('ignore', category=UserWarning,
                        message=r'pkg_resources is deprecated as an API')

BACKBONES = {
    'mila_t': dict(type='MILA', arch='tiny'),
    'mila_s': dict(type='MILA', arch='small'),
    'mila_b': dict(type='MILA', arch='base'),
    'vmamba_t': dict(type='VMamba', arch='tiny'),
    'vmamba_s': dict(type='VMamba', arch='small'),
    'vmamba_b': dict(type='VMamba', arch='base'),
    # MMDetection's Swin-T (window attention), as a reference
    'swin_t': dict(type='SwinTransformer', embed_dims=96,
                   depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                   window_size=7, out_indices=(0, 1, 2, 3)),
}
SWEEP_SIDES = [224, 448, 640, 896, 1024, 1280, 1536, 2048]
SWEEP_MODELS = ['mila_t', 'vmamba_t', 'swin_t']
# Sides of the square products whose best rate is the yardstick
# (--peak-sizes)
PEAK_SIZES = (2048, 4096)


class PeakMemory:
    """Peak resident memory (CPU) or allocator peak (CUDA) while the block
    runs, in MiB.

    On Linux the kernel's own high-water mark is reset on entry and read on
    exit (``/proc/self/clear_refs``, ``VmHWM``): exact, and nothing runs
    beside the timed code. Where that is not allowed, a thread samples the
    RSS every 5 ms instead (it costs the timed code ~2% on two cores).
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0.0
        self._thread = None

    @staticmethod
    def _rss() -> float:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20

    CLEAR_REFS = '/proc/self/clear_refs'

    @classmethod
    def _reset_high_water_mark(cls) -> bool:
        """Reset the kernel's peak to the current RSS; False where that is
        not allowed or has no effect (kernels before 4.0 ignore it)."""
        try:
            with open(cls.CLEAR_REFS, 'w') as f:
                f.write('5')
            return cls._high_water_mark() <= cls._rss() + 16
        except (OSError, RuntimeError):
            return False

    @staticmethod
    def _high_water_mark() -> float:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
        raise RuntimeError('no VmHWM in /proc/self/status')

    def __enter__(self) -> 'PeakMemory':
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if self._reset_high_water_mark():
            return self
        self._stop = threading.Event()
        self.peak = self._rss()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss())
                time.sleep(0.005)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == 'cuda':
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is None:
            self.peak = self._high_water_mark()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], None], device: torch.device, warmup: int,
            repeat: int) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeat):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
    return dict(median=statistics.median(times), min=min(times),
                peak_mib=mem.peak)


def _gemm_candidates(size: int, device: torch.device,
                     dtype: torch.dtype) -> Dict[str, Callable[[], None]]:
    """One ``size``-square product through each library PyTorch ships for
    ``device``: MKL's (or cuBLAS's) ``mm``, and on CPU oneDNN as a matmul
    and as a 1x1 convolution."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    fns = {'mm': lambda: torch.mm(a, b)}
    if device.type == 'cpu':
        mkldnn = getattr(torch.ops, 'mkldnn', None)
        if getattr(mkldnn, '_linear_pointwise', None) is not None:
            fns['onednn-matmul'] = lambda: mkldnn._linear_pointwise(
                a, b, None, 'none', [], '')
        x = a.view(1, size, 1, size).contiguous(
            memory_format=torch.channels_last)
        w = b.view(size, size, 1, 1)
        fns['onednn-conv1x1'] = lambda: torch.conv2d(x, w)
    return fns


def gemm_rates(device: torch.device, dtype: torch.dtype = torch.float32,
               sizes=PEAK_SIZES) -> Dict[str, float]:
    """FLOP/s of square products, ``'<library> <size>'`` -> rate (each the
    best of a few runs). The best of them is the yardstick: the fastest
    rate this machine reaches on a large product through the libraries
    PyTorch ships."""
    rates = {}
    for size in sizes:
        for name, fn in _gemm_candidates(size, device, dtype).items():
            try:
                t = time_it(fn, device, 1, 3 if size <= 2048 else 2)['min']
            except RuntimeError:  # a library without this dtype
                continue
            rates[f'{name} {size}'] = 2 * size**3 / t
    return rates


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(
            f'expected a positive integer, got {text!r}')
    return value


def reference_mm(rates: Dict[str, float], sizes):
    """(name, rate) of ``torch.mm`` at the first of ``sizes`` it was
    measured at (``mm 2048`` by default), or None where it has none."""
    for size in sizes:
        name = f'mm {size}'
        if name in rates:
            return name, rates[name]
    return None


def bf16_supported(device: torch.device) -> bool:
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', None)
    return bool(check is not None and check())


def format_rates(rates: Dict[str, float]) -> str:
    return ', '.join(f'{k} {r / 1e9:.1f}' for k, r in rates.items())


def best(rates: Dict[str, float]):
    """(name, rate) of the fastest entry."""
    return max(rates.items(), key=lambda kv: kv[1])


def _models_registry():
    import mila_det  # noqa: F401  (registers MILA and VMamba)
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    return MODELS


def build_backbone(name: str, device):
    if name not in BACKBONES:
        sys.exit(f'error: unknown --backbone {name!r}; choose from '
                 f'{sorted(BACKBONES)}')
    return _models_registry().build(dict(BACKBONES[name],
                                         drop_path_rate=0.0)).to(device)


def build_model(args, device):
    if args.backbone:
        return build_backbone(args.backbone, device), False
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.model.backbone.init_cfg = None
    return _models_registry().build(cfg.model).to(device), True


def make_step(model, is_detector: bool, mode: str, shape, batch: int,
              device) -> Callable[[], None]:
    h, w = shape
    if not is_detector:
        x = torch.randn(batch, 3, h, w, device=device)
        if mode == 'infer':
            model.eval()

            def step():
                with torch.no_grad():
                    model(x)
        else:
            model.train()

            def step():
                outs = model(x)
                sum(o.float().mean() for o in outs).backward()
        return step
    from mila_det.utils.synthetic import synthetic_det_batch
    x, samples = synthetic_det_batch(batch, h, w, device)
    if mode == 'infer':
        model.eval()

        def step():
            with torch.no_grad():
                model(x, samples, mode='predict')
    else:
        model.train()

        def step():
            losses = model(x, samples, mode='loss')
            total, _ = model.parse_losses(losses)
            total.backward()
    return step


def count_macs(model, is_detector: bool, shape) -> float:
    """Multiply-adds of the backbone on one image (see get_flops.py)."""
    from mila_det.analysis import backbone_macs
    target = model.backbone if is_detector else model
    return backbone_macs(target, shape)['total']


def _sweep_point(name: str, side: int, mode: str, batch: int, threads: int,
                 device: str, warmup: int, repeat: int) -> tuple:
    """Time one backbone at one sweep size. It runs in a fresh process: the
    kept heap never shrinks, so the process' peak RSS is this model's at
    this size, with no memory (or fragments) left by another."""
    from mila_det.utils.malloc import keep_freed_memory
    keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device)
    model = build_backbone(name, device)
    step = make_step(model, False, mode, (side, side), batch, device)
    r = time_it(step, device, warmup, repeat)
    print(f'  {name:9s} {side:5d}^2  {r["median"] * 1e3:9.1f} ms  '
          f'peak {r["peak_mib"]:7.0f} MiB', flush=True)
    return name, side, r['median'], r['peak_mib']


def sweep(args, device) -> None:
    """Time and peak memory of the reference backbones from 224^2 to 2048^2;
    a CSV, a log-log PNG, and each model's growth from 1024^2 to 2048^2."""
    import csv
    import multiprocessing
    ctx = multiprocessing.get_context('spawn')
    rows = []
    for name in SWEEP_MODELS:
        for side in sorted(args.sweep_sides):
            with ctx.Pool(1) as pool:
                rows.append(pool.apply(
                    _sweep_point,
                    (name, side, args.mode, args.batch,
                     torch.get_num_threads(), str(device), args.warmup,
                     args.repeat)))
    out = args.sweep_out
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with open(out + '.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['model', 'side', 'seconds', 'peak_mib'])
        writer.writerows(rows)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for name in SWEEP_MODELS:
        mine = [r for r in rows if r[0] == name]
        pixels = [r[1]**2 / 1e6 for r in mine]
        ax_t.plot(pixels, [r[2] for r in mine], marker='o', label=name)
        ax_m.plot(pixels, [r[3] for r in mine], marker='o', label=name)
    for ax, label in ((ax_t, 'seconds'), (ax_m, 'peak memory (MiB)')):
        ax.set(xscale='log', yscale='log', xlabel='megapixels', ylabel=label)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend()
    fig.suptitle(f'backbone {args.mode}, batch {args.batch}, {device}, '
                 f'{torch.get_num_threads()} threads')
    fig.tight_layout()
    fig.savefig(out + '.png', dpi=100)
    print(f'  wrote {out}.csv and {out}.png')
    sides = sorted(args.sweep_sides)
    lo, hi = (1024, 2048) if {1024, 2048} <= set(sides) else sides[-2:]
    for name in SWEEP_MODELS:
        t = {r[1]: r[2] for r in rows if r[0] == name}
        print(f'  {name}: {lo}^2 -> {hi}^2 time grows {t[hi] / t[lo]:.2f}x '
              f'({(hi / lo)**2:.0f}x the pixels)')


def main() -> None:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', nargs='?', help='a detector config')
    parser.add_argument('--backbone', help=f'one of {sorted(BACKBONES)}')
    parser.add_argument('--shape', nargs=2, type=int, default=[800, 1280],
                        metavar=('H', 'W'))
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--mode', choices=['infer', 'train'], default='infer')
    parser.add_argument('--repeat', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available()
                        else 'cpu')
    parser.add_argument('--compare-naive', action='store_true',
                        help='also time the plain reference operators '
                        '(MILA_DET_BACKEND=naive) in the same run')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, e.g. '
                        'model.backbone.with_cp=True')
    parser.add_argument('--breakdown', action='store_true',
                        help='profile one step and print time and achieved '
                        'rate per class of operation')
    parser.add_argument('--sweep', action='store_true',
                        help=f'time {SWEEP_MODELS} at {SWEEP_SIDES} (square)')
    parser.add_argument('--sweep-out', default='work_dirs/benchmark/sweep')
    parser.add_argument('--sweep-sides', nargs='+', type=int,
                        default=SWEEP_SIDES, help='square sizes to sweep')
    parser.add_argument('--peak-sizes', nargs='+', type=positive_int,
                        default=list(PEAK_SIZES), metavar='N',
                        help='sides of the square fp32 GEMMs whose best rate '
                        'is the yardstick (default: 2048 4096); the '
                        'efficiency is also printed against mm at the '
                        'first one. Small sizes run fast but understate the '
                        'peak: for testing the tool, not for figures')
    args = parser.parse_args()
    args.peak_sizes = list(dict.fromkeys(args.peak_sizes))  # no repeats
    from mila_det.utils.malloc import keep_freed_memory
    malloc = ('glibc heap kept (MILA_DET_MALLOC=default to compare)'
              if keep_freed_memory() else 'default malloc')
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.sweep:
        if len(set(args.sweep_sides)) < 2:
            sys.exit('error: --sweep-sides needs at least two sizes')
        rates = gemm_rates(device, sizes=args.peak_sizes)
        print(f'sweep: {args.mode}, batch {args.batch}, {device}, '
              f'{torch.get_num_threads()} threads, {malloc}; fp32 GEMM '
              f'rates: {format_rates(rates)} GFLOP/s')
        sweep(args, device)
        return
    if bool(args.config) == bool(args.backbone):
        sys.exit('error: give either a CONFIG or --backbone NAME')
    model, is_detector = build_model(args, device)
    name = args.backbone or os.path.basename(args.config)
    rates = gemm_rates(device, sizes=args.peak_sizes)
    print(f'{name}: {args.mode}, batch {args.batch}, '
          f'{args.shape[0]}x{args.shape[1]}, {device}, '
          f'{torch.get_num_threads()} threads, {malloc}', flush=True)
    backends = ['auto'] + (['naive'] if args.compare_naive else [])
    results = {}
    from mila_det.ops import use_backend
    for backend in backends:
        step = make_step(model, is_detector, args.mode, args.shape,
                         args.batch, device)
        repeat = args.repeat if backend == 'auto' else max(1, args.repeat // 3)
        with use_backend(backend):
            results[backend] = time_it(step, device, args.warmup, repeat)
    breakdown = None
    if args.breakdown:
        from mila_det.analysis.breakdown import op_class_breakdown
        step = make_step(model, is_detector, args.mode, args.shape,
                         args.batch, device)
        breakdown = op_class_breakdown(step)
    # Counted after the timed runs: the FLOP tool traces the model and holds
    # every activation at once, and with the heap kept that memory would
    # stay resident and count in the peaks above.
    macs = count_macs(model, is_detector, args.shape)
    label = 'backbone' if is_detector else 'model'
    print(f'  {label} multiply-adds per image: {macs / 1e9:.2f} G')
    work = 2 * macs * args.batch  # FLOPs per step
    if is_detector:
        from mila_det.analysis import detector_macs
        det = detector_macs(model, args.shape)
        print(f'  detector multiply-adds per image (forward): '
              f'{det / 1e9:.2f} G')
        work = 2 * det * args.batch
    if args.mode == 'train':
        work *= 3  # forward + backward, counted as three forwards
    # A busy moment can only slow the reference products down, so the rates
    # are the better of two measurements, before and after the model runs.
    rates = {k: max(r, rates.get(k, 0.0))
             for k, r in gemm_rates(device, sizes=args.peak_sizes).items()}
    yard, peak = best(rates)
    print(f'  fp32 GEMM rates (GFLOP/s, best of before and after the model '
          f'runs): {format_rates(rates)}')
    print(f'  yardstick: the best of them, {yard} = {peak / 1e9:.1f} '
          'GFLOP/s')
    if bf16_supported(device):
        bf = gemm_rates(device, torch.bfloat16, args.peak_sizes)
        print(f'  bf16 GEMM rates: {format_rates(bf)}; best '
              f'{best(bf)[0]} = {best(bf)[1] / 1e9:.1f} GFLOP/s')
    else:
        print(f'  bf16: no fast bf16 GEMM on this {device.type} (oneDNN '
              'reports no bf16 support), so none is measured')
    mm = reference_mm(rates, args.peak_sizes)
    for backend, r in results.items():
        line = (f'  [{backend:5s}] median {r["median"] * 1e3:9.1f} ms  '
                f'{args.batch / r["median"]:6.2f} img/s  peak '
                f'{r["peak_mib"]:8.0f} MiB')
        if work:
            achieved = work / r['median']
            line += (f'  efficiency {achieved / peak * 100:.1f}% of the best '
                     f'GEMM ({yard})')
            if mm:
                line += f' [{achieved / mm[1] * 100:.1f}% of {mm[0]}]'
            if args.mode == 'train':
                line += ' (training counted as 3 forwards)'
        print(line, flush=True)
    if 'naive' in results:
        speedup = results['naive']['median'] / results['auto']['median']
        print(f'  fast path speed-up over the naive reference: '
              f'{speedup:.1f}x')
    if breakdown is not None:
        from mila_det.analysis.breakdown import format_breakdown
        print('  breakdown of one profiled step (self time per class; rate '
              'against the yardstick):')
        print('\n'.join(format_breakdown(breakdown, peak)))


if __name__ == '__main__':
    main()
