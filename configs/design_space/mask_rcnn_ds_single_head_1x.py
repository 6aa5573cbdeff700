# Mask R-CNN 1x, design-space backbone: - multi-head: one head with 32-wide q,
# k (Table 1).
_base_ = './_base_.py'

model = dict(backbone=dict(design='single_head'))
