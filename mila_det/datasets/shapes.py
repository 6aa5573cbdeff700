"""A small synthetic instance-segmentation dataset in COCO format.

Coloured rectangles, ellipses and triangles of varied size on textured
backgrounds, overlapping and occluding each other. Masks are the *visible*
part of every object (RLE), boxes their tight bounds; objects hidden below a
visibility threshold are dropped. Deterministic for a given seed; a few
hundred 256x256 images are written in seconds.
"""
import json
import os
import os.path as osp
from typing import Dict, List, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CLASSES = ('rectangle', 'ellipse', 'triangle')


def _draw_shape(canvas: np.ndarray, rng: np.random.Generator, label: int,
                size: int) -> np.ndarray:
    """Draw one shape of class ``label`` on a blank mask; return the mask."""
    h, w = canvas.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    extent = int(rng.uniform(0.12, 0.45) * size)
    cx, cy = (int(rng.integers(extent // 2, w - extent // 2)),
              int(rng.integers(extent // 2, h - extent // 2)))
    if label == 0:
        half_w, half_h = extent // 2, int(extent * rng.uniform(0.4, 1.0)) // 2
        angle = float(rng.uniform(0, 180))
        box = cv2.boxPoints(((cx, cy), (2 * half_w, 2 * half_h), angle))
        cv2.fillPoly(mask, [box.astype(np.int32)], 1)
    elif label == 1:
        axes = (extent // 2, max(3, int(extent * rng.uniform(0.35, 1.0)) // 2))
        cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360,
                    1, -1)
    else:
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2]) + \
            rng.uniform(-0.3, 0.3, 3)
        pts = np.stack([cx + extent / 2 * np.cos(angles),
                        cy + extent / 2 * np.sin(angles)], axis=1)
        cv2.fillPoly(mask, [pts.astype(np.int32)], 1)
    return mask


def _make_image(rng: np.random.Generator, size: int, max_objects: int
                ) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    base = rng.integers(0, 90, 3)
    img = np.empty((size, size, 3), np.float32)
    img[:] = base
    img += rng.normal(0, 12, (size, size, 3))  # texture
    ys, xs = np.mgrid[0:size, 0:size]
    img += (20 * np.sin(xs / rng.uniform(8, 30)))[..., None]
    owner = np.full((size, size), -1, np.int32)
    labels = []
    for idx in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(0, len(CLASSES)))
        mask = _draw_shape(img, rng, label, size).astype(bool)
        color = rng.integers(100, 256, 3).astype(np.float32)
        shade = 1 + 0.15 * np.sin((xs + ys) / rng.uniform(6, 20))
        img[mask] = color * shade[mask][:, None]
        owner[mask] = idx  # later shapes occlude earlier ones
        labels.append(label)
    objects = []
    for idx, label in enumerate(labels):
        visible = owner == idx
        objects.append((label, visible))
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _split(root: str, split: str, count: int, size: int, max_objects: int,
           seed: int, start_id: int) -> Dict:
    rng = np.random.default_rng(seed)
    img_dir = osp.join(root, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(count):
        image_id = start_id + i
        img, objects = _make_image(rng, size, max_objects)
        name = f'{image_id:06d}.png'
        cv2.imwrite(osp.join(img_dir, name), img)
        images.append(dict(id=image_id, file_name=name, height=size,
                           width=size))
        for label, visible in objects:
            area = int(visible.sum())
            if area < 40:  # (almost) fully hidden
                continue
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            rle['counts'] = rle['counts'].decode('ascii')
            annotations.append(dict(
                id=ann_id, image_id=image_id, category_id=label + 1,
                segmentation=rle, area=area, bbox=[x, y, w, h], iscrowd=0))
            ann_id += 1
    return dict(
        images=images, annotations=annotations,
        categories=[dict(id=i + 1, name=n, supercategory='shape')
                    for i, n in enumerate(CLASSES)])


def make_shapes_coco(root: str, num_train: int = 200, num_val: int = 50,
                     size: int = 256, max_objects: int = 4,
                     seed: int = 0) -> Dict[str, str]:
    """Write ``root/{train,val}/*.png`` and
    ``root/annotations/instances_{train,val}.json``.

    Args:
        root (str): Output folder (created).
        num_train (int): Training images. Defaults to 200.
        num_val (int): Validation images (drawn from another seed stream).
            Defaults to 50.
        size (int): Square image side. Defaults to 256.
        max_objects (int): Most shapes per image. Defaults to 4.
        seed (int): Random seed. Defaults to 0.

    Returns:
        dict: Paths of the two annotation files.
    """
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    paths = {}
    for split, count, offset in (('train', num_train, 0),
                                 ('val', num_val, 1_000_003)):
        data = _split(root, split, count, size, max_objects, seed + offset,
                      start_id=1 if split == 'train' else 100_001)
        path = osp.join(root, 'annotations', f'instances_{split}.json')
        with open(path, 'w') as f:
            json.dump(data, f)
        paths[split] = path
    return paths
