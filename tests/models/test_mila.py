"""MILA-specific behaviour: the official fixture, the RoPE cache, the
authors' keywords and their ImageNet checkpoint layout (shared behaviour is
in test_backbones_common.py)."""
import importlib
import re

import pytest
import torch
import torch.nn.functional as F

from mila_det.models.backbones import MILA, MLLA
from mila_det.models.backbones.mila import MILA_IGNORED_KEYS, ConvLayer
from mila_det.models.layers.mila_block import TokenLinear, dwconv_tokens
from mila_det.ops import rope_table
from tests.conftest import (official_key_listing, reference_file,
                            shape_string)

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
    with torch.no_grad():
        for case in mila_reference['cases']:
            outs = model(case['input'])
            assert len(outs) == len(case['outputs']) == 4
            for got, want in zip(outs, case['outputs']):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_arch_names_and_errors():
    assert MILA.arch_zoo['t'] == MILA.arch_zoo['tiny']
    with pytest.raises(KeyError, match='unknown arch'):
        MILA(arch='huge')
    with pytest.raises(ValueError, match='embed_dims'):
        MILA(arch=dict(depths=(1, 1, 1, 1)))


def test_rope_table_is_cached_and_reused(monkeypatch):
    la = importlib.import_module("mila_det.ops.linear_attention")
    calls = []
    real = la.build_rope_table

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    la._rope_table_cached.cache_clear()
    monkeypatch.setattr(la, 'build_rope_table', counting)
    model = MILA(arch=dict(embed_dims=16, depths=(2, 2, 2, 2),
                           num_heads=(1, 1, 1, 1))).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 40, 56))
        model(torch.randn(1, 3, 40, 56))
    # one table per stage size, for all blocks and both calls
    assert len(calls) == 4
    assert rope_table(10, 14, 16) is rope_table(10, 14, 16)


def test_rope_table_from_inference_mode_usable_in_training():
    model = mini_mila()
    with torch.inference_mode():
        model.eval()(torch.randn(1, 3, 40, 56))
    model.train()
    outs = model(torch.randn(1, 3, 40, 56))
    sum(o.sum() for o in outs).backward()


def test_mlla_alias_accepts_official_keywords():
    model = MLLA(img_size=224, patch_size=4, in_chans=3, num_classes=80,
                 embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
                 mlp_ratio=4, qkv_bias=True, qk_scale=None, drop_rate=0.,
                 drop_path_rate=0.3, use_checkpoint=True)
    assert model.layers[0].with_cp
    assert model.num_features == [16, 32, 64, 128]


# ---------------------------------------------------------------- loading
def _official_imagenet_state(model: MILA) -> dict:
    """A state dict shaped like an official ImageNet release of ``model``."""
    state = {k: v.clone() for k, v in model.state_dict().items()
             if not re.match(r'norm\d\.', k)}
    c = model.num_features[-1]
    state['norm.weight'] = torch.ones(c)
    state['norm.bias'] = torch.zeros(c)
    state['head.weight'] = torch.zeros(1000, c)
    state['head.bias'] = torch.zeros(1000)
    for i, layer in enumerate(model.layers):
        for j, _ in enumerate(layer.blocks):
            state[f'layers.{i}.blocks.{j}.attn.rope.rotations'] = torch.zeros(
                7, 7, model.num_features[i] // 2, 2)
    return state


def test_pretrained_imagenet_checkpoint(tmp_path):
    source = mini_mila()
    path = tmp_path / 'MLLA_mini.pth'
    torch.save({'model': _official_imagenet_state(source), 'epoch': 300},
               path)
    model = mini_mila(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    from mila_det.utils.checkpoint import load_pretrained
    report = load_pretrained(model, str(path), ignore=MILA_IGNORED_KEYS)
    assert sorted(report.missing) == sorted(
        f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias'))
    assert report.unexpected == []
    assert len(report.ignored) == 4 + 4  # head, final norm, 4 rope tables
    model.init_weights()
    for key, value in source.state_dict().items():
        if not key.startswith('norm'):
            torch.testing.assert_close(model.state_dict()[key], value)


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
