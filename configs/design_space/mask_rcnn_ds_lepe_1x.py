# Mask R-CNN 1x, design-space backbone: + LePE (Table 2).
_base_ = './_base_.py'

model = dict(backbone=dict(design='lepe'))
