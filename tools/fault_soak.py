"""Fault-injection soak: train a config while killing it, cutting a
checkpoint write short and filling the disk, resume after each fault, and
check the result equals an uninterrupted run's bit for bit.

    python tools/fault_soak.py CONFIG --work-dir DIR [--seed 0]
        [--faults kill kill-in-write kill full-disk truncate]
        [--cfg-options k=v ...]

It first trains CONFIG uninterrupted (``DIR/straight``), then trains it
again in ``DIR/faulted`` as a chain of ``tools/train.py --resume`` runs,
each with one fault injected at an iteration drawn (from ``--seed``) after
the previous fault's:

* ``kill``: SIGKILL right after a training iteration;
* ``kill-in-write``: SIGKILL halfway through writing a checkpoint's bytes;
* ``full-disk``: ``ENOSPC`` halfway through a checkpoint write; the run
  must stop by itself, leave no partial file and name the newest good
  checkpoint;
* ``truncate``: SIGKILL after an iteration, then the newest checkpoint is
  cut to half its size (what a non-atomic writer leaves); ``--resume`` must
  warn and take the one before.

A last ``--resume`` run finishes training. The soak passes when the final
checkpoints' weights are equal bit for bit and so are the COCO metrics
logged by the two final validations. It prints every fault and the
outcome, and exits 1 on any difference.

The faults are injected by this script around ``tools/train.py`` (in a
forked copy of itself, or with ``--no-fork`` by re-running itself with
``--inject``): the injection never runs in normal training. Its runs
memoize MMEngine's formatting of the config text (about a second of CPU
per checkpoint; a pure function, so no checkpoint byte changes). On a
small shared machine ``OMP_NUM_THREADS=1`` makes demo-scale runs several
times cheaper.
"""
import argparse
import errno
import glob
import os
import os.path as osp
import random
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import List, Optional, Tuple

TOOLS = osp.dirname(osp.abspath(__file__))
TRAIN_PY = osp.join(TOOLS, 'train.py')
METRIC = re.compile(r'coco/\w+: [-0-9.]+')
FAULTS = ('kill', 'kill-in-write', 'full-disk', 'truncate')


