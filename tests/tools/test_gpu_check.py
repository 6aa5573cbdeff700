"""tools/gpu_check.py and tools/gpu_wheels.sh, as far as a CPU machine can
run them: the operator checks in the Triton interpreter, the refusal without
CUDA, a failing check's exit status, and an offline install from the wheel
folder into a fresh environment that has only torch and triton."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, needs_triton

TOOL = REPO_ROOT / 'tools' / 'gpu_check.py'


def load_tool():
    spec = importlib.util.spec_from_file_location('gpu_check', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is present')
def test_without_cuda_it_says_so_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert 'no CUDA device' in proc.stderr and '--interpret' in proc.stderr
    assert 'Traceback' not in proc.stderr + proc.stdout


@needs_triton()
def test_interpreter_run_writes_a_passing_report(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), str(tmp_path),
                           '--interpret'], capture_output=True, text=True,
                          timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / 'report.json').read_text())
    names = {c['name'].split()[0] for c in report['checks']}
    assert names == {'linear_attention', 'selective_scan', 'cross_scan',
                     'cross_merge', 'cross_selective_scan', 'forget_gate'}
    assert report['ok'] and all(c['ok'] for c in report['checks'])
    assert 'PASS' in (tmp_path / 'report.md').read_text()


@needs_triton()
def test_a_failing_check_fails_the_run(tmp_path, monkeypatch):
    """With a tolerance no kernel can meet, every check fails and the exit
    status is 1 (the report still written)."""
    tool = load_tool()
    monkeypatch.setitem(tool.TOLERANCES, 'float32', -1.0)
    assert tool.main([str(tmp_path), '--interpret']) == 1
    report = json.loads((tmp_path / 'report.json').read_text())
    assert report['checks'] and not any(c['ok'] for c in report['checks'])
    assert 'FAIL' in (tmp_path / 'report.md').read_text()


def _torch_and_triton_only(dest: Path) -> Path:
    """A folder of links to torch, triton and torch's own dependencies, for
    a fresh environment to see (nothing of the OpenMMLab stack)."""
    site = Path(sysconfig.get_paths()['purelib'])
    dest.mkdir()
    keep = ('torch', 'torchgen', 'functorch', 'triton', 'sympy', 'mpmath',
            'networkx', 'jinja2', 'markupsafe', 'fsspec', 'filelock',
            'typing_extensions.py')
    for entry in site.iterdir():
        stem = entry.name.split('-')[0].lower()
        if entry.name in keep or (entry.name.endswith('.dist-info')
                                  and stem in keep + ('typing_extensions', )):
            (dest / entry.name).symlink_to(entry)
    return dest


@pytest.mark.skipif(shutil.which('bash') is None, reason='needs bash')
def test_wheel_folder_installs_offline_next_to_torch_and_triton(tmp_path):
    wheels = tmp_path / 'wheels'
    run = dict(capture_output=True, text=True, timeout=900)
    proc = subprocess.run(['bash', str(REPO_ROOT / 'tools' / 'gpu_wheels.sh'),
                           str(wheels)], **run)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (wheels / 'mmcv-2.1.0-py3-none-any.whl').is_file()
    venv = tmp_path / 'venv'
    subprocess.run([getattr(sys, '_base_executable', sys.executable), '-m',
                    'venv', str(venv)], check=True, **run)
    py = venv / 'bin' / 'python'
    base = _torch_and_triton_only(tmp_path / 'torch_only')
    site = subprocess.run([str(py), '-c', 'import sysconfig; print('
                           'sysconfig.get_paths()["purelib"])'],
                          check=True, **run).stdout.strip()
    Path(site, 'torch_only.pth').write_text(str(base) + '\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('PIP_', 'PYTHONPATH'))}
    proc = subprocess.run([str(py), '-m', 'pip', 'install', '--no-index',
                           '--find-links', str(wheels), 'mila_det',
                           'setuptools<81'],
                          env=env, **run)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    check = '''
import importlib.util, torch, mila_det, mmcv
from mila_det.models.backbones import MILA, VMamba
assert importlib.util.find_spec('mmcv._ext') is None  # no compiled ops
assert mila_det.__file__.startswith(%r) is False
x = torch.randn(1, 3, 32, 48)
for m in (MILA(arch=dict(embed_dims=16, depths=(1, 1, 1, 1),
                         num_heads=(1, 2, 2, 4))),
          VMamba(arch=dict(dims=16, depths=(1, 1, 1, 1), ssm_ratio=1.0,
                           d_state=1))):
    assert len(m.eval()(x)) == 4
print('ok', mmcv.__version__)
''' % str(REPO_ROOT)
    proc = subprocess.run([str(py), '-c', check], env=env, cwd=tmp_path,
                          **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == 'ok 2.1.0'
