# Mask R-CNN + MILA-T, 1x (12 epochs), ms-crop pipeline: 46.8 box / 42.1 mask
# AP on COCO val2017 as published. ImageNet weights: MLLA_T.pth.
_base_ = [
    './_base_/mask_rcnn_mila_t.py',
    './_base_/coco_instance_ms_crop.py',
    './_base_/schedule_adamw_1x.py',
]
