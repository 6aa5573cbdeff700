"""The MILA paper's design-space tables (Tables 1 and 2): our counts and CPU
throughput next to the published figures.

    python tools/analysis/design_space_table.py
    python tools/analysis/design_space_table.py --rows baseline forget_gate
    python tools/analysis/design_space_table.py --no-speed
    python tools/analysis/design_space_table.py --batch 8 --repeats 5

Every row of ``DESIGN_ROWS`` (mila_det/models/backbones/design_space.py) is
built in classification form at 224x224: the backbone with its last stage's
output LayerNorm as the final norm, global average pooling and
Linear(768 -> 1000). Params are exact. FLOPs are multiply-adds counted by
the project's analyzer (linear, conv and attention products; the forget
gate's scan analytically as 9 * L * C * N), once without norms (the
convention of the paper's FLOP columns) and once with LayerNorms
counted as fvcore/MMEngine count them by default (5 per element), which is
the column that rounds to the published one-decimal figures.

Throughput is measured on this machine's CPU in one process: every model
sees the same random batch, after warm-up passes, rows interleaved within
each repeat; images/s from the median time. The ratio to the baseline pairs
every timed pass of a row with a baseline pass timed just before it and
takes the median of those ratios (so a machine whose load changes between
rows still gives fair ratios); it is printed next to the paper's GPU
ratios. CPU ratios are not GPU ratios: the forget gate's scan in
particular runs very differently on the two.
"""
import argparse
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

warnings.filterwarnings('ignore', category=UserWarning,
                        message=r'pkg_resources is deprecated as an API')

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from mila_det.analysis import count_params  # noqa: E402
from mila_det.analysis.design_space import \
    design_space_flop_analyzer  # noqa: E402
from mila_det.models.backbones.design_space import (  # noqa: E402
    DESIGN_ROWS, PUBLISHED, LinearAttentionTransformer)

IMAGE_SIZE = 224


class Classifier(nn.Module):
    """A design's backbone in classification form: the last stage's output
    (normalised by its LayerNorm, the final norm), global average pooling,
    Linear(C -> num_classes)."""

    def __init__(self, design: str, num_classes: int = 1000) -> None:
        super().__init__()
        self.backbone = LinearAttentionTransformer(
            design=design, out_indices=(3, ), drop_path_rate=0.0)
        self.head = nn.Linear(self.backbone.num_features[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x)[-1].mean((2, 3)))


def macs(model: nn.Module, count_norms: bool) -> int:
    """Multiply-adds of one 224x224 image."""
    with torch.no_grad():
        analyzer = design_space_flop_analyzer(
            model, (torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), ),
            count_norms=count_norms)
        return analyzer.total()


def throughput(models: Dict[str, nn.Module], batch: int, warmup: int,
               repeats: int, reference: Optional[str] = None
               ) -> Dict[str, dict]:
    """Images/s of each model on one shared batch: ``warmup`` passes each,
    then ``repeats`` rounds that time every model once (interleaved).

    With ``reference`` (a key of ``models``), every pass of another model is
    paired with a pass of the reference timed just before it, and the ratio
    is the median over the pairs (robust to a machine whose load changes
    between rows); otherwise the ratio is left out.

    Returns:
        dict: name -> ``dict(ips=..., ratio=...)`` (ips from the median
        time; ratio to the reference, 1.0 for the reference itself).
    """
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    times: Dict[str, List[float]] = {name: [] for name in models}
    ratios: Dict[str, List[float]] = {name: [] for name in models}

    def timed(name: str) -> float:
        start = time.perf_counter()
        models[name](x)
        elapsed = time.perf_counter() - start
        times[name].append(elapsed)
        return elapsed

    with torch.inference_mode():
        for model in models.values():
            for _ in range(warmup):
                model(x)
        for _ in range(repeats):
            for name in models:
                if reference is None or name == reference:
                    timed(name)
                    continue
                ref = timed(reference)
                ratios[name].append(ref / timed(name))
    out = {}
    for name, t in times.items():
        ratio = None
        if reference is not None:
            ratio = 1.0 if name == reference else statistics.median(
                ratios[name])
        out[name] = dict(ips=batch / statistics.median(t), ratio=ratio)
    return out


