"""What the Triton kernels cost on a GPU, measured without one.

    python tools/analysis/kernel_report.py [--bandwidth 3350] [--arch 80 90]
        [--csv work_dirs/kernel_report.csv]

Every Triton kernel of mila_det is compiled, in each variant the package
launches, each once (dtypes fp32 / bf16 / fp16; head widths 32 / 64 / 128
for the linear attention; for the selective scan every combination of
compile-time flags its callers pass: VMamba's and the forget gate's; each
``ops/<op>/triton.py`` declares its own, see
``mila_det/ops/_report.py``), for each GPU
architecture with Triton's own compiler (no GPU needed), and Triton's
bundled ``cuobjdump`` reads the registers and the local memory (where
spills go: stack + local bytes per thread) from the cubin; Triton's metadata
gives the shared memory per block. For the launches of MILA-T and VMamba-T at 1x3x800x1280 (stage 1,
batch 1 and 2) it prints the programs per launch (one H100 has 132 SMs; a
launch of fewer programs leaves SMs idle), the bytes each launch reads and
writes, and the time those bytes take at ``--bandwidth`` GB/s: an estimate
of the memory-bound time, not a measurement. docs/kernels.md explains the
columns and the current figures.
"""
import argparse
import csv
import importlib
import os
import re
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import List

os.environ.pop('TRITON_INTERPRET', None)  # compile for real (no launch)
warnings.filterwarnings('ignore', message='TRITON_DEFAULT_FP_FUSION')

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mila_det.ops._report import KernelLaunch, KernelVariant  # noqa: E402

# Every operator folder with Triton kernels; each triton.py declares its
# variants and launches (mila_det/ops/_report.py).
OPS = ('cross_scan', 'selective_scan', 'linear_attention', 'forget_gate')
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # per block, opt-in max
MIN_PROGRAMS = 264  # two per SM of a 132-SM GPU


def _modules():
    for op in OPS:
        try:
            yield importlib.import_module(f'mila_det.ops.{op}.triton')
        except ModuleNotFoundError as e:
            if e.name != f'mila_det.ops.{op}.triton':
                raise


def variants() -> List[KernelVariant]:
    """Every compiled form of every kernel the backbones launch."""
    return [v for m in _modules() for v in m.report_variants()]


def launches() -> List[KernelLaunch]:
    """Every launch at the stage-1 shapes of the backbones at 800x1280,
    batch 1 and 2, fp32 (bytes scale with the input dtype's size for
    bf16/fp16)."""
    return [x for m in _modules() for x in m.report_launches()]


def _cuobjdump() -> str:
    """Triton's bundled cuobjdump."""
    from triton.backends.nvidia import compiler
    return os.path.join(os.path.dirname(compiler.__file__), 'bin',
                        'cuobjdump')


def compile_variant(v: KernelVariant, arch: int) -> dict:
    """Registers and local (spill) bytes per thread, from the compiled
    cubin's resource usage, and shared memory per block."""
    src = ASTSource(fn=v.fn, signature=v.signature, constexprs=v.constexprs)
    kernel = triton.compile(src, target=GPUTarget('cuda', arch, 32),
                            options=dict(num_warps=v.num_warps,
                                         num_stages=v.num_stages))
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(kernel.asm['cubin'])
        f.flush()
        proc = subprocess.run([_cuobjdump(), '--dump-resource-usage', f.name],
                              capture_output=True, text=True)
    usage = re.search(r'REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)',
                      proc.stdout)
    if usage is None:
        raise RuntimeError(f'cuobjdump gave no resource usage for '
                           f'{v.kernel}: {proc.stderr[-300:]}')
    return dict(registers=int(usage.group(1)),
                spill_bytes=int(usage.group(2)) + int(usage.group(3)),
                shared=int(kernel.metadata.shared))


def _compile_one(job) -> dict:
    """Worker: compile variant ``index`` for ``arch`` (variants are rebuilt
    in the worker; kernels do not pickle)."""
    index, arch = job
    v = variants()[index]
    r = compile_variant(v, arch)
    ok = r['spill_bytes'] == 0 and r['shared'] <= SHARED_LIMIT[arch]
    return dict(kernel=v.kernel, variant=v.detail, arch=arch, **r, ok=ok)


def compile_all(archs=(80, 90), jobs: int = 0) -> List[dict]:
    """Compile every variant for every architecture, ``jobs`` at a time
    (default: one per CPU core). Rows in variant order."""
    work = [(i, arch) for i in range(len(variants())) for arch in archs]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile_one(w) for w in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_one, work))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--bandwidth', type=float, default=3350.0,
                        help='GB/s for the time estimate (H100 SXM: 3350)')
    parser.add_argument('--arch', type=int, nargs='+', default=[80, 90])
    parser.add_argument('--csv', help='also write the variant table here')
    parser.add_argument('--jobs', type=int, default=0,
                        help='parallel compiles (default: one per core)')
    args = parser.parse_args(argv)
    print(f'{"kernel":34s} {"variant":18s} {"sm":>3s} {"regs":>5s} '
          f'{"local B":>8s} {"smem KB":>8s}  within limits')
    rows = compile_all(args.arch, args.jobs)
    for r in rows:
        print(f'{r["kernel"]:34s} {r["variant"]:18s} {r["arch"]:3d} '
              f'{r["registers"]:5d} {r["spill_bytes"]:8d} '
              f'{r["shared"] / 1024:8.1f}  {"yes" if r["ok"] else "NO"}')
    print(f'\nlaunches at 1x3x800x1280, stage 1 (time at {args.bandwidth:.0f}'
          ' GB/s is an estimate of the memory-bound time, not a '
          'measurement):')
    print(f'{"model":12s} {"kernel":34s} {"programs":>9s} {"MB moved":>9s} '
          f'{"est. us":>8s}  >= {MIN_PROGRAMS} programs')
    for launch in launches():
        us = launch.bytes / (args.bandwidth * 1e9) * 1e6
        print(f'{launch.model:12s} {launch.kernel:34s} '
              f'{launch.programs:9d} {launch.bytes / 1e6:9.1f} {us:8.1f}  '
              f'{"yes" if launch.programs >= MIN_PROGRAMS else "NO"}')
    if args.csv:
        os.makedirs(os.path.dirname(args.csv) or '.', exist_ok=True)
        with open(args.csv, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == '__main__':
    sys.exit(main())