# ----------------------------------------------------------- child side
def install_fault(spec: str) -> None:
    """Patch this process so ``spec`` (``kind:argument``) happens.

    ``kill:N`` / ``truncate:N`` SIGKILL once iteration N has finished;
    ``kill-in-write:NAME`` / ``full-disk:NAME`` act halfway through writing
    the checkpoint NAME (its temporary file)."""
    kind, arg = spec.split(':', 1)
    if kind in ('kill', 'truncate'):
        from mila_det.engine import ResumableEpochBasedTrainLoop
        run_iter = ResumableEpochBasedTrainLoop.run_iter
        target = int(arg)

        def killing_run_iter(self, idx, data_batch) -> None:
            run_iter(self, idx, data_batch)
            if self._iter == target:
                os.kill(os.getpid(), signal.SIGKILL)

        ResumableEpochBasedTrainLoop.run_iter = killing_run_iter
        return
    from mmengine.fileio.backends import LocalBackend
    put = LocalBackend.put

    def faulty_put(self, obj: bytes, filepath) -> None:
        name = osp.basename(str(filepath))
        if name.lstrip('.').startswith(arg):
            with open(filepath, 'wb') as f:
                f.write(obj[:len(obj) // 2])
                f.flush()
            if kind == 'kill-in-write':
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                          str(filepath))
        put(self, obj, filepath)

    LocalBackend.put = faulty_put


def memoize_config_formatting() -> None:
    """Format each config text with yapf once per run.

    MMEngine puts ``cfg.pretty_text`` into every checkpoint (and logs and
    dumps it at start), and formatting it costs about a second of CPU each
    time: most of a small run's time. ``FormatCode`` is a pure function of
    its arguments, so memoizing it changes no byte of any checkpoint."""
    from mmengine.config import config as config_module
    format_code = config_module.FormatCode
    memo: dict = {}

    def memoized(text: str, **kwargs):
        key = (text, repr(sorted(kwargs.items())))
        if key not in memo:
            memo[key] = format_code(text, **kwargs)
        return memo[key]

    config_module.FormatCode = memoized


def child_main(spec: str, train_args: List[str]) -> None:
    memoize_config_formatting()
    if spec != 'none':
        install_fault(spec)
    sys.argv = [TRAIN_PY, *train_args]
    runpy.run_path(TRAIN_PY, run_name='__main__')


# ----------------------------------------------------------- parent side
FORK = hasattr(os, 'fork')  # set by --no-fork


def preload() -> None:
    """Import what every training run imports, once, so forked runs
    start in a second instead of paying the imports each time."""
    import mmdet.datasets  # noqa: F401
    import mmdet.engine  # noqa: F401
    import mmdet.evaluation  # noqa: F401
    import mmdet.models  # noqa: F401
    import mmdet.visualization  # noqa: F401
    import mmengine.runner  # noqa: F401

    import mila_det  # noqa: F401


def run_forked(args: List[str], spec: str) -> Tuple[int, str]:
    """One ``tools/train.py`` run (with fault ``spec``) in a forked child
    whose stdout and stderr go to a temporary file."""
    with tempfile.TemporaryFile('w+') as log:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                child_main(spec, args)
                code = 0
            except SystemExit as done:
                if isinstance(done.code, str):
                    print(done.code, file=sys.stderr)
                code = done.code if isinstance(done.code, int) else (
                    0 if done.code is None else 1)
            except BaseException:  # noqa: BLE001  (reported, then exit 1)
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        log.seek(0)
        return os.waitstatus_to_exitcode(status), log.read()


def run(args: List[str], spec: str = 'none', timeout: float = 3600
        ) -> Tuple[int, str]:
    """``(exit code, output)`` of one training run with fault ``spec``;
    a SIGKILLed run's code is ``-9``."""
    if FORK:
        return run_forked(args, spec)
    proc = subprocess.run(
        [sys.executable, osp.abspath(__file__), '--inject', spec, '--',
         *args], capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def final_checkpoint(work_dir: str) -> str:
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def load(path: str) -> dict:
    from mila_det.utils.checkpoint import weights_only_load
    return weights_only_load(path)


def plan(faults: List[str], total_iters: int, iters_per_epoch: int,
         interval: Optional[int], seed: int) -> List[Tuple[str, str, int]]:
    """``(kind, argument, iteration)`` per fault, iterations increasing.

    Write faults hit the checkpoint saved at their iteration (an iteration
    checkpoint where ``interval`` divides it, else an epoch checkpoint)."""
    def saved_at(n: int) -> Optional[str]:
        if interval and n % interval == 0:
            return f'iter_{n}.pth'
        if n % iters_per_epoch == 0:
            return f'epoch_{n // iters_per_epoch}.pth'
        return None

    rng = random.Random(seed)
    if len(faults) >= total_iters:
        raise ValueError(f'{len(faults)} faults need more than the '
                         f'{total_iters} iterations of this schedule')
    # increasing iterations in [1, total_iters - 1], write faults on saves
    slots = list(range(1, total_iters))
    chosen: List[Tuple[str, str, int]] = []
    low = 1
    for i, kind in enumerate(faults):
        left = len(faults) - i - 1
        choices = [n for n in slots if low <= n <= total_iters - 1 - left]
        if kind in ('kill-in-write', 'full-disk'):
            choices = [n for n in choices if saved_at(n)]
        if not choices:
            raise ValueError(f'no iteration left for fault {i + 1} ({kind})')
        n = rng.choice(choices[:max(1, len(choices) // (left + 1))])
        arg = saved_at(n) if kind in ('kill-in-write', 'full-disk') \
            else str(n)
        chosen.append((kind, arg, n))
        low = n + 1
    return chosen


def truncate_newest(work_dir: str) -> str:
    from mila_det.utils.resume import newest_checkpoint
    path = newest_checkpoint(work_dir)
    if path is None:
        return '(no checkpoint yet)'
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
        f.truncate(size // 2)
    return path


def soak(config: str, work_dir: str, faults: List[str], seed: int,
         cfg_options: List[str]) -> bool:
    extra = ['--cfg-options', *cfg_options] if cfg_options else []
    start = time.time()
    straight = osp.join(work_dir, 'straight')
    rc, log = run([config, '--work-dir', straight, *extra])
    if rc != 0:
        print(log[-4000:])
        raise SystemExit(f'the uninterrupted run failed (exit {rc})')
    reference = load(final_checkpoint(straight))
    total = reference['meta']['iter']
    epochs = reference['meta']['epoch']
    from mmengine.config import Config
    from mmengine.config import DictAction  # noqa: F401
    cfg = Config.fromfile(config)
    if cfg_options:
        parser = argparse.ArgumentParser()
        parser.add_argument('--cfg-options', nargs='+', action=DictAction)
        cfg.merge_from_dict(
            parser.parse_args(['--cfg-options', *cfg_options]).cfg_options)
    iter_hook = cfg.get('default_hooks', {}).get('iter_checkpoint')
    interval = iter_hook.get('interval') if iter_hook else None
    schedule = plan(faults, total, total // epochs, interval, seed)
    straight_metrics = METRIC.findall(log)
    print(f'uninterrupted run: {total} iterations, {epochs} epochs '
          f'({time.time() - start:.0f} s)')

    faulted = osp.join(work_dir, 'faulted')
    ok = True
    resume: List[str] = []
    for number, (kind, arg, n) in enumerate(schedule, 1):
        spec = f'{kind}:{arg}'
        rc, log = run([config, '--work-dir', faulted, *resume, *extra], spec)
        line = f'fault {number}: {kind} at iteration {n}'
        if kind == 'full-disk':
            stray = glob.glob(osp.join(faulted, '.*.tmp'))
            partial = osp.isfile(osp.join(faulted, arg))
            named = re.search(r'newest good checkpoint: (\S+)', log)
            fine = rc == 1 and not stray and not partial and \
                named is not None and osp.isfile(named.group(1).rstrip('.'))
            line += (f' ({arg}): exit {rc}, no partial file: '
                     f'{not stray and not partial}, message names '
                     f'{named.group(1).rstrip(".") if named else None}')
        else:
            fine = rc == -signal.SIGKILL
            if kind == 'kill-in-write':
                line += f' ({arg}, half written)'
            if kind == 'truncate' and fine:
                line += f'; truncated {osp.basename(truncate_newest(faulted))}'
            line += f': killed: {fine}'
        print(line, flush=True)
        if not fine:
            print(log[-4000:])
            ok = False
            break
        resume = ['--resume']
    rc, log = run([config, '--work-dir', faulted, '--resume', *extra])
    if rc != 0:
        print(log[-4000:])
        print(f'the final resumed run failed (exit {rc})')
        return False
    for warning in re.findall(r'warning: cannot resume from .*', log):
        print(f'  final run: {warning}')
    result = load(final_checkpoint(faulted))
    import torch
    same_weights = reference['state_dict'].keys() == \
        result['state_dict'].keys() and all(
            torch.equal(value, result['state_dict'][key])
            for key, value in reference['state_dict'].items())
    metrics = METRIC.findall(log)
    same_metrics = bool(straight_metrics) and metrics == straight_metrics
    print(f'{len(schedule)} faults injected; final weights equal bit for '
          f'bit: {same_weights}; COCO metrics equal: {same_metrics} '
          f'({", ".join(straight_metrics[:2])} ...); '
          f'{time.time() - start:.0f} s in all')
    return ok and same_weights and same_metrics


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == '--inject':
        sep = sys.argv.index('--')
        child_main(sys.argv[2], sys.argv[sep + 1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('--work-dir', required=True)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--faults', nargs='+', choices=FAULTS,
                        default=['kill', 'kill-in-write', 'kill',
                                 'full-disk', 'truncate'])
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='as for tools/train.py, e.g. '
                        'train_cfg.max_epochs=2')
    parser.add_argument('--no-fork', action='store_true',
                        help='start every run as a new process (default: '
                        'fork them from this one after importing once)')
    args = parser.parse_args()
    global FORK
    FORK = FORK and not args.no_fork
    if FORK:
        preload()
    ok = soak(args.config, args.work_dir, args.faults, args.seed,
              args.cfg_options)
    print('soak passed' if ok else 'soak FAILED')
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
