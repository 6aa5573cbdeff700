"""FLOPs of the MILA-T and VMamba-T backbones against input resolution, with
global softmax attention of the same widths as a quadratic reference.

    python tools/analysis/plot_complexity.py [--out docs/flops_vs_resolution.png]

The backbones are counted by tracing (see get_flops.py). The reference is
MILA-T with each block's linear attention replaced by global softmax
attention over all N tokens of its stage: the three attention matmuls of
MILA (2 N C d + N C per block) are swapped for softmax attention's
``Q K^T`` and ``A V`` (2 N^2 C per block).
"""
import argparse
import csv
import os

from mila_det.analysis import backbone_macs
from mila_det.models.backbones import MILA, VMamba

SIDES = [224, 320, 448, 640, 896, 1024, 1280, 1536, 2048]


def softmax_reference(mila: MILA, side: int, mila_macs: int) -> int:
    total = mila_macs
    h = w = -(-side // 4)
    for i, layer in enumerate(mila.layers):
        n, c = h * w, mila.num_features[i]
        d = c // layer.blocks[0].attn.num_heads
        per_block = 2 * n * n * c - (2 * n * c * d + n * c)
        total += per_block * len(layer.blocks)
        h, w = -(-h // 2), -(-w // 2)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='docs/flops_vs_resolution.png')
    args = parser.parse_args()
    mila, vmamba = MILA('tiny'), VMamba('tiny')
    rows = []
    for side in SIDES:
        m = backbone_macs(mila, (side, side))['total']
        v = backbone_macs(vmamba, (side, side))['total']
        q = softmax_reference(mila, side, m)
        rows.append((side, m / 1e9, v / 1e9, q / 1e9))
        print(f'{side:5d}^2  MILA-T {m / 1e9:9.2f} G  VMamba-T {v / 1e9:9.2f} G'
              f'  softmax reference {q / 1e9:10.2f} G', flush=True)
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(os.path.splitext(args.out)[0] + '.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['side', 'mila_t_gmacs', 'vmamba_t_gmacs',
                         'softmax_reference_gmacs'])
        writer.writerows(rows)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pixels = [s * s / 1e6 for s in SIDES]
    for col, label in ((1, 'MILA-T'), (2, 'VMamba-T'),
                       (3, 'global softmax attention (MILA-T widths)')):
        ax.plot(pixels, [r[col] for r in rows], marker='o', label=label)
    ax.set(xscale='log', yscale='log', xlabel='megapixels (square input)',
           ylabel='GMACs (backbone)',
           title='Backbone FLOPs vs. input resolution')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
