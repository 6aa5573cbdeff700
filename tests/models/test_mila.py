"""MILA-specific behaviour: the official fixture, the
authors' keywords and their ImageNet checkpoint layout (shared behaviour is
in test_backbones_common.py)."""

import pytest
import torch
import torch.nn.functional as F

from mila_det.models.backbones import MILA, MLLA
from mila_det.models.layers import ConvLayer, TokenLinear, dwconv_tokens
from mila_det.models.layers.fused import HAS_FUSED_CONV
from tests.conftest import (official_key_listing, reference_file,
                            shape_string)
from tests.models.reference import assert_reproduces

MINI_ARCH = dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))


def mini_mila(**kwargs) -> MILA:
    return MILA(arch=MINI_ARCH, drop_path_rate=0.0, **kwargs)


@pytest.fixture(scope='module')
def mila_reference():
    return torch.load(reference_file('mila_mini.pt'), weights_only=False)


def test_reference_fixture_reproduced(mila_reference):
    arch = mila_reference['arch']
    model = MILA(arch=dict(embed_dims=arch['embed_dim'], depths=arch['depths'],
                           num_heads=arch['num_heads']),
                 drop_path_rate=0.0).eval()
    state = {k: v for k, v in mila_reference['state_dict'].items()
             if not k.endswith('rope.rotations')}
    model.load_state_dict(state, strict=True)
    assert len(mila_reference['cases']) == 3
    assert_reproduces(model, mila_reference['cases'])


def test_arch_names_and_errors():
    assert MILA.arch_zoo['t'] == MILA.arch_zoo['tiny']
    with pytest.raises(KeyError, match='unknown arch'):
        MILA(arch='huge')
    with pytest.raises(ValueError, match='embed_dims'):
        MILA(arch=dict(depths=(1, 1, 1, 1)))


def test_training_step_after_inference_mode():
    """A training step right after an inference_mode forward (validation
    inside training) runs its backward and every parameter gets a
    gradient (an inference tensor saved for backward would raise)."""
    model = mini_mila()
    with torch.inference_mode():
        model.eval()(torch.randn(1, 3, 40, 56))
    model.train()
    outs = model(torch.randn(1, 3, 40, 56))
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mlla_alias_accepts_official_keywords():
    model = MLLA(img_size=224, patch_size=4, in_chans=3, num_classes=80,
                 embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
                 mlp_ratio=4, qkv_bias=True, qk_scale=None, drop_rate=0.,
                 drop_path_rate=0.3, use_checkpoint=True)
    assert model.layers[0].with_cp
    assert model.num_features == [16, 32, 64, 128]


# ---------------------------------------------------------------- loading
@pytest.mark.parametrize('arch', ['T', 'S', 'B'])
def test_official_key_listing(arch):
    """Every official detection tensor but the derived RoPE tables exists
    here with the same shape, and nothing else does."""
    sections = official_key_listing('mila_official_keys.txt')
    title, = [t for t in sections
              if t.startswith(f'MILA-{arch} official detection')]
    listing = {k: v for k, v in sections[title].items()
               if not k.endswith('rope.rotations')}
    model = MILA(arch.lower())
    ours = {k: shape_string(v) for k, v in model.state_dict().items()}
    assert ours == listing


@pytest.mark.parametrize('shape', [(2, 63, 60), (5, 16), (1, 3, 4, 60)],
                         ids=['tokens', '2d', '4d'])
def test_token_linear_is_a_linear(shape):
    """Same parameters, outputs and gradients as nn.Linear, any leading
    dims, and a non-contiguous input."""
    torch.manual_seed(0)
    fc = TokenLinear(shape[-1], 24)
    ref = torch.nn.Linear(shape[-1], 24)
    ref.load_state_dict(fc.state_dict())
    x = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2].requires_grad_()
    got, want = fc(x), ref(x)
    torch.testing.assert_close(got, want)
    do = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (x, fc.weight, fc.bias), do),
                    torch.autograd.grad(want, (x, ref.weight, ref.bias), do)):
        torch.testing.assert_close(a, b)
    # inference (the fused oneDNN path on CPU builds that have it), with an
    # activation, with a residual, and an empty batch
    with torch.no_grad():
        x = x.detach()
        torch.testing.assert_close(fc(x), want.detach())
        torch.testing.assert_close(fc(x, act='gelu'), F.gelu(want.detach()))
        residual = torch.randn_like(want)
        torch.testing.assert_close(fc(x, residual=residual.clone()),
                                   residual + want.detach())
        assert fc(x[:0]).shape == (0, *want.shape[1:])


