"""mila_det: MILA and VMamba backbones for MMDetection 3.x.

Importing the package registers its models in MMDetection's registries.
"""
import warnings

# MMEngine imports (and re-imports) pkg_resources, which setuptools
# deprecates with a UserWarning each time: silence exactly that message,
# before the imports below load MMEngine and MMDetection.
warnings.filterwarnings('ignore', category=UserWarning,
                        message=r'pkg_resources is deprecated as an API')

from .version import __version__  # noqa: E402
from . import engine, models  # noqa: F401,E402  (registers modules)
from . import registry  # noqa: F401,E402  (the mila_det scope)
from .utils.checkpoint import allow_mmengine_checkpoints  # noqa: E402
from .utils.config_scope import register_config_scope  # noqa: E402

# MMEngine checkpoints (resume, load_from) load under weights_only=True.
allow_mmengine_checkpoints()
# Configs can inherit ours as _base_ = 'mila_det::mask_rcnn_mila_s_3x.py'.
register_config_scope()

__all__ = ['__version__']
