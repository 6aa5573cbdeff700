# Mask R-CNN + MILA-S, 3x, ms-crop: 50.5 box / 44.9 mask AP as published.
_base_ = [
    './_base_/mask_rcnn_mila_s.py',
    './_base_/coco_instance_ms_crop.py',
    './_base_/schedule_adamw_3x.py',
]

model = dict(backbone=dict(drop_path_rate=0.3))
