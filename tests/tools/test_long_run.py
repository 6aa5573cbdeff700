"""A long run survives what it meets: divergence, unreadable images, full
disks and half-written checkpoints (mila_det/hooks.py, mila_det/datasets/
robust.py, mila_det/utils/{atomic_io,resume}.py, tools/check_dataset.py,
tools/fault_soak.py)."""
import errno
import glob
import json
import logging
import os
import os.path as osp
import re
import subprocess
import sys
from collections import deque

import pytest
import torch
from mmengine.fileio.backends import LocalBackend
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper
from mmengine.structures import BaseDataElement

from mila_det.datasets import (BadSampleError, SkipBadSamples,
                               make_shapes_coco, replacement_index)
from mila_det.hooks import (BadSampleLimitError, CheckpointWriteError,
                            DivergenceError, DivergenceGuardHook,
                            SafeCheckpointHook, SkippedSamplesHook,
                            save_checkpoint_atomically, stopping_together)
from mila_det.utils.atomic_io import AtomicWriteError, atomic_write
from mila_det.utils.checkpoint import weights_only_load
from mila_det.utils.resume import (ResumeError, find_resume_checkpoint,
                                   unreadable_reason)
from tests.conftest import REPO_ROOT
from tests.helpers import narrow_heads, tiny_detector_cfg

TOOLS = osp.join(REPO_ROOT, 'tools')


class FakeRunner:
    """What the hooks read of a runner: iteration, epoch, work dir, logger,
    message hub, model and optim wrapper; ``save_checkpoint`` writes a
    small torch file (``fail_after`` bytes then ENOSPC, when set)."""

    def __init__(self, work_dir, model=None, optim_wrapper=None,
                 dataset_size=1000):
        self.work_dir = str(work_dir)
        self.iter = 0
        self.epoch = 0
        self.model = model or torch.nn.Linear(3, 2)
        self.optim_wrapper = optim_wrapper or OptimWrapper(
            torch.optim.SGD(self.model.parameters(), lr=0.1))
        self.message_hub = MessageHub.get_instance(f'hub-{id(self)}')
        self.logger = logging.getLogger(f'fake-runner-{id(self)}')
        self.fail_after = None
        self.train_dataloader = type(
            'Loader', (), {'dataset': list(range(dataset_size))})()

    def save_checkpoint(self, out_dir, filename, **kwargs):
        path = osp.join(out_dir, filename)
        state = {'meta': {'iter': self.iter + 1},
                 'state_dict': self.model.state_dict()}
        with open(path, 'wb') as f:
            if self.fail_after is None:
                torch.save(state, f)
                return
            f.write(b'x' * self.fail_after)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def save_good(path, value=1.0):
    torch.save({'meta': {'iter': 1},
                'state_dict': {'w': torch.full((4, ), value)}}, path)


# ------------------------------------------------------------------ atomic


