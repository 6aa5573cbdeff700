"""MILA-specific behaviour: the official fixture, the RoPE cache, the
authors' keywords and their ImageNet checkpoint layout (shared behaviour is
in test_backbones_common.py)."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from mila_det.models.backbones import MILA, MLLA
from mila_det.models.layers import ConvLayer, TokenLinear, dwconv_tokens
from mila_det.ops import rope_table
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


def test_rope_table_is_cached_and_reused():
    """One table per stage grid, shared by all blocks and later calls."""
    la = importlib.import_module('mila_det.ops.linear_attention')
    la.ROPE_CACHE.clear()
    model = MILA(arch=dict(embed_dims=16, depths=(2, 2, 2, 2),
                           num_heads=(1, 1, 1, 1))).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 40, 56))
        model(torch.randn(1, 3, 40, 56))
    assert (la.ROPE_CACHE.misses, la.ROPE_CACHE.hits) == (4, 4)
    assert rope_table(10, 14, 16) is rope_table(10, 14, 16)


def test_rope_cache_is_bounded_and_multiscale_training_does_not_thrash():
    """Multi-scale training: COCO's 3x recipe resizes the short side to one
    of 11 sizes (480..800), batches padded to a multiple of 32. Cycling
    through those grids twice misses once per grid and stage (nothing
    evicted inside the budget); a budget of a few tables evicts the oldest
    and stays within its bytes."""
    la = importlib.import_module('mila_det.ops.linear_attention')
    grids = [(-(-short // 32) * 8, -(-(short * 5 // 3) // 32) * 8)
             for short in range(480, 801, 32)]
    cache = la.RopeTableCache()
    for _ in range(2):
        for h, w in grids:
            for stage in range(4):
                cache.get(-(-h // 2**stage), -(-w // 2**stage),
                          64 * 2**stage, torch.device('cpu'))
    assert cache.misses == 4 * len(grids)
    assert cache.hits == 4 * len(grids)
    small = la.RopeTableCache(max_bytes=40 * 2**20)  # a few stage-1 tables
    for h, w in grids:
        small.get(h, w, 64, torch.device('cpu'))
        assert small.nbytes <= small.max_bytes
    assert 0 < len(small.tables) < len(grids)
    h, w = grids[-1]
    assert (h, w, 64, torch.device('cpu')) in small.tables  # the newest


def test_rope_table_from_inference_mode_usable_in_training():
    """A table cached during inference_mode is a normal tensor: a training
    step that reuses it runs its backward and every parameter gets a
    gradient (an inference tensor saved for backward would raise)."""
    model = mini_mila()
    with torch.inference_mode():
        model.eval()(torch.randn(1, 3, 40, 56))
    table = rope_table(10, 14, 16)
    assert not table.is_inference()
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


def test_a_table_over_the_budget_is_not_cached_and_evicts_nothing():
    la = importlib.import_module('mila_det.ops.linear_attention')
    cache = la.RopeTableCache(max_bytes=40_000)
    small = [cache.get(5, 5, 16, torch.device('cpu')) for _ in range(2)]
    assert len(cache.tables) == 1 and small[0] is small[1]
    big = cache.get(50, 50, 16, torch.device('cpu'))  # 160 KB
    assert big.shape == (2500, 8, 2) and len(cache.tables) == 1
