"""Synthetic detector inputs, for benchmarks and tests that need a batch
without a dataset."""
from typing import List, Tuple

import torch
from torch import Tensor


def synthetic_det_batch(batch: int, height: int, width: int,
                        device='cpu') -> Tuple[Tensor, List]:
    """Normalised-looking images ``[B, 3, H, W]`` and ``DetDataSample``s with
    two boxes and their box-shaped masks each (labels 0 and 1)."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    images = torch.randn(batch, 3, height, width, device=device)
    samples = []
    for _ in range(batch):
        sample = DetDataSample(metainfo=dict(
            img_shape=(height, width), ori_shape=(height, width),
            pad_shape=(height, width), batch_input_shape=(height, width),
            scale_factor=(1.0, 1.0)))
        boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.9]])
        boxes = boxes * torch.tensor([width, height, width, height])
        masks = torch.zeros(2, height, width, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        sample.gt_instances = InstanceData(
            bboxes=boxes.to(device), labels=torch.tensor([0, 1],
                                                         device=device),
            masks=BitmapMasks(masks.numpy(), height, width))
        samples.append(sample)
    return images, samples
