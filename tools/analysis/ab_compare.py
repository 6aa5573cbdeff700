"""Is this tree faster or slower than another? Alternating A/B of a backbone.

    python tools/analysis/ab_compare.py d04f164 --backbone mila_t
    python tools/analysis/ab_compare.py ../other_checkout --backbone vmamba_t \\
        --runs 12 --mode train --shape 512 512

Each tree runs in its own process (its own imports and registrations): the
one given (a git revision of this repository, or a directory holding a
``mila_det/`` package) and this checkout (``--new`` picks another). Both
build the backbone with the same weights (the new tree builds them under
seed 0 and hands them over; the key sets must match), and the first run
prints how far their outputs on one input differ.

Two kinds of noise are larger than the differences worth finding, and the
design cancels both. On a shared machine a step's time moves by tens of
percent within minutes: the two processes take one step each, in turns, in
alternating order (only one computes at a time), so the steps of a pair
meet the same machine state. A process is also lastingly fast or slow (±5%
between fresh processes of one tree, probably from where its heap put the
large buffers): every run starts a fresh pair of processes. A run's figure is the median of its per-pair ratios
new/ref; the result is the median over runs, with a bootstrap 90% interval.
"""
import argparse
import io
import os
import os.path as osp
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PACKAGE = 'mila_det'
# Lines of the protocol between the driver and a worker start with this;
# everything else a worker prints goes to its stderr.
TAG = '@ab'


# ---------------------------------------------------------------- the worker
def worker(args: argparse.Namespace) -> None:
    """Serve the driver: build the backbone, then run steps on request.

    Requests on stdin, one per line: ``check PATH`` (save the eval-mode
    outputs on the shared input to PATH), ``step`` (time one step; replies
    with its seconds), ``quit``.
    """
    reply = os.fdopen(os.dup(1), 'w', buffering=1)
    os.dup2(2, 1)  # imports and the model print to stderr, not the protocol
    import mila_det
    from benchmark import build_backbone, make_step
    try:
        from mila_det.utils.malloc import keep_freed_memory
        heap = 'kept' if keep_freed_memory() else 'default'
    except ImportError:  # a tree from before the setting
        heap = 'default'
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_backbone(args.backbone, torch.device('cpu'))
    if args.weights_in:
        state = torch.load(args.weights_in, map_location='cpu')
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            sys.exit(f'the two trees name the weights differently: '
                     f'missing here {missing[:5]}, unexpected {unexpected[:5]}')
    else:
        torch.save(model.state_dict(), args.weights_out)
    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, *args.shape)
    step = make_step(model, False, args.mode, args.shape, args.batch,
                     torch.device('cpu'))
    reply.write(f'{TAG} ready {osp.dirname(mila_det.__file__)} {heap}\n')
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == 'check':
            was_training = model.training
            model.eval()
            with torch.no_grad():
                torch.save([o.clone() for o in model(x)], rest[0])
            model.train(was_training)
            reply.write(f'{TAG} saved\n')
        elif cmd == 'step':
            t = time.perf_counter()
            step()
            reply.write(f'{TAG} {time.perf_counter() - t:.6f}\n')
        else:
            return


# ---------------------------------------------------------------- the driver
class Worker:
    """One tree's process, driven one request at a time."""

    def __init__(self, name: str, root: str, args: argparse.Namespace,
                 weights: Tuple[str, str], log_dir: str) -> None:
        self.name = name
        self.log = open(osp.join(log_dir, f'{name}.log'), 'w+')
        cmd = [sys.executable, osp.abspath(__file__), '--worker',
               '--backbone', args.backbone, '--mode', args.mode,
               '--batch', str(args.batch), '--threads', str(args.threads),
               '--shape', *map(str, args.shape), f'--weights-{weights[0]}',
               weights[1]]
        env = dict(os.environ, PYTHONPATH=root)
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1)
        self.package, self.heap = self.read('ready')[:2]

    def read(self, expect: str = '') -> List[str]:
        line = self.proc.stdout.readline()
        if not line.startswith(TAG):
            self.proc.kill()
            self.log.seek(0)
            sys.exit(f'error: the {self.name} tree\'s process stopped; the '
                     f'end of its output:\n{self.log.read()[-3000:]}')
        words = line.split()[1:]
        if expect and words[0] != expect:
            sys.exit(f'error: the {self.name} tree answered {line!r}')
        return words[1:] if expect else words

    def ask(self, request: str, expect: str = '') -> List[str]:
        self.proc.stdin.write(request + '\n')
        return self.read(expect)

    def step(self) -> float:
        return float(self.ask('step')[0])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write('quit\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()


def ref_tree(ref: str, tmp: str) -> str:
    """The directory holding the reference ``mila_det/``: ``ref`` itself, or
    the package at git revision ``ref`` of this repository, unpacked in
    ``tmp``."""
    if osp.isdir(ref):
        if not osp.isfile(osp.join(ref, PACKAGE, '__init__.py')):
            sys.exit(f'error: {ref} holds no {PACKAGE}/ package')
        return osp.abspath(ref)
    proc = subprocess.run(['git', '-C', REPO_ROOT, 'archive', '--format=tar',
                           ref, PACKAGE], capture_output=True)
    if proc.returncode:
        sys.exit(f'error: {ref!r} is neither a directory nor a revision of '
                 f'{REPO_ROOT}: {proc.stderr.decode().strip()}')
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(tmp, filter='data')
    return tmp


def median_interval(values: Sequence[float],
                    seed: int = 0) -> Tuple[float, float, float]:
    """The median of ``values`` and its bootstrap 90% interval (4000
    resamples)."""
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(values, k=len(values)))
                  for _ in range(4000))
    return statistics.median(values), boot[200], boot[3799]


