# Mask R-CNN 1x, design-space backbone: the baseline: global multi-head linear
# attention, Swin-T macro design (Table 1).
_base_ = './_base_.py'

model = dict(backbone=dict(design='baseline'))
