"""tools/analysis/kernel_report.py: every Triton kernel the backbones launch
compiles offline for sm_80 and sm_90 without spilling and within the block's
shared memory, and every stage-1 launch fills a 132-SM GPU twice over."""
import csv
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, needs_triton
from tests.helpers import load_tool

TOOL = REPO_ROOT / 'tools' / 'analysis' / 'kernel_report.py'



@pytest.fixture(scope='module')
def compiled(tmp_path_factory):
    """The report's variant table, from a fresh process: once Triton's
    interpreter is on (as in this suite) its kernels cannot be compiled."""
    out = tmp_path_factory.mktemp('kernel_report') / 'variants.csv'
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    proc = subprocess.run([sys.executable, str(TOOL), '--csv', str(out)],
                          capture_output=True, text=True, timeout=900,
                          env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return list(csv.DictReader(f)), proc.stdout


@needs_triton()
def test_every_variant_compiles_without_spills_within_shared_memory(
        compiled):
    rows, _ = compiled
    tool = load_tool(TOOL)
    expected = {(v.kernel, v.detail) for v in tool.variants()}
    for arch in (80, 90):
        got = {(r['kernel'], r['variant']) for r in rows
               if int(r['arch']) == arch}
        assert got == expected
    for r in rows:
        what = f"{r['kernel']} {r['variant']} sm_{r['arch']}"
        assert 0 < int(r['registers']) <= 255, what
        assert int(r['spill_bytes']) == 0, what
        assert int(r['shared']) <= tool.SHARED_LIMIT[int(r['arch'])], what


@needs_triton()
def test_every_kernel_family_is_reported():
    tool = load_tool(TOOL)
    kernels = {v.kernel for v in tool.variants()}
    for op in ('cross_scan', 'selective_scan', 'linear_attention'):
        assert any(k.startswith(op) and k.endswith('fwd_kernel')
                   for k in kernels), op
        assert any(k.startswith(op) and k.endswith('bwd_kernel')
                   for k in kernels), op
    launched = {(x.kernel, x.detail) for x in tool.launches()}
    declared = {(v.kernel, v.detail) for v in tool.variants()}
    assert launched <= declared  # every launch runs a compiled variant


@needs_triton()
def test_stage1_launches_fill_the_gpu_twice():
    """At batch 1, 1x3x800x1280, every stage-1 launch of MILA-T and VMamba-T
    has at least two programs per SM of a 132-SM GPU."""
    tool = load_tool(TOOL)
    models = set()
    for launch in tool.launches():
        models.add(launch.model)
        if launch.model.endswith('b1'):
            assert launch.programs >= 264, launch
    assert {'MILA-T b1', 'VMamba-T b1'} <= models


ONE_CHANNEL = """
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
cs = importlib.import_module('mila_det.ops.cross_scan.triton')
for fn in (cs.cross_scan_fwd_kernel, cs.cross_scan_bwd_kernel):
    # what a launch with C = 1 compiles, had C been specialised to 1
    sig = dict(x='*fp32', y='*fp32', C='i32', H='i32', W='i32',
               BLOCK_H='constexpr', BLOCK_W='constexpr')
    triton.compile(ASTSource(fn, sig, dict(BLOCK_H=32, BLOCK_W=32)),
                   target=GPUTarget('cuda', 90, 32))
    assert 'C' in fn.do_not_specialize, fn
print('ok')
"""


@needs_triton()
def test_cross_scan_channel_count_is_never_a_constant():
    """Triton turns an int argument equal to 1 into a constant; the cross
    scan's route offset needs C as a run-time int64, so C is marked
    do_not_specialize (and the kernels compile)."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    proc = subprocess.run([sys.executable, '-c', ONE_CHANNEL],
                          capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]



@needs_triton()
def test_every_compiled_form_is_reported_once():
    """No two variants compile the same kernel with the same signature,
    constants and warps (a label alone never makes a variant)."""
    tool = load_tool(TOOL)
    forms = [(v.kernel, tuple(sorted(v.signature.items())),
              tuple(sorted(v.constexprs.items())), v.num_warps, v.num_stages)
             for v in tool.variants()]
    assert len(forms) == len(set(forms))
    names = [(v.kernel, v.detail) for v in tool.variants()]
    assert len(names) == len(set(names))


# Runs the package's callers of the selective-scan kernels in Triton's
# interpreter, forward and backward, and prints every launch's kernel, its
# compile-time flags and its warps.
FLAGS = ('HAS_BIAS', 'SOFTPLUS', 'HAS_D', 'SCALE_INPUT', 'REVERSE')
RECORD_LAUNCHES = """
import importlib, json
import torch
FLAGS = %r
ss = importlib.import_module('mila_det.ops.selective_scan.triton')
fg = importlib.import_module('mila_det.ops.forget_gate.triton')
css = importlib.import_module('mila_det.ops.cross_selective_scan.triton')
launched = set()
for fn in {v.fn for v in ss.report_variants()}:
    def record(*args, _fn=fn, _run=fn.run, **kwargs):
        bound = dict(zip(_fn.arg_names, args), **kwargs)
        launched.add((_fn.__name__, tuple(
            (k, bool(bound[k])) for k in FLAGS if k in bound),
            kwargs['num_warps']))
        return _run(*args, **kwargs)
    fn.run = record
torch.manual_seed(0)
# longer than one segment (BLOCK_T tokens), so that every kernel launches
x = torch.randn(1, 4, 9, 15, requires_grad=True)
params = [torch.randn(4, 2 + 2 * 2, 4) * 0.5, torch.randn(4, 4, 2) * 0.5,
          torch.randn(4, 4) * 0.5, torch.rand(16, 2).add(0.5).log(),
          torch.randn(16)]
css.triton_cross_selective_scan(x, *params).sum().backward()
for scale_input in (False, True):
    q, k = (torch.rand(1, 130, 4) + 0.5 for _ in range(2))
    v = torch.randn(1, 130, 4, requires_grad=True)
    delta, A = torch.rand(1, 130, 4) * 0.5 + 0.05, -torch.rand(4, 2) - 0.1
    fg.triton_forget_gate_attention(q, k, v, delta, A, 2,
                                    scale_input=scale_input).sum().backward()
print(json.dumps(sorted(launched)))
""" % (FLAGS, )


@needs_triton()
def test_report_compiles_what_every_launch_site_passes():
    """Run the package's callers of the scan kernels (VMamba's cross
    selective scan; the forget gate, input scaled and not), forward and
    backward, in the interpreter, record the compile-time flags and warps
    of every launch, and find each among the report's variants (which the
    first test compiles without spills)."""
    env = dict(os.environ, TRITON_INTERPRET='1')
    proc = subprocess.run([sys.executable, '-c', RECORD_LAUNCHES],
                          capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    launched = {(k, tuple(map(tuple, flags)), warps) for k, flags, warps
                in json.loads(proc.stdout.splitlines()[-1])}
    assert {k for k, _, _ in launched} == {
        'selective_scan_chunk_fwd_kernel', 'selective_scan_carry_kernel',
        'selective_scan_fwd_kernel', 'selective_scan_chunk_bwd_kernel',
        'selective_scan_bwd_kernel'}
    # the forget gate's combination (no flag set) is among them
    assert any(k == 'selective_scan_bwd_kernel'
               and flags == tuple((f, False) for f in FLAGS[:4])
               for k, flags, _ in launched)
    tool = load_tool(TOOL)
    declared = {(v.kernel, tuple((k, v.constexprs[k]) for k in FLAGS
                                 if k in v.constexprs), v.num_warps)
                for v in tool.variants() if v.detail.startswith('fp32')}
    missing = launched - declared
    assert not missing, missing
