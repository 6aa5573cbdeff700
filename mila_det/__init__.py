"""mila_det: MILA and VMamba backbones for MMDetection 3.x.

Importing the package registers its models in MMDetection's registries, its
checkpoint loaders in MMEngine's (weights-only, see
:mod:`mila_det.utils.weights`) and its configs as the ``mila_det::`` scope.
"""
from .version import __version__
from . import engine, models  # noqa: F401  (registers modules)
from . import registry  # noqa: F401  (the mila_det scope)
from .utils.config_scope import register_config_scope
from .utils.weights import register_checkpoint_loaders

# Local files and addresses (resume, load_from, init_cfg) load weights-only.
register_checkpoint_loaders()
# Configs can inherit ours as _base_ = 'mila_det::mask_rcnn_mila_s_3x.py'.
register_config_scope()

__all__ = ['__version__']
