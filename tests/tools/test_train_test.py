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
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from tests.conftest import REPO_ROOT
from tests.helpers import tiny_detector_cfg


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
    start = time.time()
    proc = run_tool(osp.join(REPO_ROOT, 'tools/train.py'),
                    osp.join(REPO_ROOT, 'configs/mask_rcnn_mila_s_3x.py'),
                    cwd=tmp_path)
    assert proc.returncode != 0
    assert 'dataset files not found' in proc.stderr
    assert 'data/coco/annotations/instances_train2017.json' in proc.stderr
    assert 'data/coco/' in proc.stderr and 'Traceback' not in proc.stderr
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


def _latest_epoch(work_dir):
    """Epoch of the last checkpoint MMEngine finished writing (it names it
    in ``last_checkpoint`` once the file is complete)."""
    pointer = osp.join(work_dir, 'last_checkpoint')
    if not osp.isfile(pointer):
        return 0
    with open(pointer) as f:
        name = osp.basename(f.read().strip())
    return int(name[len('epoch_'):-len('.pth')]) if name else 0


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(
        tmp_path, shapes_root):
    cfg = tiny_detector_cfg('mask_rcnn_mila_t_1x.py', shapes_root, '',
                            max_epochs=3)
    cfg.train_cfg.val_interval = 3
    cfg_path = str(tmp_path / 'cfg.py')
    cfg.dump(cfg_path)
    train = [sys.executable, osp.join(REPO_ROOT, 'tools/train.py'), cfg_path]

    straight = str(tmp_path / 'straight')
    done = run_tool(*train[1:], '--work-dir', straight, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = str(tmp_path / 'killed')
    proc = subprocess.Popen(train + ['--work-dir', killed], cwd=tmp_path,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _latest_epoch(killed) < 1 and time.time() < deadline:
        assert proc.poll() is None, 'training ended before it was killed'
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _latest_epoch(killed)
    assert 1 <= killed_at < 3

    resumed = run_tool(*train[1:], '--work-dir', killed, '--resume',
                       cwd=tmp_path)
    log = resumed.stderr + resumed.stdout
    assert resumed.returncode == 0, log[-3000:]
    assert f'resumed epoch: {killed_at}' in log, log[-4000:]
    assert _latest_epoch(killed) == 3

    a = torch.load(osp.join(straight, 'epoch_3.pth'), weights_only=True)
    b = torch.load(osp.join(killed, 'epoch_3.pth'), weights_only=True)
    assert (a['meta']['epoch'], a['meta']['iter']) == (3, 12)
    assert (b['meta']['epoch'], b['meta']['iter']) == (3, 12)
    for key, value in a['state_dict'].items():
        assert torch.equal(value, b['state_dict'][key]), key
    # the same weights, so the same losses logged at the last iteration
    last = re.compile(r'Epoch\(train\)\s+\[3\]\[4/4\].*?(loss: [0-9.]+.*)')
    assert last.findall(done.stdout + done.stderr) == last.findall(log)
    assert last.findall(log)


def test_tools_test_evaluates_a_checkpoint(tmp_path, shapes_root):
    work = str(tmp_path / 'work')
    cfg = tiny_detector_cfg('mask_rcnn_mila_t_1x.py', shapes_root, work)
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
