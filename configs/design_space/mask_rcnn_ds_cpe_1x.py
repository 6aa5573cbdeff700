# Mask R-CNN 1x, design-space backbone: + CPE, two per block (Table 2).
_base_ = './_base_.py'

model = dict(backbone=dict(design='cpe'))
