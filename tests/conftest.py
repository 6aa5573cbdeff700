import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / 'shared'
REFERENCE = SHARED / 'reference'


def reference_file(name: str) -> Path:
    """A file of ../shared/reference; fails (never skips) when it is absent."""
    path = REFERENCE / name
    if not path.is_file():
        pytest.fail(f'reference fixture missing: {path} (tests expect '
                    '../shared beside the repository)')
    return path


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def in_repo_root(monkeypatch):
    """Run a test from the repository root (configs use data/ paths)."""
    monkeypatch.chdir(REPO_ROOT)
    return REPO_ROOT


os.environ.setdefault('OMP_NUM_THREADS', '2')
