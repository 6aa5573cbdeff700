"""Check a config's COCO-format datasets before a long run.

    python tools/check_dataset.py CONFIG [--splits train val test]
        [--workers N] [--box-tolerance PX] [--cfg-options k=v ...]

For every annotation file the config's train / val / test dataloaders name,
it checks that every referenced image exists, opens (a header decode: PIL
reads the format and size, not the pixels) and has the annotated width and
height; that every box lies inside its image (within ``--box-tolerance``
pixels) and has a positive size; that every polygon has at least three
points and every RLE mask the image's size; and that every category id is
one the file defines. It prints a progress bar, a summary and one line per
bad file, and exits with status 1 when anything is wrong.
"""
import argparse
import json
import os.path as osp
import sys
import time
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Optional, Tuple

warnings.filterwarnings('ignore', category=UserWarning,
                        message=r'pkg_resources is deprecated as an API')

from mmengine.config import Config, DictAction  # noqa: E402
from PIL import Image  # noqa: E402

Problems = Dict[str, List[str]]  # file -> what is wrong with it


def leaf_datasets(cfg: dict) -> Iterator[dict]:
    """The dataset configs that read files, through wrappers
    (``dataset`` / ``datasets``)."""
    if isinstance(cfg.get('dataset'), dict):
        yield from leaf_datasets(cfg['dataset'])
    elif isinstance(cfg.get('datasets'), (list, tuple)):
        for sub in cfg['datasets']:
            yield from leaf_datasets(sub)
    else:
        yield cfg


def annotation_sources(cfg: Config, splits: List[str]
                       ) -> List[Tuple[str, str, str]]:
    """``(split, annotation file, image folder)`` for every dataset of the
    given splits, each annotation file once."""
    seen, sources = set(), []
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not loader:
            continue
        for ds in leaf_datasets(loader['dataset']):
            root = ds.get('data_root') or ''
            ann = ds.get('ann_file')
            if not ann:
                continue
            ann = ann if osp.isabs(ann) else osp.join(root, ann)
            prefix = (ds.get('data_prefix') or {}).get('img', '')
            img_dir = prefix if osp.isabs(prefix) else osp.join(root, prefix)
            if ann not in seen:
                seen.add(ann)
                sources.append((split, ann, img_dir))
    return sources


def check_image(path: str, width: Optional[int],
                height: Optional[int]) -> Optional[str]:
    """What is wrong with one image file (None if nothing): missing,
    unreadable header, or a size other than the annotated one."""
    try:
        with Image.open(path) as img:
            size = img.size
    except FileNotFoundError:
        return 'file not found'
    except (OSError, SyntaxError, ValueError) as err:  # PIL's decode errors
        return f'cannot be decoded ({type(err).__name__}: {err})'
    if width is not None and height is not None and \
            size != (int(width), int(height)):
        return (f'size {size[0]}x{size[1]} differs from the annotated '
                f'{width}x{height}')
    return None


def check_annotation(ann: dict, image: Optional[dict], known: set,
                     tolerance: float) -> List[str]:
    """What is wrong with one annotation (empty if nothing)."""
    wrong = []
    where = f'annotation {ann.get("id")}'
    if ann.get('category_id') not in known:
        wrong.append(f'{where}: unknown category id {ann.get("category_id")}')
    bbox = ann.get('bbox')
    if bbox is not None:
        if len(bbox) != 4:
            wrong.append(f'{where}: bbox {bbox} is not [x, y, w, h]')
        else:
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                wrong.append(f'{where}: empty bbox {bbox}')
            elif image is not None and (
                    x < -tolerance or y < -tolerance
                    or x + w > image['width'] + tolerance
                    or y + h > image['height'] + tolerance):
                wrong.append(f'{where}: bbox {bbox} lies outside the '
                             f'{image["width"]}x{image["height"]} image')
    seg = ann.get('segmentation')
    if isinstance(seg, list):
        if not seg:
            wrong.append(f'{where}: empty polygon list')
        for poly in seg:
            if len(poly) < 6 or len(poly) % 2:
                wrong.append(f'{where}: polygon with {len(poly)} '
                             'coordinates (needs an even number, >= 6)')
                break
    elif isinstance(seg, dict) and image is not None:
        size = list(seg.get('size', []))
        if size != [image['height'], image['width']]:
            wrong.append(f'{where}: RLE mask size {size} differs from the '
                         f'image {[image["height"], image["width"]]}')
    return wrong


