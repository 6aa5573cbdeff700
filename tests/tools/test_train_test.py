"""The entry points: pre-flight errors, a Mask R-CNN + MILA-T step and a
prediction, training that survives being killed, and tools/test.py."""
import glob
import os
import os.path as osp
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from mila_det.datasets import make_shapes_coco
from mila_det.utils.checkpoint import weights_only_load
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from tests.conftest import REPO_ROOT
from tests.helpers import narrow_heads, tiny_detector_cfg


def run_tool(*args, cwd, timeout=600, env=None):
    return subprocess.run([sys.executable, *args], cwd=cwd, timeout=timeout,
                          capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes')) + '/'
    make_shapes_coco(root, num_train=8, num_val=3, size=128, seed=1)
    return root


def test_train_without_coco_fails_at_once(tmp_path):
    """The data message, at once, and nothing else: no traceback and none
    of the pkg_resources deprecation notices MMEngine's imports raise."""
    start = time.time()
    proc = run_tool(osp.join(REPO_ROOT, 'tools/train.py'),
                    osp.join(REPO_ROOT, 'configs/mask_rcnn_mila_s_3x.py'),
                    cwd=tmp_path)
    assert proc.returncode != 0
    assert 'dataset files not found' in proc.stderr
    assert 'data/coco/annotations/instances_train2017.json' in proc.stderr
    assert 'data/coco/' in proc.stderr and 'Traceback' not in proc.stderr
    assert 'pkg_resources' not in proc.stderr
    assert proc.stderr.startswith('error: dataset files not found'), \
        proc.stderr
    assert proc.stdout == ''
    assert time.time() - start < 120


def test_train_without_pretrained_fails_at_once(tmp_path, shapes_root):
    cfg = tiny_detector_cfg('mask_rcnn_mila_t_1x.py', shapes_root,
                            str(tmp_path / 'work'))
    cfg.model.backbone.init_cfg = dict(type='Pretrained',
                                       checkpoint='data/pretrained/MLLA_T.pth')
    cfg.dump(str(tmp_path / 'cfg.py'))
    proc = run_tool(osp.join(REPO_ROOT, 'tools/train.py'),
                    str(tmp_path / 'cfg.py'), cwd=tmp_path)
    assert proc.returncode != 0
    assert 'pretrained backbone checkpoint not found' in proc.stderr
    assert 'data/pretrained/MLLA_T.pth' in proc.stderr
    assert 'model.backbone.init_cfg=None' in proc.stderr


def test_mask_rcnn_mila_t_train_step_and_prediction(shapes_root, tmp_path):
    """The real MILA-T detector: one loss step and one prediction."""
    register_all_modules()
    cfg = tiny_detector_cfg('mask_rcnn_mila_t_1x.py', shapes_root,
                            str(tmp_path), image_size=128)
    cfg.model.backbone = Config.fromfile(
        osp.join(REPO_ROOT, 'configs/mask_rcnn_mila_t_1x.py')).model.backbone
    cfg.model.backbone.init_cfg = None
    cfg.model.neck.in_channels = [64, 128, 256, 512]
    model = MODELS.build(cfg.model)
    model.init_weights()
    loader = Runner.build_dataloader(cfg.train_dataloader)
    batch = next(iter(loader))
    model.train()
    data = model.data_preprocessor(batch, True)
    losses = model(**data, mode='loss')
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total)
    for key in ('loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'):
        assert any(k.startswith(key) for k in losses), key
    total.backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.eval()
    test_batch = next(iter(Runner.build_dataloader(cfg.test_dataloader)))
    with torch.no_grad():
        preds = model.test_step(test_batch)
    inst = preds[0].pred_instances
    assert inst.bboxes.shape[1] == 4
    assert inst.masks.shape[1:] == tuple(preds[0].ori_shape)


