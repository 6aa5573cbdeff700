import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU (set
# before Triton is imported, which reads it once); with one they compile.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

REPO_ROOT = Path(__file__).resolve().parents[1]
# Outputs of the official implementations for small random models, and the
# official checkpoints' key listings (see tests/data/reference/README.md).
REFERENCE = REPO_ROOT / 'tests' / 'data' / 'reference'


def reference_file(name: str) -> Path:
    """A file of tests/data/reference; fails (never skips) when absent."""
    path = REFERENCE / name
    if not path.is_file():
        pytest.fail(f'reference fixture missing: {path}')
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



def needs_triton():
    """Skip marker for kernel tests when Triton is not installed (CI and the
    documented environment install it, so these run there)."""
    from mila_det.ops import HAS_TRITON
    return pytest.mark.skipif(not HAS_TRITON, reason='triton not installed')


def rel_err(got, want) -> float:
    """Max abs error relative to the reference's scale."""
    return ((got.double() - want.double()).abs().max() /
            want.double().abs().max().clamp_min(1e-12)).item()


def official_key_listing(name: str) -> dict:
    """Sections of a ``*_keys.txt`` listing: title -> {key: shape string}."""
    sections, current = {}, None
    for line in reference_file(name).read_text().splitlines():
        if line.startswith('## '):
            current = sections.setdefault(line[3:].strip(), {})
        elif line.strip() and current is not None:
            key, shape = line.split('\t')[:2]
            current[key] = shape.replace(' ', '')
    return sections


def shape_string(t) -> str:
    return str(tuple(t.shape)).replace(' ', '')
