"""The analysis command lines run and print what they promise."""
import mmap
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO_ROOT


def run(*args, cwd, env=None):
    return subprocess.run([sys.executable, *args], cwd=cwd, timeout=600,
                          capture_output=True, text=True, env=env)


def test_get_flops_backbone_only(tmp_path):
    proc = run(osp.join(REPO_ROOT, 'tools/analysis/get_flops.py'),
               osp.join(REPO_ROOT, 'configs/mask_rcnn_vmamba_t_1x.py'),
               '--backbone-only', '--shape', '224', '224', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'params: 29.48 M' in proc.stdout
    assert 'FLOPs:  4.91 G' in proc.stdout  # VMamba's README: 4.9G
    assert 'selective_scan_chunk' in proc.stdout  # the scan's op is counted


def test_benchmark_sweep_writes_csv_plot_and_growth(tmp_path):
    """The yardstick's six products (every library at both sizes; small
    sizes here, as in the other benchmark tests: the default 2048^2 and
    4096^2 take a minute on 2 cores and test nothing more)."""
    out = tmp_path / 'sweep'
    proc = run(osp.join(REPO_ROOT, 'tools/analysis/benchmark.py'), '--sweep',
               '--sweep-sides', '64', '32', '--repeat', '1', '--sweep-out',
               str(out), '--peak-sizes', '256', '512', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rates = re.findall(r'((?:mm|onednn-matmul|onednn-conv1x1) (?:256|512)) '
                       r'[0-9.]+', proc.stdout.split('GFLOP/s')[0])
    assert len(set(rates)) == 6, proc.stdout
    rows = (tmp_path / 'sweep.csv').read_text().splitlines()
    assert rows[0] == 'model,side,seconds,peak_mib' and len(rows) == 1 + 3 * 2
    assert (tmp_path / 'sweep.png').stat().st_size > 0
    for name in ('mila_t', 'vmamba_t', 'swin_t'):
        assert re.search(name + r': 32\^2 -> 64\^2 time grows [0-9.]+x '
                         r'\(4x the pixels\)', proc.stdout)


def test_benchmark_prints_latency_and_efficiency(tmp_path):
    # Small products for the yardstick (quick); the sweep test measures the
    # default sizes.
    proc = run(osp.join(REPO_ROOT, 'tools/analysis/benchmark.py'),
               '--backbone', 'mila_t', '--shape', '64', '96', '--repeat', '2',
               '--compare-naive', '--peak-sizes', '256', '512', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    # every library at both sizes, and the yardstick is the best of them
    rates = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'((?:mm|onednn-matmul|onednn-conv1x1) (?:256|512)) ([0-9.]+)',
        out.split('yardstick')[0])}
    assert len(rates) == 6, out
    m = re.search(r'yardstick: the best of them, (\S+ \d+) = ([0-9.]+) '
                  'GFLOP/s', out)
    # (compared by value: two rates may print alike)
    assert m and rates[m.group(1)] == max(rates.values())
    assert float(m.group(2)) == max(rates.values())
    # against the yardstick, and against mm at the first size
    assert re.search(r'\[auto \] median +[0-9.]+ ms .* efficiency '
                     r'[0-9.]+% of the best GEMM \(' + re.escape(m.group(1))
                     + r'\) \[[0-9.]+% of mm 256\]', out)
    assert '[naive]' in out and 'speed-up over the naive reference' in out


def test_benchmark_breakdown_prints_every_class(tmp_path):
    proc = run(osp.join(REPO_ROOT, 'tools/analysis/benchmark.py'),
               '--backbone', 'vmamba_t', '--shape', '64', '96', '--repeat',
               '1', '--warmup', '1', '--breakdown', '--peak-sizes', '256',
               '512', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from mila_det.analysis.breakdown import CLASSES
    for name in CLASSES:
        assert re.search(re.escape(name) + r' +[0-9.]+ +[0-9.]+%', proc.stdout)
    assert re.search(r'sum of classes +[0-9.]+ .* sum / wall = \d+%',
                     proc.stdout)


def test_breakdown_classes_and_counts():
    """A module with one of each: the multiply-adds of each class are the
    hand counts, and a mila_det operator's work lands in its own class."""
    import torch
    from torch import nn

    from mila_det.analysis.breakdown import op_class_breakdown
    from mila_det.ops import linear_attention

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(8, 16, 1)
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.dense = nn.Conv2d(16, 8, 3, stride=2, padding=1)
            self.fc = nn.Linear(8, 12)
            self.norm = nn.LayerNorm(12)

        def forward(self, x):
            y = self.dense(self.dw(self.pw(x)))  # [1, 8, 5, 6]
            t = self.norm(self.fc(y.flatten(2).transpose(1, 2)))
            return linear_attention(t, t, t, 2, (5, 6)) * 2

    model = Probe().eval()
    x = torch.randn(1, 8, 10, 12)
    with torch.no_grad():
        result = op_class_breakdown(lambda: model(x))
    gemm = 10 * 12 * 16 * 8 + 30 * 12 * 8  # the 1x1 conv and the linear
    assert result['GEMM (projections, MLP)']['macs'] == gemm
    assert result['depthwise conv']['macs'] == 10 * 12 * 16 * 9
    assert result['dense conv']['macs'] == 5 * 6 * 8 * 16 * 9
    for name in ('attention / scan', 'norms', 'element-wise'):
        assert result[name]['events'] > 0 and result[name]['seconds'] > 0


def _load_tool(name: str):
    """The module of ``tools/analysis/<name>.py``."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        f'mila_det_{name}', osp.join(REPO_ROOT, f'tools/analysis/{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_peak_sizes_checks_and_reference_mm():
    """--peak-sizes takes positive integers only, and the bracketed
    efficiency is against mm at the first size it was measured at."""
    import argparse
    bench = _load_tool('benchmark')
    assert bench.positive_int('256') == 256
    for bad in ('0', '-512', '2.5', 'x', ''):
        with pytest.raises(argparse.ArgumentTypeError,
                           match='expected a positive integer'):
            bench.positive_int(bad)
    rates = {'mm 256': 1.0, 'onednn-conv1x1 256': 3.0, 'mm 512': 2.0}
    assert bench.reference_mm(rates, [256, 512]) == ('mm 256', 1.0)
    assert bench.reference_mm(rates, [512, 256]) == ('mm 512', 2.0)
    assert bench.reference_mm({'mm 512': 2.0}, [256, 512]) == ('mm 512', 2.0)
    assert bench.reference_mm({'onednn-conv1x1 256': 3.0}, [256]) is None


@pytest.mark.parametrize('kernel_mark', [True, False])
def test_peak_memory_sees_a_transient_allocation(monkeypatch, kernel_mark):
    """The peak covers a 256 MiB buffer freed before the block ends, both by
    the kernel's high-water mark and by the sampling fallback."""
    PeakMemory = _load_tool('benchmark').PeakMemory
    if not kernel_mark:
        monkeypatch.setattr(PeakMemory, '_reset_high_water_mark',
                            staticmethod(lambda: False))
    elif not PeakMemory._reset_high_water_mark():
        pytest.skip('/proc/self/clear_refs is not writable here')
    with PeakMemory(torch.device('cpu')) as mem:
        before = PeakMemory._rss()
        buf = torch.ones(64 * 2**20)  # 256 MiB, every page touched
        time.sleep(0.05)  # the sampler's period is 5 ms
        del buf
    assert mem.peak >= before + 250


@pytest.mark.parametrize('reset', ['kernel', 'ignored'])
def test_peak_memory_forgets_earlier_peaks(monkeypatch, reset):
    """A 512 MiB peak reached (and unmapped) before the block does not count
    in it: with the kernel's reset, and where the kernel takes the reset
    request but ignores it (then the RSS is sampled instead)."""
    PeakMemory = _load_tool('benchmark').PeakMemory
    if reset == 'ignored':
        monkeypatch.setattr(PeakMemory, 'CLEAR_REFS', os.devnull)
    earlier = mmap.mmap(-1, 512 * 2**20)
    earlier.write(b'\1' * len(earlier))  # every page touched
    earlier.close()  # unmapped: returned to the system, whatever malloc does
    before = PeakMemory._rss()
    with PeakMemory(torch.device('cpu')) as mem:
        buf = torch.ones(2**20)  # 4 MiB
        del buf
    assert before <= mem.peak < before + 256


def test_benchmark_peak_leaves_out_the_flop_count(tmp_path):
    """The FLOP count's memory, kept resident by the kept heap, is not in
    the reported peak: a FLOP count that touches 2 GiB (about 2.5 GiB of
    RAM for the whole run) leaves the peak of a tiny model far below that.
    On CPU with glibc's heap kept, where the old order fails it."""
    script = tmp_path / 'run.py'
    script.write_text(f'''
import sys, torch
sys.argv = ['benchmark.py', '--backbone', 'mila_t', '--shape', '64', '64',
            '--repeat', '1', '--warmup', '1', '--device', 'cpu',
            '--peak-sizes', '256', '512']
spec_path = {osp.join(REPO_ROOT, 'tools/analysis/benchmark.py')!r}
import importlib.util
spec = importlib.util.spec_from_file_location('bench', spec_path)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

def count_macs(*args):
    buf = torch.ones(512 * 2**20)  # 2 GiB from the (kept) heap
    del buf
    return 1e9

bench.count_macs = count_macs
bench.main()
''')
    env = {k: v for k, v in os.environ.items() if k != 'MILA_DET_MALLOC'}
    proc = run(str(script), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if 'glibc heap kept' not in proc.stdout:
        pytest.skip('not glibc: freed memory goes back to the system')
    peak = float(re.search(r'peak +([0-9.]+) MiB', proc.stdout).group(1))
    assert peak < 1536, proc.stdout


def test_ab_compare_runs_each_tree_in_its_own_process(tmp_path):
    """A copy of the package as the reference: its process imports the copy
    (not the installed package), takes the new tree's weights, and computes
    the same outputs; every run reports its ratio."""
    shutil.copytree(osp.join(REPO_ROOT, 'mila_det'),
                    tmp_path / 'ref' / 'mila_det',
                    ignore=shutil.ignore_patterns('__pycache__'))
    proc = run(osp.join(REPO_ROOT, 'tools/analysis/ab_compare.py'),
               str(tmp_path / 'ref'), '--backbone', 'mila_t', '--shape', '32',
               '48', '--runs', '2', '--pairs', '2', '--warmup', '0',
               '--threads', '1', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    ref_package = osp.join(str(tmp_path / 'ref'), 'mila_det')
    assert f'ref: {tmp_path / "ref"} ({ref_package}), heap' in out, out
    assert f'({osp.join(str(REPO_ROOT), "mila_det")})' in out, out
    assert 'max |new - ref| = 0 of the largest output' in out, out
    assert len(re.findall(r'run \d: new median [0-9.]+ ms, ref [0-9.]+ ms, '
                          r'new/ref per pair [0-9.]+', out)) == 2, out
    assert re.search(r'median over runs [0-9.]+ \(90% interval [0-9.]+-'
                     r'[0-9.]+\); new slower in \d of 2 runs', out), out


def test_ab_compare_unpacks_a_revision_and_names_a_bad_one(tmp_path):
    ab = _load_tool('ab_compare')
    if not osp.isdir(osp.join(REPO_ROOT, '.git')):
        pytest.skip('not a git checkout')
    root = ab.ref_tree('HEAD', str(tmp_path / 'head'))
    assert osp.isfile(osp.join(root, 'mila_det', '__init__.py'))
    assert not osp.exists(osp.join(root, 'tests'))  # the package only
    with pytest.raises(SystemExit, match='neither a directory nor a revision'):
        ab.ref_tree('no-such-revision', str(tmp_path / 'bad'))
    with pytest.raises(SystemExit, match='holds no mila_det/ package'):
        ab.ref_tree(str(tmp_path), str(tmp_path / 'unused'))
