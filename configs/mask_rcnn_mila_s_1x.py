# Mask R-CNN + MILA-S, 1x, ms-crop: 49.2 box / 44.2 mask AP as published.
_base_ = [
    './_base_/mask_rcnn_mila_s.py',
    './_base_/coco_instance_ms_crop.py',
    './_base_/schedule_adamw_1x.py',
]
