"""tools/gpu_check.py and tools/gpu_wheels.sh, as far as a CPU machine can
run them: the operator checks in the Triton interpreter, the refusal without
CUDA, a failing check's exit status, and an offline install from the wheel
folder into a fresh environment that has only torch and triton."""
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, needs_triton
from tests.helpers import load_tool

TOOL = REPO_ROOT / 'tools' / 'gpu_check.py'



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
    tool = load_tool(TOOL)
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


def test_help_describes_the_detector_step():
    proc = subprocess.run([sys.executable, str(TOOL), '--help'],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for words in ('Mask R-CNN training step', 'mask_rcnn_mila_t_1x.py',
                  'mask_rcnn_vmamba_t_1x.py', '800x1216', 'fp16 AMP',
                  '--require-detector', '--no-detector'):
        assert words in proc.stdout, words


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is present')
def test_probe_finds_no_cuda_ops_in_a_cpu_build_of_mmcv():
    """This machine's mmcv is compiled with its ops, but for CPU only."""
    ok, why = load_tool(TOOL).probe_mmcv_cuda_ops()
    assert not ok
    assert 'without CUDA' in why


def test_without_cuda_ops_the_report_says_the_detector_cannot_train(
        tmp_path, monkeypatch):
    tool = load_tool(TOOL)

    def must_not_run(*args, **kwargs):
        raise AssertionError('detector_step ran without CUDA ops')

    monkeypatch.setattr(tool, 'detector_step', must_not_run)
    report = tool.Report()
    tool.check_detector(report, 'cpu', probe=lambda: (
        False, 'mmcv 2.1.0 was compiled without CUDA (faked)'))
    assert report.checks == [] and report.timings == []
    report.write(str(tmp_path))
    md = (tmp_path / 'report.md').read_text()
    assert 'NOT RUN: the detector cannot train on this machine' in md
    assert 'compiled without CUDA (faked)' in md
    assert 'make env' in md and 'MMCV_WITH_OPS=1' in md and \
        'FORCE_CUDA=1' in md
    saved = json.loads((tmp_path / 'report.json').read_text())['detector']
    assert saved['ran'] is False and 'faked' in saved['reason']


def test_require_detector_turns_the_missing_ops_into_a_failure(
        tmp_path, monkeypatch):
    """main() with every GPU part replaced: only the exit status logic and
    the final report are under test here."""
    tool = load_tool(TOOL)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda d: 'fake GPU')
    monkeypatch.setattr(tool, 'ensure_stack', lambda wheels: None)
    for part in ('check_operators', 'check_backbones', 'time_all'):
        monkeypatch.setattr(tool, part, lambda *a, **k: None)
    monkeypatch.setattr(tool, 'probe_mmcv_cuda_ops',
                        lambda device: (False, 'no ops (faked)'))
    assert tool.main([str(tmp_path)]) == 0
    assert 'NOT RUN' in (tmp_path / 'report.md').read_text()
    assert tool.main([str(tmp_path), '--require-detector']) == 1
    assert tool.main([str(tmp_path), '--no-detector',
                      '--require-detector']) == 0


# The configs shrunk for CPU (the GPU check runs them whole): tiny
# backbones of the same types, heads 32 channels wide, few proposals and
# sampled RoIs (at full width and 512 RoIs per image a CPU training step
# takes ~20 s here, the mask head and AdamW most of it).
NARROW = {'model.neck.out_channels': 32,
          'model.rpn_head.in_channels': 32,
          'model.rpn_head.feat_channels': 32,
          'model.roi_head.bbox_roi_extractor.out_channels': 32,
          'model.roi_head.bbox_head.in_channels': 32,
          'model.roi_head.bbox_head.fc_out_channels': 64,
          'model.roi_head.mask_roi_extractor.out_channels': 32,
          'model.roi_head.mask_head.in_channels': 32,
          'model.roi_head.mask_head.conv_out_channels': 32,
          'model.train_cfg.rpn_proposal.max_per_img': 64,
          'model.train_cfg.rcnn.sampler.num': 32,
          'model.test_cfg.rpn.max_per_img': 64}
SMALL = {
    'MILA-T': {**NARROW, 'model.backbone.arch': dict(
        _delete_=True, embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
        'model.neck.in_channels': [16, 32, 64, 128]},
    'VMamba-T': {**NARROW, 'model.backbone.arch': dict(
        _delete_=True, dims=16, depths=(1, 1, 1, 1), ssm_ratio=1.0, d_state=1),
        'model.neck.in_channels': [16, 32, 64, 128]}}


def test_detector_steps_run_on_cpu_at_a_small_size():
    """The detector part as on the GPU, on CPU at 64x96 with the two
    configs (shrunk): train.py's --amp set-up (bf16 autocast without CUDA),
    finite losses and detections, one timing per step."""
    tool = load_tool(TOOL)
    report = tool.Report()
    tool.check_detector(report, 'cpu', probe=lambda: (True, 'ops (faked)'),
                        size=(64, 96), warmup=0, repeat=1,
                        cfg_options=SMALL)
    assert [c['name'].split(' (')[0] for c in report.checks] == [
        'Mask R-CNN MILA-T', 'Mask R-CNN VMamba-T']
    assert all(c['ok'] for c in report.checks), report.checks
    assert [t['what'] for t in report.timings] == [
        f'Mask R-CNN {n} {s}' for n in ('MILA-T', 'VMamba-T')
        for s in ('training step (CPUAutocastOptimWrapper)',
                  'inference step')]
    assert all(t['ms'] > 0 and t['shape'] == '2x3x64x96'
               for t in report.timings)
    assert report.detector['ran']


def test_detector_step_uses_train_py_amp_and_gives_finite_losses():
    result = load_tool(TOOL).detector_step('configs/mask_rcnn_mila_t_1x.py',
                                       'cpu', 64, 96, batch=1, warmup=0,
                                       cfg_options=SMALL['MILA-T'])
    assert result['optim_wrapper'] == 'CPUAutocastOptimWrapper'
    assert {'loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'} <= \
        set(result['losses'])
    assert all(math.isfinite(v) for v in result['losses'].values())
    assert result['train_peak_mib'] is None and result['shape'] == \
        '1x3x64x96'