def run_pair(args: argparse.Namespace, roots: Dict[str, str], tmp: str,
             run: int) -> Tuple[Dict[str, List[float]], Dict[str, Worker],
                                Optional[float]]:
    """One pair of fresh processes: the steps' seconds per tree, the
    workers, and (first run only) the largest output difference relative to
    the largest output."""
    weights = osp.join(tmp, 'weights.pth')
    workers = {}
    try:
        # the new tree builds the weights, so it starts first; which tree
        # steps first alternates between runs
        workers['new'] = Worker('new', roots['new'], args, ('out', weights),
                                tmp)
        workers['ref'] = Worker('ref', roots['ref'], args, ('in', weights),
                                tmp)
        new, ref = workers['new'], workers['ref']
        diff = None
        if run == 0:
            outs = []
            for w in (new, ref):
                path = osp.join(tmp, f'{w.name}.pth')
                w.ask(f'check {path}', 'saved')
                outs.append(torch.load(path))
            diff = max((a - b).abs().max().item() for a, b in zip(*outs))
            diff /= max(b.abs().max().item() for b in outs[1]) or 1.0
        first = (new, ref) if run % 2 == 0 else (ref, new)
        for _ in range(args.warmup):
            for w in first:
                w.step()
        times = {'new': [], 'ref': []}
        for i in range(args.pairs):
            for w in (first if i % 2 == 0 else first[::-1]):
                times[w.name].append(w.step())
    finally:
        for w in workers.values():
            w.close()
    return times, workers, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('ref', nargs='?',
                        help='a git revision of this repository, or a '
                        f'directory holding a {PACKAGE}/ package')
    parser.add_argument('--new', default=REPO_ROOT,
                        help='the directory of the tree to compare '
                        '(default: this checkout)')
    parser.add_argument('--backbone', default='mila_t',
                        help='a name from benchmark.py (default: mila_t)')
    parser.add_argument('--shape', nargs=2, type=int, default=[800, 1280],
                        metavar=('H', 'W'))
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--mode', choices=['infer', 'train'], default='infer')
    parser.add_argument('--runs', type=int, default=10,
                        help='pairs of fresh processes (default: 10)')
    parser.add_argument('--pairs', type=int, default=6,
                        help='timed steps per tree and run (default: 6)')
    parser.add_argument('--warmup', type=int, default=2,
                        help='untimed steps per tree and run (default: 2)')
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--worker', action='store_true',
                        help=argparse.SUPPRESS)
    parser.add_argument('--weights-in', help=argparse.SUPPRESS)
    parser.add_argument('--weights-out', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.ref is None:
        parser.error('give the tree to compare against (REF)')
    if args.pairs < 1 or args.runs < 1:
        parser.error('--runs and --pairs must be at least 1')
    h, w = args.shape
    print(f'{args.backbone}: {args.mode}, batch {args.batch}, {h}x{w}, cpu, '
          f'{args.threads} threads; {args.runs} runs of {args.pairs} pairs '
          'of steps in alternating order', flush=True)
    run_ratios, all_times = [], {'new': [], 'ref': []}
    with tempfile.TemporaryDirectory(prefix='ab_compare_') as tmp:
        roots = dict(new=osp.abspath(args.new),
                     ref=ref_tree(args.ref, osp.join(tmp, 'ref')))
        for run in range(args.runs):
            times, workers, diff = run_pair(args, roots, tmp, run)
            if run == 0:
                for name, label in (('new', args.new), ('ref', args.ref)):
                    print(f'  {name}: {label} ({workers[name].package}), '
                          f'heap {workers[name].heap}')
                print(f'  outputs on one input: max |new - ref| = {diff:.3g}'
                      ' of the largest output')
                if workers['new'].heap != workers['ref'].heap:
                    print('  warning: the trees set up the heap differently')
            ratio = statistics.median(
                n / r for n, r in zip(times['new'], times['ref']))
            run_ratios.append(ratio)
            for name in all_times:
                all_times[name] += times[name]
            print(f'  run {run + 1}: new median '
                  f'{statistics.median(times["new"]) * 1e3:.1f} ms, ref '
                  f'{statistics.median(times["ref"]) * 1e3:.1f} ms, new/ref '
                  f'per pair {ratio:.3f}', flush=True)
    mid, lo, hi = median_interval(run_ratios)
    print(f'  new/ref: median over runs {mid:.3f} (90% interval {lo:.3f}-'
          f'{hi:.3f}); new slower in {sum(r > 1 for r in run_ratios)} of '
          f'{args.runs} runs; all steps: new median '
          f'{statistics.median(all_times["new"]) * 1e3:.1f} ms, ref '
          f'{statistics.median(all_times["ref"]) * 1e3:.1f} ms')


if __name__ == '__main__':
    main()
