"""Backend choice in one place, with errors that say how to fix them."""
import subprocess
import sys

import pytest
import torch

from mila_det.ops import resolve_backend
from tests.conftest import REPO_ROOT


def test_auto_is_torch_on_cpu():
    x = torch.zeros(1)
    assert resolve_backend('op', x, 'auto') == 'torch'
    assert resolve_backend('op', x, 'torch') == 'torch'


def test_environment_variable_forces_backend(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv('MILA_DET_BACKEND', 'torch')
    assert resolve_backend('op', x) == 'torch'
    monkeypatch.setenv('MILA_DET_BACKEND', 'cuda')
    with pytest.raises(ValueError, match='unknown backend'):
        resolve_backend('op', x)


def test_forcing_triton_on_cpu_explains_the_fix(monkeypatch):
    monkeypatch.setenv('TRITON_INTERPRET', '0')
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
        resolve_backend('selective_scan', torch.zeros(1), 'triton')


BLOCK_TRITON = '''
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == 'triton' or name.startswith('triton.'):
            raise ImportError('triton blocked for this test')
sys.meta_path.insert(0, Block())
import torch
import mila_det
from mila_det.ops import HAS_TRITON, selective_scan
from mila_det.models.backbones import MILA, VMamba
assert not HAS_TRITON
x = torch.randn(1, 3, 40, 56)
MILA(arch=dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)))(x)
VMamba(arch=dict(dims=16, depths=(1, 1, 1, 1), ssm_ratio=1.0, d_state=1))(x)
try:
    selective_scan(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3),
                   -torch.ones(2, 1), torch.zeros(1, 1, 1, 3),
                   torch.zeros(1, 1, 1, 3), backend='triton')
except RuntimeError as err:
    assert 'pip install triton' in str(err), err
    print('ok')
'''


def test_package_works_without_triton():
    proc = subprocess.run([sys.executable, '-c', BLOCK_TRITON], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith('ok')
