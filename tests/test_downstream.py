"""A project outside this repository inherits our configs."""
import os.path as osp
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT

BUILD = '''
import sys
import mila_det  # registers the mila_det:: config scope
from mmengine.config import Config
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
register_all_modules()
cfg = Config.fromfile(sys.argv[1])
cfg.model.backbone.init_cfg = None
model = MODELS.build(cfg.model)
print(type(model.backbone).__name__, model.roi_head.bbox_head.num_classes,
      cfg.train_cfg.max_epochs, cfg.model.backbone.drop_path_rate)
'''


@pytest.mark.parametrize('base', [
    "'mila_det::mask_rcnn_mila_s_3x.py'",
    repr(osp.join(REPO_ROOT, 'configs', 'mask_rcnn_mila_s_3x.py')),
], ids=['scope', 'path'])
def test_downstream_config_inherits_and_builds(tmp_path, base):
    (tmp_path / 'my_detector.py').write_text(textwrap.dedent(f'''
        _base_ = {base}
        model = dict(roi_head=dict(bbox_head=dict(num_classes=3),
                                   mask_head=dict(num_classes=3)))
        '''))
    proc = subprocess.run([sys.executable, '-c', BUILD, 'my_detector.py'],
                          cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-4:] == ['MILA', '3', '36', '0.3']


def test_configs_ship_inside_the_package():
    import mila_det
    shipped = osp.join(osp.dirname(mila_det.__file__), '.mim', 'configs',
                       'mask_rcnn_mila_s_3x.py')
    assert osp.isfile(shipped)
