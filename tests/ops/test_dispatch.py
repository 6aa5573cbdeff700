"""Backend choice in one place, with errors that say how to fix them."""
import subprocess
import sys

import pytest
import torch

from mila_det.ops import dispatch, resolve_backend, use_backend
from tests.conftest import REPO_ROOT


def test_auto_is_torch_on_cpu():
    x = torch.zeros(1)
    assert resolve_backend('op', x, 'auto') == 'torch'
    assert resolve_backend('op', x, 'torch') == 'torch'


def test_environment_variable_forces_backend(monkeypatch):
    """The setting is read once (at import) into ``BACKEND``, which then
    decides every call that passes no ``backend=``."""
    from mila_det.ops import _dispatch
    assert _dispatch.backend_setting({}) == 'auto'
    assert _dispatch.backend_setting({'MILA_DET_BACKEND': 'Torch'}) == 'torch'
    x = torch.zeros(1)
    monkeypatch.setattr(_dispatch, 'BACKEND', 'naive')
    assert resolve_backend('op', x) == 'naive'
    assert resolve_backend('op', x, 'torch') == 'torch'
    monkeypatch.setattr(_dispatch, 'BACKEND', 'cuda')
    with pytest.raises(ValueError, match='unknown backend'):
        resolve_backend('op', x)
    monkeypatch.setattr(_dispatch, 'BACKEND', 'auto')
    with use_backend('naive'):
        assert resolve_backend('op', x) == 'naive'
    assert resolve_backend('op', x) == 'torch'
    with pytest.raises(ValueError, match='unknown backend'):
        with use_backend('cuda'):
            pass


def test_forcing_triton_on_cpu_explains_the_fix(monkeypatch):
    from mila_det.ops import _dispatch
    monkeypatch.setattr(_dispatch, 'TRITON_INTERPRET', False)
    monkeypatch.setattr(_dispatch, 'HAS_TRITON', True)
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
        resolve_backend('selective_scan', torch.zeros(1), 'triton')


def test_dispatch_returns_the_chosen_implementation(monkeypatch):
    impls = dict(naive=lambda: 'naive', torch=lambda: 'torch')
    x = torch.zeros(1)
    assert dispatch('op', x, None, impls)() == 'torch'
    assert dispatch('op', x, 'naive', impls)() == 'naive'
    from mila_det.ops import _dispatch
    monkeypatch.setattr(_dispatch, 'HAS_TRITON', True)
    monkeypatch.setattr(torch.Tensor, 'is_cuda', property(lambda t: True))
    # no Triton kernel: auto stays on PyTorch; forcing it says so
    assert dispatch('op', x, 'auto', impls)() == 'torch'
    with pytest.raises(RuntimeError, match='no Triton kernel'):
        dispatch('op', x, 'triton', impls)


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


@pytest.fixture
def pretend_cuda(monkeypatch):
    """Tensors report ``is_cuda`` and Triton imports, so ``auto`` picks the
    Triton implementation; the kernel-failure cache starts empty."""
    from mila_det.ops import _dispatch
    monkeypatch.setattr(_dispatch, 'HAS_TRITON', True)
    monkeypatch.setattr(_dispatch, '_TRIED', {})
    monkeypatch.setattr(torch.Tensor, 'is_cuda', property(lambda t: True))
    monkeypatch.setattr(_dispatch, 'BACKEND', 'auto')


def _kernel_error():
    """One of Triton's own launch errors (what ``auto`` falls back from)."""
    errors = pytest.importorskip('triton.runtime.errors')
    return errors.OutOfResources(1 << 20, 1 << 16, 'shared memory')


class _BrokenBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, dy):
        raise _kernel_error()


