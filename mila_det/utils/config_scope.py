"""Let MMEngine configs inherit ours as ``_base_ = 'mila_det::NAME.py'``.

MMEngine resolves ``pkg::path`` only for a fixed list of OpenMMLab packages
(``mmengine.config.utils.MODULE2PACKAGE``) and only for paths with a folder
(``mmdet::_base_/...``). :func:`register_config_scope` adds ``mila_det`` to
that list and accepts ``mila_det::FILE.py`` as well. The configs ship inside
the package (``mila_det/.mim/configs``), so this works from a wheel as from a
checkout. It runs when ``mila_det`` is imported: ``tools/train.py`` and
``tools/test.py`` import it before parsing a config; with other entry points,
``import mila_det`` first (or inherit by file path instead).
"""
import os
import re

SCOPE = 'mila_det'


def register_config_scope() -> None:
    from mmengine.config import config as config_module
    from mmengine.config import utils as config_utils
    config_utils.MODULE2PACKAGE.setdefault(SCOPE, SCOPE)
    original = config_utils._get_package_and_cfg_path
    if getattr(original, '_mila_det', False):
        return

    def get_package_and_cfg_path(cfg_path: str):
        if cfg_path.startswith(f'{SCOPE}::') and re.match(
                r'\w*::\w*/\w*', cfg_path) is None:
            return SCOPE, cfg_path.split('::', 1)[1]
        return original(cfg_path)

    installed_path = config_module.get_installed_path

    def get_installed_path(package: str) -> str:
        # An editable install's distribution lives in site-packages while
        # the code stays in the checkout: ask the import system.
        if package == SCOPE:
            import mila_det
            return os.path.dirname(mila_det.__file__)
        return installed_path(package)

    get_package_and_cfg_path._mila_det = True
    config_utils._get_package_and_cfg_path = get_package_and_cfg_path
    config_module._get_package_and_cfg_path = get_package_and_cfg_path
    config_module.get_installed_path = get_installed_path
