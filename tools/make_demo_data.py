"""Write the built-in demo dataset (COCO format) under data/shapes/.

    python tools/make_demo_data.py [--out data/shapes] [--train 240]
        [--val 60] [--size 192] [--seed 0]
"""
import argparse
import time

from mila_det.datasets import make_shapes_coco


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='data/shapes')
    parser.add_argument('--train', type=int, default=240)
    parser.add_argument('--val', type=int, default=60)
    parser.add_argument('--size', type=int, default=192)
    parser.add_argument('--max-objects', type=int, default=4)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    paths = make_shapes_coco(args.out, args.train, args.val, args.size,
                             args.max_objects, args.seed)
    print(f'wrote {args.train} train / {args.val} val images of '
          f'{args.size}x{args.size} to {args.out}/ in '
          f'{time.time() - start:.1f} s')
    for split, path in paths.items():
        print(f'  {split}: {path}')


if __name__ == '__main__':
    main()
