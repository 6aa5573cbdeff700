# Mask R-CNN 1x, design-space backbone: + 2-D RoPE (Table 2).
_base_ = './_base_.py'

model = dict(backbone=dict(design='rope'))
