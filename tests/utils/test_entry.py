"""What tools/train.py and tools/test.py share (mila_det.utils.entry)."""
import argparse
import os
import os.path as osp

import pytest

from mila_det.utils.entry import load_config, parse_with_launcher
from tests.conftest import REPO_ROOT

DEMO = osp.join(REPO_ROOT, 'configs', 'demo', 'mask_rcnn_mila_demo.py')


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='train.py')
    p.add_argument('config')
    return p


def test_a_missing_config_is_a_usage_error_naming_it(monkeypatch, capsys):
    monkeypatch.setattr('sys.argv', ['train.py', 'configs/no_such.py'])
    with pytest.raises(SystemExit) as exit_info:
        parse_with_launcher(parser())
    assert exit_info.value.code == 2
    assert 'config file not found: configs/no_such.py' in capsys.readouterr().err


def test_launcher_arguments_and_work_dir(monkeypatch):
    monkeypatch.setattr('sys.argv', ['train.py', DEMO, '--launcher',
                                     'pytorch', '--local-rank', '1'])
    # recorded first, so the variable the tool sets is undone afterwards
    monkeypatch.setenv('LOCAL_RANK', '0')
    monkeypatch.delenv('LOCAL_RANK')
    args = parse_with_launcher(parser())
    assert (args.launcher, args.local_rank) == ('pytorch', 1)
    assert osp.isfile(args.config)
    assert os.environ['LOCAL_RANK'] == '1'
    cfg = load_config(args.config, args.launcher,
                      {'train_cfg.max_epochs': 3})
    assert cfg.launcher == 'pytorch' and cfg.train_cfg.max_epochs == 3
    assert cfg.work_dir == osp.join('./work_dirs', 'mask_rcnn_mila_demo')
