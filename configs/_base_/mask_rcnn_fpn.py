# Mask R-CNN with FPN as MMDetection defines it (FPN 256 x 5 levels, RPN,
# RoIAlign 7x7 box / 14x14 mask heads, 80 classes); each config swaps in its
# backbone and the FPN input widths.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mila_det'], allow_failed_imports=False)
