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


def test_benchmark_sweep_writes_csv_plot_and_growth(tmp_path):
    out = tmp_path / 'sweep'
    proc = run(osp.join(REPO_ROOT, 'tools/analysis/benchmark.py'), '--sweep',
               '--sweep-sides', '64', '32', '--repeat', '1', '--sweep-out',
               str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = (tmp_path / 'sweep.csv').read_text().splitlines()
    assert rows[0] == 'model,side,seconds,peak_mib' and len(rows) == 1 + 3 * 2
    assert (tmp_path / 'sweep.png').stat().st_size > 0
    for name in ('mila_t', 'vmamba_t', 'swin_t'):
        assert re.search(name + r': 32\^2 -> 64\^2 time grows [0-9.]+x '
                         r'\(4x the pixels\)', proc.stdout)


def test_benchmark_prints_latency_and_efficiency(tmp_path):
    proc = run(osp.join(REPO_ROOT, 'tools/analysis/benchmark.py'),
               '--backbone', 'mila_t', '--shape', '64', '96', '--repeat', '2',
               '--compare-naive', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert re.search(r'rate on a 2048\^2 product: mm [0-9.]+, onednn [0-9.]+ '
                     'GFLOP/s', out)
    assert re.search(r'\[auto \] median +[0-9.]+ ms .* efficiency '
                     r'[0-9.]+% of mm, [0-9.]+% of onednn', out)
    assert '[naive]' in out and 'speed-up over the naive reference' in out
