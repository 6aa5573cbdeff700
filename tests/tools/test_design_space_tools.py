"""The design-space table command and the toy ablation."""
import csv
import os.path as osp

import pytest
from torch import nn

from mila_det.datasets import make_shapes_coco
from tests.helpers import load_tool


@pytest.fixture(scope='module')
def table_tool():
    return load_tool('tools/analysis/design_space_table.py')


def test_rounds_to_published_precision(table_tool):
    assert table_tool.rounds_to(28.27, 28) and not table_tool.rounds_to(
        28.54, 28)
    assert table_tool.rounds_to(4.46, 4.5) and not table_tool.rounds_to(
        4.44, 4.5)
    assert table_tool.rounds_to(3.86, 3.9)


def test_table_counts_match_the_published_figures(table_tool, capsys):
    table_tool.main(['--rows', 'single_head', 'forget_gate', '--no-speed'])
    out = capsys.readouterr().out
    cells = [[c.strip() for c in line.strip('|').split('|')]
             for line in out.splitlines() if line.startswith('| ')]
    lines = {c[0]: c for c in cells}
    single, forget = lines['single_head'], lines['forget_gate']
    # params, published, GMACs (no norms), GMACs + LN, published, match
    assert single[1:7] == ['24.23', '24M', '3.84', '3.86', '3.9G', 'yes']
    assert forget[1:7] == ['28.68', '29M', '4.81', '4.82', '4.8G', 'yes']
    assert 'CPU ratio' not in out


def test_throughput_times_every_model_on_the_same_batch(table_tool):
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return x

    speeds = table_tool.throughput({'a': Probe(), 'b': Probe()}, batch=2,
                                   warmup=1, repeats=3, reference='a')
    assert set(speeds) == {'a', 'b'}
    assert all(s['ips'] > 0 for s in speeds.values())
    assert speeds['a']['ratio'] == 1.0 and speeds['b']['ratio'] > 0
    # 2 warm-ups, then per round: a (itself), a (paired), b
    assert seen == [(2, 3, 224, 224)] * (2 + 3 * 3)


def test_ablation_two_rows(tmp_path):
    tool = load_tool('tools/design_space_ablation.py')
    root = str(tmp_path / 'shapes')
    make_shapes_coco(root, num_train=4, num_val=2, size=96, seed=1)
    out = str(tmp_path / 'out')
    tool.main(['--rows', 'baseline', 'forget_gate', '--iters', '2',
               '--data-root', root, '--out', out, '--speed-batch', '1',
               '--speed-repeats', '1'])
    with open(osp.join(out, 'ablation.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [r['row'] for r in rows] == ['baseline', 'forget_gate']
    for r in rows:
        assert float(r['params']) > 0.5 and float(r['gmacs']) > 0.1
        assert float(r['ips']) > 0
        assert 0 <= float(r['bbox_mAP']) <= 100
        assert 0 <= float(r['segm_mAP']) <= 100
    # the forget gate adds its step projections and A_log
    assert float(rows[1]['params']) > float(rows[0]['params'])
    text = open(osp.join(out, 'ablation.md')).read()
    assert 'does not reproduce' in text and '| forget_gate |' in text
    assert osp.getsize(osp.join(out, 'ablation.png')) > 1000