def test_atomic_write_failure_leaves_old_file_and_no_temporary(
        tmp_path, monkeypatch):
    path = str(tmp_path / 'last_checkpoint')
    atomic_write(path, 'old')

    def no_space(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', no_space)
    with pytest.raises(AtomicWriteError) as info:
        atomic_write(path, 'new contents')
    message = str(info.value)
    assert str(tmp_path) in message and 'no space left' in message
    assert 'free space there: ' in message and 'needed: 12 B' in message
    assert open(path).read() == 'old'
    assert os.listdir(tmp_path) == ['last_checkpoint']


def test_checkpoint_write_on_a_full_disk_stops_naming_the_good_one(
        tmp_path):
    runner = FakeRunner(tmp_path)
    save_checkpoint_atomically(runner, runner.work_dir, 'iter_2.pth')
    assert unreadable_reason(str(tmp_path / 'iter_2.pth')) is None
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_2.pth'))
    runner.iter, runner.fail_after = 3, 100
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint_atomically(runner, runner.work_dir, 'iter_4.pth')
    message = str(info.value)
    assert 'no space left on device' in message
    assert f'newest good checkpoint: {tmp_path / "iter_2.pth"}' in message
    assert re.search(r'needed: \d+(\.\d)? [kM]?B', message), message
    assert sorted(os.listdir(tmp_path)) == ['iter_2.pth', 'last_checkpoint']


def _checkpoint_hook(runner, max_keep):
    hook = SafeCheckpointHook(interval=1, max_keep_ckpts=max_keep,
                              by_epoch=False)
    hook.out_dir = runner.work_dir
    hook.file_backend = LocalBackend()
    hook.filename_tmpl = 'iter_{}.pth'
    hook.keep_ckpt_ids = deque([], max_keep)
    return hook


def test_old_checkpoints_removed_only_after_the_new_one_is_complete(
        tmp_path):
    runner = FakeRunner(tmp_path)
    hook = _checkpoint_hook(runner, max_keep=2)
    for step in (1, 2, 3):
        hook._save_checkpoint_with_step(runner, step, {})
    assert sorted(os.listdir(tmp_path)) == [
        'iter_2.pth', 'iter_3.pth', 'last_checkpoint']
    assert (tmp_path / 'last_checkpoint').read_text() == str(
        tmp_path / 'iter_3.pth')
    runner.fail_after = 10
    with pytest.raises(CheckpointWriteError):
        hook._save_checkpoint_with_step(runner, 4, {})
    # MMEngine's hook deletes iter_2 before writing iter_4; ours keeps it
    assert sorted(os.listdir(tmp_path)) == [
        'iter_2.pth', 'iter_3.pth', 'last_checkpoint']
    assert (tmp_path / 'last_checkpoint').read_text() == str(
        tmp_path / 'iter_3.pth')


# -------------------------------------------------------------- divergence


def _guarded(tmp_path, max_consecutive=3):
    model = torch.nn.Linear(2, 1)
    runner = FakeRunner(tmp_path, model, OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1)))
    hook = DivergenceGuardHook(max_consecutive=max_consecutive)
    hook.before_train(runner)
    return runner, hook


def _step(runner, hook, scale):
    """One training iteration whose loss is ``scale`` times a finite one."""
    model = runner.model
    loss = model(torch.ones(1, 2)).sum() * scale
    runner.optim_wrapper.update_params(loss)
    hook.after_train_iter(runner, runner.iter,
                          outputs={'loss_cls': loss.detach(),
                                   'loss_bbox': torch.tensor(0.5)})
    runner.iter += 1


def test_divergence_guard_skips_non_finite_steps_then_stops(tmp_path):
    runner, hook = _guarded(tmp_path, max_consecutive=3)
    save_good(str(tmp_path / 'iter_1.pth'))
    before = runner.model.weight.detach().clone()
    _step(runner, hook, 1.0)  # a finite step is taken
    assert not torch.equal(runner.model.weight, before)
    taken = runner.model.weight.detach().clone()
    _step(runner, hook, float('nan'))
    _step(runner, hook, float('inf'))
    assert torch.equal(runner.model.weight, taken)  # both skipped
    assert runner.model.weight.grad is None or not bool(
        runner.model.weight.grad.any())
    _step(runner, hook, 1.0)  # a good step ends the streak
    assert not torch.equal(runner.model.weight, taken)
    _step(runner, hook, float('nan'))
    _step(runner, hook, float('nan'))
    with pytest.raises(DivergenceError) as info:
        _step(runner, hook, float('nan'))
    message = str(info.value)
    assert 'from iteration 5 to 7' in message
    assert 'loss_cls' in message and 'loss_bbox' not in message
    assert f'newest good checkpoint: {tmp_path / "iter_1.pth"}' in message
    hook.after_train(runner)
    assert 'step' not in vars(runner.optim_wrapper)


