# Mask R-CNN 1x, design-space backbone: + input gate (Table 1).
_base_ = './_base_.py'

model = dict(backbone=dict(design='input_gate'))