def test_dwconv_tokens_reads_and_writes_tokens():
    conv = torch.nn.Conv2d(12, 12, 3, padding=1, groups=12)
    x = torch.randn(2, 7 * 9, 12)
    want = conv(x.transpose(1, 2).reshape(2, 12, 7, 9)).flatten(2)
    got = dwconv_tokens(conv, x, (7, 9))
    torch.testing.assert_close(got, want.transpose(1, 2))
    assert got.is_contiguous()
    x.requires_grad_()
    got = dwconv_tokens(conv, x, (7, 9), residual=True)
    want = x + dwconv_tokens(conv, x, (7, 9))
    torch.testing.assert_close(got, want)
    do = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (x, conv.weight), do),
                    torch.autograd.grad(want, (x, conv.weight), do)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match='residual form'):
        dwconv_tokens(torch.nn.Conv2d(12, 12, 3, padding=1), x, (7, 9),
                      residual=True)


def test_dwconv_tokens_adds_into_the_given_tokens():
    """``add_to + conv(x)`` (LePE's sum): equal to the plain sum; written
    into add_to's memory where no gradient is needed (on CPU with oneDNN's
    conv-add), never into it where one is."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 12, 3, padding=1, groups=12)
    x, add_to = torch.randn(2, 7 * 9, 12), torch.randn(2, 7 * 9, 12)
    conv_out = conv(x.transpose(1, 2).reshape(2, 12, 7, 9))
    want = add_to + conv_out.flatten(2).transpose(1, 2)
    with torch.no_grad():
        got = dwconv_tokens(conv, x, (7, 9), add_to=add_to.clone())
        torch.testing.assert_close(got, want.detach())
        target = add_to.clone()
        got = dwconv_tokens(conv, x, (7, 9), add_to=target)
    if HAS_FUSED_CONV:
        assert got.data_ptr() == target.data_ptr()
    leaf = add_to.clone().requires_grad_()
    target = leaf * 1.0  # an activation that autograd still needs
    got = dwconv_tokens(conv, x, (7, 9), add_to=target)
    torch.testing.assert_close(target.detach(), add_to, rtol=0, atol=0)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert conv.weight.grad is not None and leaf.grad is not None
    with pytest.raises(ValueError, match='add_to alone'):
        dwconv_tokens(conv, x, (7, 9), residual=True, add_to=add_to)


def test_conv_layer_folds_batchnorm_in_eval():
    torch.manual_seed(0)
    layer = ConvLayer(6, 10, 3, 2, 1, bias=True)
    layer.norm.running_mean.uniform_(-1, 1)
    layer.norm.running_var.uniform_(0.5, 2)
    torch.nn.init.uniform_(layer.norm.weight, 0.5, 1.5)
    torch.nn.init.uniform_(layer.norm.bias, -1, 1)
    layer.eval()
    x = torch.randn(2, 6, 7, 9)
    want = torch.relu(layer.norm(layer.conv(x)))
    with torch.no_grad():  # the fused path where the build has it
        torch.testing.assert_close(layer(x), want.detach())
    got = layer(x)
    torch.testing.assert_close(got, want)
    # gradients still reach the conv and norm parameters, and the BN shift
    # alone when everything else is frozen
    got.sum().backward()
    assert layer.conv.weight.grad is not None
    assert layer.norm.weight.grad is not None
    want_shift_grad = layer.norm.bias.grad.clone()
    layer.zero_grad()
    for p in (layer.conv.weight, layer.conv.bias, layer.norm.weight):
        p.requires_grad_(False)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.norm.bias.grad, want_shift_grad)
    layer.train()
    out = layer(x)  # batch statistics, running stats updated
    assert not torch.allclose(out, want)