def test_divergence_guard_counts_steps_not_iterations_when_accumulating(
        tmp_path):
    """With gradient accumulation only every 2nd iteration steps: the
    iterations in between must not end the streak of skipped steps."""
    model = torch.nn.Linear(2, 1)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1),
                           accumulative_counts=2)
    wrapper.initialize_count_status(model, 0, 100)
    runner = FakeRunner(tmp_path, model, wrapper)
    hook = DivergenceGuardHook(max_consecutive=3)
    hook.before_train(runner)
    with pytest.raises(DivergenceError):
        for _ in range(6):  # 3 steps, all non-finite
            _step(runner, hook, float('nan'))
    assert runner.iter == 5  # raised at the 6th iteration, the 3rd step


def test_divergence_guard_skips_a_step_with_infinite_gradients(tmp_path):
    runner, hook = _guarded(tmp_path)
    runner.model.weight.register_hook(lambda g: g * float('inf'))
    before = runner.model.weight.detach().clone()
    _step(runner, hook, 1.0)  # finite loss, infinite gradient norm
    assert torch.equal(runner.model.weight, before)
    assert hook.streak == 1


def test_no_checkpoint_from_non_finite_weights(tmp_path):
    runner, hook = _guarded(tmp_path)
    good = {'meta': {'iter': 3}, 'state_dict': {'w': torch.ones(2)}}
    hook.before_save_checkpoint(runner, good)  # finite: allowed
    bad = {'meta': {'iter': 4},
           'state_dict': {'w': torch.ones(2),
                          'bn.running_var': torch.tensor([1., float('nan')])}}
    save = _checkpoint_hook(runner, max_keep=1)
    runner.save_checkpoint = lambda out_dir, name, **kw: \
        hook.before_save_checkpoint(runner, bad)
    with pytest.raises(DivergenceError, match='bn.running_var'):
        save._save_checkpoint_with_step(runner, 4, {})
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ resume


