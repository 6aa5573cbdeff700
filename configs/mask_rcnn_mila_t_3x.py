# Mask R-CNN + MILA-T, 3x (36 epochs), ms-crop pipeline: 48.8 box / 43.8 mask
# AP on COCO val2017 as published.
_base_ = [
    './_base_/mask_rcnn_mila_t.py',
    './_base_/coco_instance_ms_crop.py',
    './_base_/schedule_adamw_3x.py',
]

model = dict(backbone=dict(drop_path_rate=0.3))
