"""The analysis command lines run and print what they promise."""
import os.path as osp
import re
import subprocess
import sys

from tests.conftest import REPO_ROOT


def run(*args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, timeout=600,
                          capture_output=True, text=True)


def test_get_flops_backbone_only(tmp_path):
    proc = run(osp.join(REPO_ROOT, 'tools/analysis/get_flops.py'),
               osp.join(REPO_ROOT, 'configs/mask_rcnn_vmamba_t_1x.py'),
               '--backbone-only', '--shape', '224', '224', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'params: 29.48 M' in proc.stdout
    assert 'FLOPs:  4.91 G' in proc.stdout  # VMamba's README: 4.9G
    assert 'SelectiveScan' in proc.stdout  # the scan appears in the breakdown


def test_benchmark_prints_latency_and_efficiency(tmp_path):
    proc = run(osp.join(REPO_ROOT, 'tools/analysis/benchmark.py'),
               '--backbone', 'mila_t', '--shape', '64', '96', '--repeat', '2',
               '--compare-naive', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert re.search(r'matmul rate \(2048\^2\): [0-9.]+ GFLOP/s', out)
    assert re.search(r'\[auto \] median +[0-9.]+ ms .* efficiency +[0-9.]+%',
                     out)
    assert '[naive]' in out and 'speed-up over the naive reference' in out
