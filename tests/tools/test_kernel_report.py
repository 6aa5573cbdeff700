"""tools/analysis/kernel_report.py: kernels compile offline for sm_80 and
sm_90 and their resources are read back; launch sizes follow the grids."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, needs_triton


def load_tool():
    spec = importlib.util.spec_from_file_location(
        'kernel_report', REPO_ROOT / 'tools' / 'analysis' / 'kernel_report.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMPILE = """
import json, sys, importlib.util
spec = importlib.util.spec_from_file_location('kernel_report', sys.argv[1])
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
variant = next(v for v in tool.variants()
               if v.kernel == 'cross_scan_fwd_kernel' and v.detail == 'fp32')
usage = tool.compile_variant(variant, int(sys.argv[2]))
print(json.dumps(dict(usage, limit=tool.SHARED_LIMIT[int(sys.argv[2])])))
"""


@needs_triton()
@pytest.mark.parametrize('arch', [80, 90])
def test_cross_scan_kernel_compiles_within_limits(arch):
    """The cross scan (a copy kernel, 32x32 tiles) compiles for both
    architectures with registers read back, no local memory and its tile in
    shared memory. In a fresh process: once Triton's interpreter is on (as
    in this suite), its kernels cannot be compiled."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    proc = subprocess.run(
        [sys.executable, '-c', COMPILE,
         str(REPO_ROOT / 'tools' / 'analysis' / 'kernel_report.py'),
         str(arch)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < usage['registers'] <= 255
    assert usage['spill_bytes'] == 0
    assert 0 < usage['shared'] <= usage['limit']


@needs_triton()
def test_every_kernel_has_variants_and_launches_follow_the_grids():
    tool = load_tool()
    kernels = {v.kernel for v in tool.variants()}
    assert kernels == {f'{op}_{d}_kernel' for op in (
        'cross_scan', 'selective_scan', 'linear_attention')
        for d in ('fwd', 'bwd')}
    launches = {(l.model, l.kernel): l for l in tool.launches()}
    # VMamba-T stage 1 at 800x1280: 96 channels of 200x320 in 32x32 tiles
    assert launches['VMamba-T b1', 'cross_scan_fwd_kernel'].programs == \
        7 * 10 * 96
    # the scan: one program per 64-channel block, route and image
    assert launches['VMamba-T b2', 'selective_scan_fwd_kernel'].programs == \
        2 * 4 * 2
    # MILA-T stage 1: one program per (image, head)
    assert launches['MILA-T b1', 'linear_attention_fwd_kernel'].programs == 2