def rounds_to(value: float, published: float) -> bool:
    """Whether ``value`` rounds to ``published`` at its printed precision
    (integers: 28 M; one decimal: 4.5 G)."""
    digits = 0 if float(published).is_integer() and published >= 10 else 1
    return round(value, digits) == round(published, digits)


def build_table(rows: Sequence[str], speed: bool, batch: int, warmup: int,
                repeats: int, threads: Optional[int]) -> List[dict]:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    models = {row: Classifier(row).eval() for row in rows}
    results = []
    for row, model in models.items():
        results.append(dict(row=row, params=count_params(model) / 1e6,
                            macs=macs(model, False) / 1e9,
                            macs_ln=macs(model, True) / 1e9))
    if speed:
        timed = dict(models)
        if 'baseline' not in timed:
            timed = {'baseline': Classifier('baseline').eval(), **timed}
        speeds = throughput(timed, batch, warmup, repeats, 'baseline')
        for r in results:
            r.update(speeds[r['row']])
    return results


def format_table(results: List[dict], speed: bool) -> str:
    head = ['row', 'params M', 'pub.', 'GMACs', 'GMACs+LN', 'pub.',
            'match']
    if speed:
        head += ['CPU img/s', 'CPU ratio', 'paper ratio']
    lines = ['| ' + ' | '.join(head) + ' |',
             '|' + '---|' * len(head)]
    base_pub = PUBLISHED['baseline'][2]
    for r in results:
        pub = PUBLISHED.get(r['row'])
        if pub is None:
            cells = [r['row'], f"{r['params']:.2f}", '-', f"{r['macs']:.2f}",
                     f"{r['macs_ln']:.2f}", '-', '-']
        else:
            ok = (rounds_to(r['params'], pub[0])
                  and rounds_to(r['macs_ln'], pub[1]))
            cells = [r['row'], f"{r['params']:.2f}", f'{pub[0]}M',
                     f"{r['macs']:.2f}", f"{r['macs_ln']:.2f}",
                     f'{pub[1]}G', 'yes' if ok else 'no']
        if speed:
            paper = f'{pub[2] / base_pub:.2f}' if pub else '-'
            cells += [f"{r['ips']:.2f}", f"{r['ratio']:.2f}", paper]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rows', nargs='+', default=list(DESIGN_ROWS),
                        choices=list(DESIGN_ROWS), metavar='ROW',
                        help=f'rows of DESIGN_ROWS (default: all): '
                        f'{", ".join(DESIGN_ROWS)}')
    parser.add_argument('--batch', type=int, default=4,
                        help='images per timed pass (default: 4)')
    parser.add_argument('--warmup', type=int, default=1,
                        help='untimed passes per model (default: 1)')
    parser.add_argument('--repeats', type=int, default=3,
                        help='timed passes per model; the median is kept '
                        '(default: 3)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: torch\'s)')
    parser.add_argument('--no-speed', action='store_true',
                        help='counts only, no throughput')
    args = parser.parse_args(argv)
    speed = not args.no_speed
    results = build_table(args.rows, speed, args.batch, args.warmup,
                          args.repeats, args.threads)
    print(f'Design space at {IMAGE_SIZE}x{IMAGE_SIZE}, classification form '
          '(backbone + final LayerNorm + pool + Linear(768 -> 1000)). '
          'GMACs: linear/conv/attention multiply-adds, forget-gate scan '
          '9*L*C*N; GMACs+LN: also LayerNorms as fvcore counts them '
          '(5/element); match: params and GMACs+LN round to the published '
          'figures.')
    if speed:
        print(f'CPU throughput: batch {args.batch}, {args.warmup} warm-up + '
              f'{args.repeats} timed passes per model (interleaved, median; '
              'ratio: median of passes paired with a baseline pass), '
              f'{torch.get_num_threads()} threads; paper ratio: GPU '
              'images/s over the baseline\'s 1152.')
    print(format_table(results, speed))
    sys.stdout.flush()


if __name__ == '__main__':
    main()
