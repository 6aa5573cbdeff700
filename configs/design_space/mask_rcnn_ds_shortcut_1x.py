# Mask R-CNN 1x, design-space backbone: + shortcut D * v (Table 1).
_base_ = './_base_.py'

model = dict(backbone=dict(design='shortcut'))
