# Mask R-CNN 1x, design-space backbone: + APE, one table per block on k (Table
# 2).
_base_ = './_base_.py'

model = dict(backbone=dict(design='ape'))