def _bar(done: int, total: int, start: float) -> None:
    width = 30
    filled = width * done // max(total, 1)
    rate = done / max(time.perf_counter() - start, 1e-9)
    sys.stderr.write(f'\r[{"#" * filled}{"." * (width - filled)}] '
                     f'{done}/{total} images, {rate:.0f} images/s')
    sys.stderr.flush()


def check_coco_file(ann_file: str, img_dir: str, workers: int = 4,
                    tolerance: float = 1.0, progress: bool = True
                    ) -> Tuple[Problems, int, float]:
    """Check one COCO annotation file and its images.

    Returns:
        tuple: ``(problems, images, seconds)``: ``problems`` maps each bad
        file (an image, or the annotation file itself) to what is wrong;
        ``images`` is the number of images checked, ``seconds`` the time
        their header checks took.
    """
    problems: Problems = defaultdict(list)
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        problems[ann_file].append(f'cannot be read: {err}')
        return problems, 0, 0.0
    images = data.get('images', [])
    known = {c['id'] for c in data.get('categories', [])}
    by_id = {img['id']: img for img in images}

    def path_of(img: dict) -> str:
        return osp.join(img_dir, img['file_name'])

    for ann in data.get('annotations', []):
        image = by_id.get(ann.get('image_id'))
        if image is None:
            problems[ann_file].append(
                f'annotation {ann.get("id")}: unknown image id '
                f'{ann.get("image_id")}')
        for wrong in check_annotation(ann, image, known, tolerance):
            problems[path_of(image) if image else ann_file].append(wrong)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(
            lambda img: check_image(path_of(img), img.get('width'),
                                    img.get('height')),
            images, chunksize=64)
        for done, (img, wrong) in enumerate(zip(images, results), 1):
            if wrong is not None:
                problems[path_of(img)].insert(0, wrong)
            if progress and (done % 500 == 0 or done == len(images)):
                _bar(done, len(images), start)
    seconds = time.perf_counter() - start
    if progress and images:
        sys.stderr.write('\n')
    return problems, len(images), seconds


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('--splits', nargs='+', default=['train', 'val',
                                                        'test'],
                        choices=['train', 'val', 'test'])
    parser.add_argument('--workers', type=int, default=4,
                        help='threads opening images (I/O bound). '
                        'Defaults to 4')
    parser.add_argument('--box-tolerance', type=float, default=1.0,
                        help='pixels a box may reach past the image border '
                        '(COCO rounds some). Defaults to 1')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    sources = annotation_sources(cfg, args.splits)
    if not sources:
        print(f'error: {args.config} names no annotation file for '
              f'{", ".join(args.splits)}', file=sys.stderr)
        return 2
    all_problems: Problems = {}
    total_images, total_seconds = 0, 0.0
    for split, ann_file, img_dir in sources:
        print(f'{split}: {ann_file} (images in {img_dir})', flush=True)
        problems, count, seconds = check_coco_file(
            ann_file, img_dir, args.workers, args.box_tolerance)
        total_images += count
        total_seconds += seconds
        print(f'  {count} images, {len(problems)} bad files', flush=True)
        for path, wrong in problems.items():
            all_problems.setdefault(path, []).extend(wrong)
    rate = total_images / total_seconds if total_seconds else 0.0
    print(f'checked {total_images} images in {len(sources)} annotation '
          f'files ({rate:.0f} images/s): {len(all_problems)} bad files')
    for path, wrong in sorted(all_problems.items()):
        print(f'BAD {path}: {"; ".join(wrong)}')
    return 1 if all_problems else 0


if __name__ == '__main__':
    sys.exit(main())
