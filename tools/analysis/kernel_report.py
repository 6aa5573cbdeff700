"""What the Triton kernels cost on a GPU, measured without one.

    python tools/analysis/kernel_report.py [--bandwidth 3350] [--arch 80 90]
        [--csv work_dirs/kernel_report.csv]

Every Triton kernel of mila_det is compiled, in each variant the backbones
launch (dtypes fp32 / bf16 / fp16; head widths 32 / 64 / 128 for the linear
attention; d_state 1 / 4 / 16 for the selective scan), for each GPU
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
import os
import re
import subprocess
import sys
import tempfile
import warnings
from typing import Dict, List, NamedTuple

os.environ.pop('TRITON_INTERPRET', None)  # compile for real (no launch)
warnings.filterwarnings('ignore', message='TRITON_DEFAULT_FP_FUSION')

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mila_det.ops.cross_scan import triton as cs  # noqa: E402
from mila_det.ops.linear_attention import triton as la  # noqa: E402
from mila_det.ops.selective_scan import triton as ss  # noqa: E402

DTYPES = {'fp32': 4, 'bf16': 2, 'fp16': 2}
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # per block, opt-in max


class Variant(NamedTuple):
    kernel: str
    detail: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int


class Launch(NamedTuple):
    model: str
    kernel: str
    detail: str  # matches a Variant's detail
    programs: int
    bytes: int


def _signature(fn, types: Dict[str, str], constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        sig[name] = 'constexpr' if name in constexprs else types.get(
            name, 'i32')
    return sig


def variants() -> List[Variant]:
    out = []
    for dt in DTYPES:
        t = f'*{dt}'
        for name, fn in (('cross_scan_fwd_kernel', cs.cross_scan_fwd_kernel),
                         ('cross_scan_bwd_kernel', cs.cross_scan_bwd_kernel)):
            const = dict(BLOCK_H=32, BLOCK_W=32)
            types = {a: t for a in fn.arg_names[:2]}
            out.append(Variant(name, dt, fn, _signature(fn, types, const),
                               const, 4))
        for n_state in (1, 4, 16):
            block_d, block_n, _ = ss._blocks(96, n_state)
            for name, fn, extra in (
                    ('selective_scan_fwd_kernel', ss.selective_scan_fwd_kernel,
                     dict(SAVE_STATES=True)),
                    ('selective_scan_bwd_kernel', ss.selective_scan_bwd_kernel,
                     {})):
                const = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True,
                             BLOCK_D=block_d, BLOCK_N=block_n, **extra)
                types = {a: '*fp32' for a in fn.arg_names
                         if a not in ('DCH', 'L', 'DG', 'N')
                         and a not in const}
                types.update(u=t, delta=t, B=t, C=t)
                out.append(Variant(name, f'{dt} N{n_state}', fn,
                                   _signature(fn, types, const), const, 4))
        for head in (32, 64, 128):
            block_t, block_p, block_d, use_dot = la._config(head)
            for name, fn in (
                    ('linear_attention_fwd_kernel',
                     la.linear_attention_fwd_kernel),
                    ('linear_attention_bwd_kernel',
                     la.linear_attention_bwd_kernel)):
                const = dict(BLOCK_T=block_t, BLOCK_P=block_p,
                             BLOCK_D=block_d, USE_DOT=use_dot)
                types = {a: '*fp32' for a in fn.arg_names
                         if a not in ('N', 'C', 'HEADS', 'D', 'eps')
                         and a not in const}
                types.update({a: t for a in ('q', 'k', 'v', 'o', 'do', 'dq',
                                             'dk', 'dv') if a in fn.arg_names})
                types['eps'] = 'fp32'
                out.append(Variant(name, f'{dt} d{head}', fn,
                                   _signature(fn, types, const), const, 4))
    return out


def _cuobjdump() -> str:
    """Triton's bundled cuobjdump."""
    from triton.backends.nvidia import compiler
    return os.path.join(os.path.dirname(compiler.__file__), 'bin',
                        'cuobjdump')