@pytest.mark.parametrize('where', ['forward', 'backward'])
def test_a_failing_kernel_falls_back_under_auto_and_raises_when_forced(
        where, pretend_cuda):
    calls = []

    def kernel(x):
        calls.append('triton')
        if where == 'forward':
            raise _kernel_error()
        return _BrokenBackward.apply(x)

    def plain(x):
        calls.append('torch')
        return x * 2

    impls = dict(naive=plain, torch=plain, triton=kernel)
    x = torch.randn(3, requires_grad=True)
    with pytest.warns(RuntimeWarning, match='kernels of my_op failed.*'
                      'OutOfResources: out of resource: shared memory'
                      ) as record:
        y = dispatch('my_op', x, None, impls)(x)
        y.sum().backward()
        dispatch('my_op', x, None, impls)(x)  # no second warning
    assert len(record) == 1
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    assert calls[-2:] == ['torch', 'torch']
    errors = pytest.importorskip('triton.runtime.errors')
    with pytest.raises(errors.OutOfResources):
        out = dispatch('my_op', x, 'triton', impls)(x)
        out.sum().backward()


@pytest.mark.parametrize('error', [ValueError, RuntimeError, TypeError])
def test_other_errors_propagate_under_auto(error, pretend_cuda):
    """Only Triton's compile / launch errors fall back: a bug in a wrapper
    raises (no warning, no silent switch to PyTorch for later calls)."""
    import warnings

    def kernel(x):
        raise error('a bug in the wrapper (on purpose)')

    impls = dict(naive=None, torch=lambda x: x * 2, triton=kernel)
    x = torch.randn(3)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for _ in range(2):
            with pytest.raises(error, match='on purpose'):
                dispatch('bug_op', x, None, impls)(x)


def test_kernel_errors_are_tritons_own():
    pytest.importorskip('triton')
    from mila_det.ops import _dispatch
    import triton.compiler.errors
    import triton.runtime.errors
    assert triton.compiler.errors.CompilationError in _dispatch.KERNEL_ERRORS
    assert triton.runtime.errors.OutOfResources in _dispatch.KERNEL_ERRORS
    assert not any(issubclass(RuntimeError, e) or issubclass(e, RuntimeError)
                   for e in _dispatch.KERNEL_ERRORS if e is not Exception)


def test_working_kernels_are_probed_once(pretend_cuda):
    calls = []

    def kernel(x):
        calls.append('triton')
        return x * 2

    impls = dict(naive=None, torch=None, triton=kernel)
    x = torch.randn(3, requires_grad=True)
    for _ in range(3):
        dispatch('ok_op', x, None, impls)(x)
    assert calls == ['triton'] * 4  # one probe, three calls


BLOCK_MMCV_OPS = '''
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in ('mmcv.ops', 'mmcv._ext') or name.startswith('mmcv.ops.'):
            raise ImportError(name + ' blocked: mmcv built without its ops')
sys.meta_path.insert(0, Block())
import torch
import mila_det
from mila_det.models.backbones import MILA, VMamba
x = torch.randn(2, 3, 40, 56)
for model in (MILA(arch=dict(embed_dims=16, depths=(1, 1, 1, 1),
                             num_heads=(1, 2, 2, 4))),
              VMamba(arch=dict(dims=16, depths=(1, 1, 1, 1), ssm_ratio=1.0,
                               d_state=1))):
    model.init_weights()
    model.train()
    sum(o.mean() for o in model(x)).backward()
assert 'mmcv.ops' not in sys.modules
print('ok')
'''


def test_package_and_backbones_work_without_mmcv_ops():
    """mmcv built without its compiled ops (as on an offline GPU node):
    importing mila_det and building, initialising and training its
    backbones needs none of them."""
    proc = subprocess.run([sys.executable, '-c', BLOCK_MMCV_OPS],
                          cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith('ok')


def test_the_probe_is_invisible_to_activation_checkpointing(pretend_cuda):
    """Inside ``checkpoint(use_reentrant=False)`` (``with_cp=True``) the
    first-call probe must neither trip the checkpoint's recomputation nor be
    taken for a kernel failure."""
    import warnings

    import torch.utils.checkpoint as cp

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, dy):
            x, = ctx.saved_tensors
            return 2 * x * dy

    impls = dict(naive=None, torch=lambda x: x * x, triton=Twice.apply)
    x = torch.randn(4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        y = cp.checkpoint(lambda t: dispatch('cp_op', t, None, impls)(t) + 1,
                          x, use_reentrant=False)
        y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())
