"""Fused conv + activation / residual (CPU inference) against eager PyTorch,
and the blocks that use them: same numbers, inputs left untouched."""
import pytest
import torch
import torch.nn.functional as F

from mila_det.models.backbones import MILA, VMamba
from mila_det.models.layers import MILABlock, VSSBlock, cpu_fusion
from mila_det.models.layers.design_block import DesignBlock
from mila_det.models.layers.fused import (HAS_FUSED_CONV, can_fuse, conv2d_act,
                                          conv2d_add)

needs_fusion = pytest.mark.skipif(not HAS_FUSED_CONV,
                                  reason='this PyTorch has no oneDNN fusion')

# (C_in, C_out, kernel, stride, padding, groups): a 1x1 projection, a
# depthwise 3x3, a strided dense 3x3 with odd channel counts
CONVS = [(12, 20, 1, 1, 0, 1), (12, 12, 3, 1, 1, 12), (3, 10, 3, 2, 1, 1)]


def _inputs(c_in, c_out, k, groups, channels_last=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c_in, 7, 9, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in // groups, k, k, generator=g) * 0.3
    return x, w, torch.randn(c_out, generator=g)


@needs_fusion
@pytest.mark.parametrize('act', ['relu', 'gelu', 'silu', None])
@pytest.mark.parametrize('conv', CONVS)
@pytest.mark.parametrize('channels_last', [True, False])
def test_conv2d_act_matches_eager(conv, act, channels_last):
    c_in, c_out, k, stride, padding, groups = conv
    x, w, b = _inputs(c_in, c_out, k, groups, channels_last)
    want = F.conv2d(x, w, b, stride, padding, 1, groups)
    want = {'relu': F.relu, 'gelu': F.gelu, 'silu': F.silu,
            None: lambda t: t}[act](want)
    with torch.no_grad():
        assert can_fuse(x, w)
        got = conv2d_act(x, w, b, act, stride, padding, groups)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_fusion
@pytest.mark.parametrize('conv', CONVS)
def test_conv2d_add_writes_the_sum_into_the_residual(conv):
    c_in, c_out, k, stride, padding, groups = conv
    x, w, b = _inputs(c_in, c_out, k, groups)
    conv_out = F.conv2d(x, w, b, stride, padding, 1, groups)
    residual = torch.randn_like(conv_out)
    want = residual + conv_out
    with torch.no_grad():
        got = conv2d_add(residual, x, w, b, stride, padding, groups)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.data_ptr() == residual.data_ptr()


def test_with_gradients_nothing_is_fused_or_overwritten():
    x, w, b = _inputs(12, 20, 1, 1)
    w.requires_grad_()
    assert not can_fuse(x, w)
    residual = torch.randn(2, 20, 7, 9)
    kept = residual.clone()
    y = conv2d_add(residual, x, w, b)
    torch.testing.assert_close(residual, kept, rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.sum((0, 2, 3))[None, :, None, None]
                               .expand_as(w), rtol=1e-5, atol=1e-4)
    conv2d_act(x, w, b, 'gelu').sum().backward()  # eager, differentiable


@pytest.mark.parametrize('fn', ['act', 'add'])
def test_a_bias_that_needs_a_gradient_gets_it(fn):
    """Frozen weight, trainable bias (e.g. an eval-mode BatchNorm folded into
    a conv whose affine shift still trains): the fused op has no backward, so
    it must not run, and the bias gets the eager gradient."""
    x, w, b = _inputs(12, 20, 1, 1)
    b.requires_grad_()
    assert not can_fuse(x, w, b)
    residual = torch.randn(2, 20, 7, 9)
    if fn == 'act':
        y = conv2d_act(x, w, b, 'gelu')
        want = torch.autograd.grad(F.gelu(F.conv2d(x, w, b)).sum(), b)[0]
    else:
        y = conv2d_add(residual, x, w, b)
        want = torch.full_like(b, y[:, 0].numel())
    y.sum().backward()
    torch.testing.assert_close(b.grad, want, rtol=1e-5, atol=1e-4)


def test_autocast_keeps_the_eager_path():
    """Under CPU autocast the conv runs in bf16 as autocast decides, not as
    an fp32 fused op."""
    x, w, b = _inputs(12, 20, 1, 1)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert not can_fuse(x, w)
        assert conv2d_act(x, w, b, 'gelu').dtype == torch.bfloat16


def test_unknown_activation_is_named():
    x, w, b = _inputs(12, 20, 1, 1)
    with pytest.raises(ValueError, match="'elu'"):
        conv2d_act(x, w, b, 'elu')


@pytest.mark.parametrize('make_block, x_shape', [
    (lambda: MILABlock(16, 2), (2, 63, 16)),
    (lambda: VSSBlock(16, ssm_ratio=1.0), (2, 7, 9, 16)),
    (lambda: DesignBlock(16, 2, block='transformer'), (2, 63, 16)),
    (lambda: DesignBlock(16, 2, block='all'), (2, 63, 16)),
], ids=['mila', 'vmamba', 'design-transformer', 'design-all'])
def test_blocks_fused_equal_plain_and_keep_their_input(make_block, x_shape):
    """Inference with the CPU switch on (fused, sums written in place)
    against the plain computation (switch off), and against the block with
    gradients on; the caller's tensor is unchanged."""
    torch.manual_seed(0)
    block = make_block().eval()
    x = torch.randn(x_shape)
    args = (x, (7, 9)) if x.dim() == 3 else (x, )
    kept = x.clone()
    with torch.no_grad(), cpu_fusion(True):
        fast = block(*args)
    torch.testing.assert_close(x, kept, rtol=0, atol=0)
    with torch.no_grad(), cpu_fusion(False):
        plain = block(*args)
    slow = block(*args)  # gradients on: every sum out of place
    assert slow.requires_grad
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slow.detach(), plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, kept, rtol=0, atol=0)


@pytest.mark.parametrize('make', [
    lambda: MILA(arch=dict(embed_dims=16, depths=(1, 2, 1, 1),
                           num_heads=(1, 2, 2, 4))),
    lambda: VMamba(arch=dict(dims=16, depths=(1, 2, 1, 1), ssm_ratio=2.0,
                             d_state=1)),
], ids=['mila', 'vmamba'])
def test_backbones_with_and_without_the_switch(make):
    """Whole backbones: eval outputs, and training-mode outputs and
    gradients, the same with the CPU fast paths on and off."""
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 3, 45, 61)
    model.eval()
    with torch.no_grad():
        with cpu_fusion(True):
            fast = model(x)
        with cpu_fusion(False):
            plain = model(x)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    model.train()
    grads = []
    for enabled in (True, False):
        torch.manual_seed(1)  # the same drop-path masks
        with cpu_fusion(enabled):
            outs = model(x)
        loss = sum((o * o).mean() for o in outs)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def test_switch_off_is_the_plain_pytorch_composition(monkeypatch):
    """With the switch off no oneDNN-specific op runs."""
    calls = []
    import mila_det.models.layers.fused as fused
    for name in ('_POINTWISE_UNARY', '_POINTWISE_ADD_'):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _r=real, _n=name:
                            calls.append(_n) or _r(*a))
    model = MILA(arch=dict(embed_dims=16, depths=(1, 1, 1, 1),
                           num_heads=(1, 2, 2, 4))).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), cpu_fusion(False):
        model(x)
    assert calls == []
    if HAS_FUSED_CONV:
        with torch.no_grad(), cpu_fusion(True):
            model(x)
        assert calls