TRAIN_PY = osp.join(REPO_ROOT, 'tools/train.py')
# Runs tools/train.py (the arguments after this script's name) with a hook
# that SIGKILLs the process once a given iteration has finished and its
# checkpoints are written: a kill at a known point, with no clean-up.
KILLING_TRAIN = """
import os, runpy, signal, sys
from mmdet.registry import HOOKS
from mmengine.hooks import Hook


@HOOKS.register_module()
class KillAfterIteration(Hook):
    priority = 'LOWEST'  # after the checkpoint hooks

    def __init__(self, iteration):
        self.iteration = iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)


sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""
# one line per iteration (logger interval 1): epoch, batch, losses
TRAIN_LINE = re.compile(
    r'Epoch\(train\)\s*\[(\d+)\]\[\s*(\d+)/\d+\].*?(loss: [^\n]*)')
METRIC = re.compile(r'coco/\w+: [-0-9.]+')


def _resume_test_cfg(shapes_root: str) -> Config:
    """2 epochs of 4 iterations (8 images, 2 a batch), validated at the end,
    iteration checkpoints every 2 iterations (iter_2 ... iter_8); narrow
    heads (8 MB checkpoints)."""
    cfg = narrow_heads(tiny_detector_cfg('mask_rcnn_mila_t_1x.py',
                                          shapes_root, '', max_epochs=2))
    cfg.train_cfg.val_interval = 2
    cfg.default_hooks.iter_checkpoint.interval = 2
    # keep every detection: 8 iterations leave all scores under the usual
    # 0.05, and an empty result set has no metrics to compare
    cfg.model.test_cfg.rcnn.score_thr = 0.0
    return cfg


def _train_lines(log: str) -> list:
    return [(int(e), int(i), losses.strip())
            for e, i, losses in TRAIN_LINE.findall(log)]


def _last_checkpoint(work_dir: str) -> str:
    """Name of the checkpoint ``--resume`` picks: the one MMEngine's
    ``last_checkpoint`` names (written once the file is complete)."""
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return osp.basename(f.read().strip())


def _iter_checkpoints(work_dir: str) -> list:
    return sorted(osp.basename(p)
                  for p in glob.glob(osp.join(work_dir, 'iter_*.pth')))


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(
        tmp_path, shapes_root):
    """A run SIGKILLed twice and resumed with ``--resume`` each time: after
    iteration 5 (the newest checkpoint is epoch_1.pth: a resume at an epoch
    boundary) and after iteration 7 (iter_6.pth: a resume inside epoch 2,
    2 of its 4 batches done). Each resumed run trains exactly the
    iterations after its checkpoint, none repeated or skipped, with the
    uninterrupted run's losses; the run ends with its weights and
    metrics."""
    cfg = _resume_test_cfg(shapes_root)
    cfg_path = str(tmp_path / 'cfg.py')
    cfg.dump(cfg_path)
    driver = str(tmp_path / 'killing_train.py')
    with open(driver, 'w') as f:
        f.write(KILLING_TRAIN)

    def killing_cfg(kill_after: int) -> str:
        cfg_kill = _resume_test_cfg(shapes_root)
        cfg_kill.custom_hooks = [
            *cfg_kill.custom_hooks,
            dict(type='KillAfterIteration', iteration=kill_after)]
        path = str(tmp_path / f'cfg_kill_{kill_after}.py')
        cfg_kill.dump(path)
        return path

    straight = str(tmp_path / 'straight')
    done = run_tool(TRAIN_PY, cfg_path, '--work-dir', straight, cwd=tmp_path)
    straight_log = done.stdout + done.stderr
    assert done.returncode == 0, straight_log[-3000:]
    straight_lines = _train_lines(straight_log)
    assert [(e, i) for e, i, _ in straight_lines] == [
        (e, i) for e in (1, 2) for i in (1, 2, 3, 4)]

    work = str(tmp_path / 'killed')
    first = run_tool(driver, TRAIN_PY, killing_cfg(5), '--work-dir', work,
                     cwd=tmp_path)
    log = first.stdout + first.stderr
    assert first.returncode == -signal.SIGKILL, log[-3000:]
    assert _train_lines(log) == straight_lines[:5]
    assert _last_checkpoint(work) == 'epoch_1.pth'

    second = run_tool(driver, TRAIN_PY, killing_cfg(7), '--work-dir', work,
                      '--resume', cwd=tmp_path)
    log = second.stdout + second.stderr
    assert second.returncode == -signal.SIGKILL, log[-3000:]
    assert 'resumed epoch: 1, iter: 4' in log, log[-4000:]
    assert _train_lines(log) == straight_lines[4:7]
    assert _last_checkpoint(work) == 'iter_6.pth'

    third = run_tool(TRAIN_PY, cfg_path, '--work-dir', work, '--resume',
                     cwd=tmp_path)
    log = third.stdout + third.stderr
    assert third.returncode == 0, log[-3000:]
    assert 'resumed epoch: 1, iter: 6' in log, log[-4000:]
    assert 'Resuming epoch 2 after its first 2 of 4 batches' in log
    assert _train_lines(log) == straight_lines[6:]

    # the same final weights, and so the same metrics
    assert _last_checkpoint(work) == 'epoch_2.pth'
    a = weights_only_load(osp.join(straight, 'epoch_2.pth'))
    b = weights_only_load(osp.join(work, 'epoch_2.pth'))
    assert (a['meta']['epoch'], a['meta']['iter']) == (2, 8)
    assert (b['meta']['epoch'], b['meta']['iter']) == (2, 8)
    assert a['state_dict'].keys() == b['state_dict'].keys()
    for key, value in a['state_dict'].items():
        assert torch.equal(value, b['state_dict'][key]), key
    metrics = METRIC.findall(straight_log)
    assert metrics and METRIC.findall(log) == metrics
    # the two newest iteration checkpoints kept, also across resumes
    assert _iter_checkpoints(straight) == ['iter_6.pth', 'iter_8.pth']
    assert _iter_checkpoints(work) == ['iter_6.pth', 'iter_8.pth']


def test_tools_test_evaluates_a_checkpoint(tmp_path, shapes_root):
    work = str(tmp_path / 'work')
    cfg = narrow_heads(
        tiny_detector_cfg('mask_rcnn_mila_t_1x.py', shapes_root, work))
    register_all_modules()
    model = MODELS.build(cfg.model)
    ckpt = str(tmp_path / 'model.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    cfg_path = str(tmp_path / 'cfg.py')
    cfg.dump(cfg_path)
    proc = run_tool(osp.join(REPO_ROOT, 'tools/test.py'), cfg_path, ckpt,
                    '--work-dir', work, '--out', str(tmp_path / 'preds.pkl'),
                    '--show-dir', 'drawn', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'coco/bbox_mAP' in proc.stdout + proc.stderr
    assert osp.isfile(tmp_path / 'preds.pkl')
    drawn = glob.glob(osp.join(work, '*', 'drawn', '*.png'))
    assert len(drawn) == 3  # every validation image, predictions drawn