def compile_variant(v: Variant, arch: int) -> dict:
    """Registers and local (spill) bytes per thread, from the compiled
    cubin's resource usage, and shared memory per block."""
    src = ASTSource(fn=v.fn, signature=v.signature, constexprs=v.constexprs)
    kernel = triton.compile(src, target=GPUTarget('cuda', arch, 32),
                            options=dict(num_warps=v.num_warps))
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


def launches() -> List[Launch]:
    """Stage-1 launches of MILA-T and VMamba-T at 800x1280, batch 1 and 2,
    fp32 (bytes scale with the input dtype's size for bf16/fp16)."""
    out = []
    h, w = 200, 320
    length = h * w
    for batch in (1, 2):
        # MILA-T stage 1: C = 64, 2 heads of 32
        c, heads = 64, 2
        progs = batch * heads
        io = batch * length * c * 4
        out.append(Launch(f'MILA-T b{batch}', 'linear_attention_fwd_kernel',
                          'fp32 d32', progs, 4 * io + 2 * length * c * 4))
        out.append(Launch(f'MILA-T b{batch}', 'linear_attention_bwd_kernel',
                          'fp32 d32', progs, 10 * io + 2 * length * c * 4))
        # VMamba-T stage 1: Di = 96 channels, 4 routes, d_state 1
        inner, routes, n_state = 96, 4, 1
        _, _, n_blk = ss._blocks(inner, n_state)
        grid = triton.cdiv(h, 32) * triton.cdiv(w, 32) * inner * batch
        seq = batch * routes * inner * length * 4
        bc = batch * routes * n_state * length * 4
        states = seq * n_state
        out.append(Launch(f'VMamba-T b{batch}', 'cross_scan_fwd_kernel',
                          'fp32', grid, seq // 4 + seq))
        out.append(Launch(f'VMamba-T b{batch}', 'cross_scan_bwd_kernel',
                          'fp32', grid, seq + seq // 4))
        out.append(Launch(f'VMamba-T b{batch}', 'selective_scan_fwd_kernel',
                          'fp32 N1', n_blk * routes * batch,
                          3 * seq + 2 * bc + states))
        out.append(Launch(f'VMamba-T b{batch}', 'selective_scan_bwd_kernel',
                          'fp32 N1', n_blk * routes * batch,
                          5 * seq + 2 * bc + 2 * states + 2 * n_blk * bc))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--bandwidth', type=float, default=3350.0,
                        help='GB/s for the time estimate (H100 SXM: 3350)')
    parser.add_argument('--arch', type=int, nargs='+', default=[80, 90])
    parser.add_argument('--csv', help='also write the variant table here')
    args = parser.parse_args(argv)
    rows = []
    print(f'{"kernel":30s} {"variant":10s} {"sm":>3s} {"regs":>5s} '
          f'{"local B":>8s} {"smem KB":>8s}  within limits')
    for v in variants():
        for arch in args.arch:
            r = compile_variant(v, arch)
            ok = r['spill_bytes'] == 0 and r['shared'] <= SHARED_LIMIT[arch]
            rows.append(dict(kernel=v.kernel, variant=v.detail, arch=arch,
                             **r, ok=ok))
            print(f'{v.kernel:30s} {v.detail:10s} {arch:3d} '
                  f'{r["registers"]:5d} {r["spill_bytes"]:8d} '
                  f'{r["shared"] / 1024:8.1f}  {"yes" if ok else "NO"}',
                  flush=True)
    print(f'\nlaunches at 1x3x800x1280, stage 1 (time at {args.bandwidth:.0f}'
          ' GB/s is an estimate of the memory-bound time, not a '
          'measurement):')
    print(f'{"model":12s} {"kernel":30s} {"programs":>9s} {"MB moved":>9s} '
          f'{"est. us":>8s}  >= 264 programs')
    for launch in launches():
        us = launch.bytes / (args.bandwidth * 1e9) * 1e6
        print(f'{launch.model:12s} {launch.kernel:30s} '
              f'{launch.programs:9d} {launch.bytes / 1e6:9.1f} {us:8.1f}  '
              f'{"yes" if launch.programs >= 264 else "NO"}')
    if args.csv:
        os.makedirs(os.path.dirname(args.csv) or '.', exist_ok=True)
        with open(args.csv, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == '__main__':
    sys.exit(main())
