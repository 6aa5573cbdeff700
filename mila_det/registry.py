"""mila_det's registries: children of MMDetection's, under the scope
``mila_det``, so modules built from configs inherited as ``mila_det::...``
resolve (our models register in MMDetection's registries; lookups from this
scope fall back to them)."""
from mmdet.registry import MODELS as MMDET_MODELS
from mmdet.registry import OPTIM_WRAPPERS as MMDET_OPTIM_WRAPPERS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMDET_MODELS, scope='mila_det')
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=MMDET_OPTIM_WRAPPERS,
                          scope='mila_det')