def test_resume_passes_over_a_truncated_newest_checkpoint(tmp_path):
    older, newest = str(tmp_path / 'iter_2.pth'), str(tmp_path / 'iter_4.pth')
    save_good(older)
    save_good(newest)
    os.utime(older, (1, 1))
    with open(newest, 'r+b') as f:
        f.truncate(os.path.getsize(newest) // 2)
    (tmp_path / 'last_checkpoint').write_text(newest)
    (tmp_path / '.iter_6.pth.tmp').write_bytes(b'partial')
    warnings = []
    path, skipped = find_resume_checkpoint(str(tmp_path), warnings.append)
    assert path == older
    assert [p for p, _ in skipped] == [newest]
    assert any(newest in w and 'not a complete checkpoint' in w
               for w in warnings), warnings
    assert not osp.exists(tmp_path / '.iter_6.pth.tmp')
    # a checkpoint with NaN weights is not a resume point either
    save_good(newest, float('nan'))
    assert 'NaN/inf' in unreadable_reason(newest)
    os.remove(older)
    with pytest.raises(ResumeError, match='iter_4.pth'):
        find_resume_checkpoint(str(tmp_path), warnings.append)
    assert find_resume_checkpoint(str(tmp_path / 'none'), print) == (None, [])


def test_resume_finds_checkpoints_in_the_checkpoint_hooks_out_dir(tmp_path):
    """With ``default_hooks.checkpoint.out_dir`` the checkpoints live in
    another folder, which the work dir's ``last_checkpoint`` points into:
    --resume takes them from there (the newest readable one)."""
    work_dir, out_dir = tmp_path / 'work', tmp_path / 'out' / 'work'
    work_dir.mkdir()
    out_dir.mkdir(parents=True)
    older, newest = str(out_dir / 'epoch_1.pth'), str(out_dir / 'epoch_2.pth')
    save_good(older)
    save_good(newest, float('nan'))
    (work_dir / 'last_checkpoint').write_text(newest)
    warnings = []
    path, skipped = find_resume_checkpoint(str(work_dir), warnings.append)
    assert path == older and [p for p, _ in skipped] == [newest]


# ------------------------------------------------------------- bad samples


class Samples:
    """A dataset whose sample ``i`` is ``i``; ``bad`` indices raise, and
    ``shapes`` gives an index a decoded size other than its annotation's
    32x32."""

    def __init__(self, size, bad=(), shapes=None):
        self.size, self.bad, self.shapes = size, set(bad), shapes or {}
        self.metainfo = dict(classes=('a', ))

    def __len__(self):
        return self.size

    def get_data_info(self, index):
        return dict(img_path=f'img/{index:03d}.png', height=32, width=32)

    def __getitem__(self, index):
        if index in self.bad:
            raise AssertionError(f'failed to load image: img/{index:03d}.png')
        sample = BaseDataElement(
            metainfo=dict(ori_shape=self.shapes.get(index, (32, 32))))
        return dict(inputs=index, data_samples=sample)


def test_skip_bad_samples_replaces_and_notes_unreadable_images():
    data = SkipBadSamples(Samples(50, bad={7}, shapes={9: (31, 32)}))
    assert len(data) == 50 and data.metainfo == dict(classes=('a', ))
    good = data[3]
    assert good['inputs'] == 3 and 'skipped_samples' not in \
        good['data_samples'].metainfo
    first = data[7]
    assert first['inputs'] == replacement_index(7, 0, 50) != 7
    assert data[7]['inputs'] == first['inputs']  # deterministic
    assert first['data_samples'].skipped_samples == [
        ('img/007.png', 'AssertionError: failed to load image: img/007.png')]
    mismatch = data[9]['data_samples'].skipped_samples
    assert mismatch[0][0] == 'img/009.png' and 'annotated 32x32' in \
        mismatch[0][1]
    with pytest.raises(BadSampleError, match='index 0 after 2'):
        SkipBadSamples(Samples(3, bad={0, 1, 2}), max_retries=2)[0]


def _batch(*paths):
    """A batch whose samples note ``paths`` as skipped."""
    samples = [BaseDataElement(metainfo=dict(skipped_samples=[
        (p, 'cannot decode')])) for p in paths]
    return dict(inputs=[], data_samples=samples + [BaseDataElement()])


def test_skipped_samples_hook_warns_once_lists_and_stops(tmp_path, caplog):
    runner = FakeRunner(tmp_path, dataset_size=1000)  # limit: 1 file
    hook = SkippedSamplesHook()
    assert hook.limit(1000) == 1 and hook.limit(10) == 1
    assert SkippedSamplesHook(max_fraction=0.01).limit(1000) == 10

    runner.logger.propagate = True
    with caplog.at_level(logging.WARNING, logger=runner.logger.name):
        for _ in range(2):  # two epochs, the same bad file each
            hook.before_train_epoch(runner)
            hook.after_train_iter(runner, 0, _batch('a.png'))
            hook.after_train_iter(runner, 1, _batch())
            hook.after_train_epoch(runner)
            runner.epoch += 1
    text = caplog.text
    assert text.count('skipped training image a.png: cannot decode') == 1
    assert 'epoch 1: 1 training image(s) skipped' in text
    assert 'epoch 2: 1 training image(s) skipped' in text
    with pytest.raises(BadSampleLimitError, match='b.png: cannot decode'):
        hook.after_train_iter(runner, 0, _batch('b.png'))


# ------------------------------------------------------------ two ranks


def _two_rank_worker(rank, store, out_dir):
    """One rank of a 2-process gloo group: what each hook does when only
    some ranks meet the trouble. Writes ``result<rank>.json``."""
    import datetime

    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{store}',
                            rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    result = {}
    # Unreadable images: rank 0 meets a.png, rank 1 b.png then c.png; the
    # limit is 2 files, so only the three together pass it.
    runner = FakeRunner(osp.join(out_dir, f'rank{rank}'))
    hook = SkippedSamplesHook(max_files=2)
    result['samples'] = None
    for i, paths in enumerate([['a.png'], []] if rank == 0 else
                              [['b.png'], ['c.png']]):
        try:
            hook.after_train_iter(runner, i, _batch(*paths))
        except BadSampleLimitError as err:
            result['samples'] = [i, str(err)]
            break
    result['seen'] = sorted(runner.message_hub.get_info(
        'skipped_samples', {}))
    # A full disk on rank 0, which alone writes checkpoints.
    work = osp.join(out_dir, 'ckpt')
    os.makedirs(work, exist_ok=True)
    runner = FakeRunner(work)
    if rank == 0:
        runner.fail_after = 10
    else:
        runner.save_checkpoint = lambda *args, **kwargs: None
    try:
        _checkpoint_hook(runner, max_keep=2)._save_checkpoint_with_step(
            runner, 1, {})
        result['checkpoint'] = None
    except CheckpointWriteError as err:
        result['checkpoint'] = str(err)
    # Any other error inside the block, on rank 1 only.
    try:
        with stopping_together():
            if rank == 1:
                raise ValueError('a bug on rank 1')
        result['other'] = None
    except Exception as err:
        result['other'] = [type(err).__name__, str(err)]
    dist.barrier()  # every rank got here: none was left waiting
    dist.destroy_process_group()
    with open(osp.join(out_dir, f'result{rank}.json'), 'w') as f:
        json.dump(result, f)


def test_every_rank_stops_together_and_counts_every_ranks_images(tmp_path):
    context = torch.multiprocessing.spawn(
        _two_rank_worker, args=(str(tmp_path / 'store'), str(tmp_path)),
        nprocs=2, join=False)
    for _ in range(240):  # at most 2 minutes
        if context.join(timeout=0.5):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail('the two ranks did not finish within 2 minutes')
    results = [json.load(open(tmp_path / f'result{r}.json'))
               for r in (0, 1)]
    for result in results:
        # both stop at the second iteration, listing the three files
        assert result['samples'][0] == 1
        assert all(f'{p}: cannot decode' in result['samples'][1]
                   for p in ('a.png', 'b.png', 'c.png'))
        assert result['seen'] == ['a.png', 'b.png', 'c.png']
    first, second = results
    assert 'no space left on device' in first['checkpoint']
    assert second['checkpoint'].startswith(
        'stopped on every rank, as rank 0 failed: ')
    assert first['checkpoint'] in second['checkpoint']
    assert second['other'] == ['ValueError', 'a bug on rank 1']
    assert first['other'] == [
        'TrainingStopped', 'stopped on every rank, as rank 1 failed: '
        'ValueError: a bug on rank 1']


# ------------------------------------------------------------ check_dataset


def test_check_dataset_lists_exactly_the_bad_files(tmp_path):
    root = str(tmp_path / 'shapes') + '/'
    make_shapes_coco(root, num_train=6, num_val=2, size=48, seed=3)
    with open(osp.join(root, 'train', '000003.png'), 'wb') as f:
        f.write(os.urandom(500))
    ann_file = osp.join(root, 'annotations', 'instances_train.json')
    with open(ann_file) as f:
        data = json.load(f)
    moved = data['annotations'][-1]
    moved['bbox'] = [30.0, 30.0, 40.0, 10.0]  # past the 48x48 border
    with open(ann_file, 'w') as f:
        json.dump(data, f)
    image = next(i for i in data['images'] if i['id'] == moved['image_id'])
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(
        f'train_dataloader = dict(dataset=dict(type="CocoDataset", '
        f'data_root={root!r}, ann_file="annotations/instances_train.json",'
        f' data_prefix=dict(img="train/")))\n'
        f'val_dataloader = dict(dataset=dict(type="CocoDataset", '
        f'data_root={root!r}, ann_file="annotations/instances_val.json", '
        f'data_prefix=dict(img="val/")))\n')
    proc = subprocess.run(
        [sys.executable, osp.join(TOOLS, 'check_dataset.py'), str(cfg)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    bad = re.findall(r'^BAD (\S+): (.*)$', proc.stdout, re.M)
    assert sorted(p for p, _ in bad) == sorted([
        osp.join(root, 'train', '000003.png'),
        osp.join(root, 'train', image['file_name'])]), proc.stdout
    reasons = dict(bad)
    assert 'cannot be decoded' in reasons[osp.join(root, 'train',
                                                   '000003.png')]
    assert 'lies outside the 48x48 image' in reasons[
        osp.join(root, 'train', image['file_name'])]
    assert 'checked 8 images in 2 annotation files' in proc.stdout
    assert '8/8 images' in proc.stderr or '6/6 images' in proc.stderr


# ------------------------------------------------------- end to end (demo)


@pytest.fixture(scope='module')
def demo_cfg(tmp_path_factory):
    """The demo config shrunk to seconds a run (tests/helpers.py: a MILA
    16 channels wide, FPN and heads 16 wide, 64-pixel images, 6 MB
    checkpoints) on 6 training images (2 epochs of 3 batches of 2) and 2
    validation images; training image 000003.png replaced by random
    bytes. Every iteration is checkpointed and logged, and every detection
    kept (a few iterations leave all scores below the usual 0.05, and an
    empty result has no metrics)."""
    tmp = tmp_path_factory.mktemp('demo')
    root = str(tmp / 'shapes') + '/'
    make_shapes_coco(root, num_train=6, num_val=2, size=64, seed=1)
    assert osp.isfile(osp.join(root, 'train', '000003.png'))
    with open(osp.join(root, 'train', '000003.png'), 'wb') as f:
        f.write(os.urandom(800))
    cfg = narrow_heads(tiny_detector_cfg(
        'demo/mask_rcnn_mila_demo.py', root, '', image_size=64,
        max_epochs=2), width=16)
    cfg.train_cfg.val_interval = 2
    cfg.default_hooks.iter_checkpoint.interval = 1
    cfg.model.test_cfg.rcnn.score_thr = 0.0
    path = str(tmp / 'demo_tiny.py')
    cfg.dump(path)
    return path, root


# One thread: on a shared 2-core machine OpenMP's spinning threads cost
# these small runs three times the CPU time. Both runs of a comparison get
# the same setting.
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')


def test_fault_soak_demo_ends_bit_identical(tmp_path, demo_cfg):
    """Five faults at iterations drawn from the seed (kill, kill inside a
    checkpoint write, kill, full disk, kill + truncated newest checkpoint)
    with a resume after each: the same final weights and COCO metrics as
    an uninterrupted run. The corrupt training image is skipped, warned
    about once and listed at the end of each epoch."""
    config, root = demo_cfg
    proc = subprocess.run(
        [sys.executable, osp.join(TOOLS, 'fault_soak.py'), config,
         '--work-dir', str(tmp_path), '--seed', '0'],
        capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
        env=ONE_THREAD)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    faults = re.findall(r'^fault \d+: (\S+) at iteration (\d+)',
                        proc.stdout, re.M)
    assert [kind for kind, _ in faults] == [
        'kill', 'kill-in-write', 'kill', 'full-disk', 'truncate'], out
    iterations = [int(n) for _, n in faults]
    assert iterations == sorted(set(iterations)), proc.stdout
    assert re.search(r'full-disk at iteration \d+ \(\S+\): exit 1, no '
                     r'partial file: True, message names /', proc.stdout)
    assert re.search(r'truncated iter_\d+\.pth: killed: True', proc.stdout)
    assert 'final run: warning: cannot resume from' in proc.stdout
    assert 'final weights equal bit for bit: True' in proc.stdout
    assert 'COCO metrics equal: True' in proc.stdout
    assert 'soak passed' in proc.stdout
    log = open(glob.glob(str(tmp_path / 'straight' / '*' / '*.log'))[0]
               ).read()
    bad = osp.join(root, 'train', '000003.png')
    assert log.count(f'skipped training image {bad}') == 1
    for epoch in (1, 2):
        assert re.search(rf'epoch {epoch}: 1 training image\(s\) skipped '
                         rf'.*\n.*{re.escape(bad)}', log), epoch


# Runs tools/train.py once per argument list (argv[1], JSON) in children
# forked after importing once (tools/fault_soak.py's runner); prints their
# exit codes and outputs as JSON.
FORKED_TRAIN = """
import json, sys
sys.path.insert(0, sys.argv[1])
import fault_soak
fault_soak.preload()
print(json.dumps([fault_soak.run(args) for args in json.loads(sys.argv[2])]))
"""


def test_divergent_demo_stops_keeps_finite_checkpoints_and_resumes(
        tmp_path, demo_cfg):
    """With lr=1000 the run stops within a few iterations of the first
    non-finite loss, saying so and naming the newest good checkpoint;
    every checkpoint on disk has finite weights; ``--resume`` continues
    from the named one. (The guard's rules one by one: the tests above.)"""
    config, _ = demo_cfg
    work = str(tmp_path / 'work')
    options = ['--cfg-options', 'optim_wrapper.optimizer.lr=1000.0',
               'default_hooks.divergence_guard.max_consecutive=3']
    proc = subprocess.run(
        [sys.executable, '-c', FORKED_TRAIN, TOOLS, json.dumps([
            [config, '--work-dir', work, *options],
            [config, '--work-dir', work, '--resume', *options]])],
        capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
        env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (rc, out), (resumed_rc, resumed) = json.loads(
        proc.stdout.strip().splitlines()[-1])
    assert rc == 1, out[-4000:]
    message = out.strip().splitlines()[-1]
    assert message.startswith('error: training diverged'), out[-4000:]
    stop = int(re.search(r'to (\d+) \(non-finite: [^)]*loss', message)[1])
    first = int(re.search(r'iteration (\d+): non-finite', out)[1])
    assert stop - first == 2, out[-4000:]  # 3 in a row
    newest = re.search(r'newest good checkpoint: (\S+)\.', message)[1]
    # the checkpoint of the iteration before the stop (iter_N.pth or, at
    # an epoch's end, epoch_M.pth, written after it)
    assert osp.dirname(newest) == work, message
    assert weights_only_load(newest)['meta']['iter'] == stop - 1, message
    train_lines = re.findall(r'Epoch\(train\)', out)
    assert len(train_lines) == stop - 1  # the last one was not logged
    for path in glob.glob(osp.join(work, '*.pth')):
        assert unreadable_reason(path) is None, path
    # --resume: from the named checkpoint, its next iteration first; with
    # the checkpoint's lr (1000) it stops again, 3 iterations on
    assert f'Load checkpoint from {newest}\n' in resumed, resumed[-4000:]
    assert not re.search(r'^warning: ', resumed, re.M), resumed[-4000:]
    assert f'resumed epoch: {(stop - 1) // 3}, iter: {stop - 1}\n' in resumed
    first_resumed = re.search(r'iteration (\d+): non-finite', resumed)
    assert first_resumed and int(first_resumed[1]) == stop, resumed[-4000:]
    assert resumed_rc == 1, resumed[-4000:]
    assert resumed.strip().splitlines()[-1].startswith(
        f'error: training diverged: 3 optimizer steps in a row had a '
        f'non-finite loss or gradient norm, from iteration {stop} to '
        f'{stop + 2}'), resumed[-4000:]
    for path in glob.glob(osp.join(work, '*.pth')):
        assert unreadable_reason(path) is None, path
