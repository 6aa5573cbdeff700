"""Behaviour of the MILA backbone: official fixtures, shapes at any size,
gradients, freezing, checkpointing and pretrained loading."""
import importlib
import re

import pytest
import torch

from mila_det.models.backbones import MILA, MLLA
from mila_det.models.backbones.mila import MILA_IGNORED_KEYS
from mila_det.ops import rope_table
from tests.conftest import reference_file

MINI_ARCH = dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))


def mini_mila(**kwargs) -> MILA:
    return MILA(arch=MINI_ARCH, drop_path_rate=0.0, **kwargs)


@pytest.fixture(scope='module')
def mila_reference():
    return torch.load(reference_file('mila_mini.pt'), weights_only=False)


def _mila_from_reference(ref) -> MILA:
    arch = ref['arch']
    model = MILA(arch=dict(embed_dims=arch.get('embed_dim', 32),
                           depths=arch.get('depths', (1, 1, 2, 1)),
                           num_heads=arch.get('num_heads', (1, 2, 4, 8))),
                 drop_path_rate=0.0)
    return model


def test_reference_fixture_reproduced(mila_reference):
    model = _mila_from_reference(mila_reference).eval()
    state = {k: v for k, v in mila_reference['state_dict'].items()
             if not k.endswith('rope.rotations')}
    missing, unexpected = model.load_state_dict(state, strict=True), None
    assert len(mila_reference['cases']) == 3
    with torch.no_grad():
        for case in mila_reference['cases']:
            outs = model(case['input'])
            assert len(outs) == len(case['outputs']) == 4
            for got, want in zip(outs, case['outputs']):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize('size', [(97, 131), (32, 32), (32, 200), (64, 64),
                                  (33, 47)],
                         ids=lambda s: f'{s[0]}x{s[1]}')
def test_output_shapes_any_size(size):
    model = mini_mila().eval()
    h, w = size
    with torch.no_grad():
        outs = model(torch.randn(2, 3, h, w))
    expected_h, expected_w = -(-h // 4), -(-w // 4)
    for i, out in enumerate(outs):
        assert out.shape == (2, 16 * 2**i, expected_h, expected_w)
        assert torch.isfinite(out).all()
        expected_h, expected_w = -(-expected_h // 2), -(-expected_w // 2)


def test_every_parameter_gets_a_gradient():
    model = MILA(arch=MINI_ARCH, drop_path_rate=0.1).train()
    outs = model(torch.randn(2, 3, 45, 61))
    sum(o.float().square().mean() for o in outs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_out_indices_and_norms():
    model = mini_mila(out_indices=(1, 3)).eval()
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 128]
    assert hasattr(model, 'norm1') and not hasattr(model, 'norm0')
    with pytest.raises(ValueError, match='out_indices'):
        mini_mila(out_indices=(4, ))


@pytest.mark.parametrize('frozen', [0, 1, 2, 4])
def test_frozen_stages(frozen):
    model = mini_mila(frozen_stages=frozen)
    model.train()
    frozen_prefixes = ['patch_embed.'] + [f'layers.{i}.' for i in range(frozen)]
    frozen_prefixes += [f'norm{i}.' for i in range(frozen)]
    for name, p in model.named_parameters():
        should_freeze = any(name.startswith(pre) for pre in frozen_prefixes)
        assert p.requires_grad != should_freeze, name
    # BatchNorms of frozen parts stay in eval mode through train().
    assert not model.patch_embed.training
    if frozen >= 1:
        assert not model.layers[0].downsample.training
    if frozen < 4:
        assert model.layers[frozen].training


def test_with_cp_matches_plain_forward_and_backward():
    torch.manual_seed(1)
    plain = mini_mila().train()
    ckpt = mini_mila(with_cp=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 40, 52)
    for m in (plain, ckpt):
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.eval()
    outs_a, outs_b = plain(x), ckpt(x)
    sum(o.sum() for o in outs_a).backward()
    sum(o.sum() for o in outs_b).backward()
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b)
    for (name, pa), pb in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_state_dict_round_trip(tmp_path):
    model = mini_mila().eval()
    path = tmp_path / 'mila.pth'
    torch.save(model.state_dict(), path)
    other = mini_mila().eval()
    other.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(1, 3, 37, 50)
    for a, b in zip(model(x), other(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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


def test_pretrained_imagenet_checkpoint(tmp_path, caplog):
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


def test_pretrained_coco_checkpoint(tmp_path):
    source = mini_mila()
    state = {f'backbone.{k}': v for k, v in source.state_dict().items()}
    state['neck.lateral_convs.0.conv.weight'] = torch.zeros(256, 16, 1, 1)
    path = tmp_path / 'mask_rcnn_mila.pth'
    torch.save({'state_dict': state, 'meta': {'epoch': 36}}, path)
    model = mini_mila(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_pretrained_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(ValueError, match='path is empty'):
        mini_mila(init_cfg=dict(type='Pretrained', checkpoint='')).init_weights()
    missing = tmp_path / 'nowhere' / 'MLLA_T.pth'
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        mini_mila(init_cfg=dict(type='Pretrained',
                                checkpoint=str(missing))).init_weights()
    other = MILA(arch=dict(embed_dims=32, depths=(1, 1, 1, 1),
                           num_heads=(1, 2, 2, 4)))
    path = tmp_path / 'wider.pth'
    torch.save({'model': other.state_dict()}, path)
    with pytest.raises(RuntimeError,
                       match=re.escape(str(path)) + r".*'patch_embed\.conv1"):
        mini_mila(init_cfg=dict(type='Pretrained',
                                checkpoint=str(path))).init_weights()
    path = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(64, 3, 7, 7)}}, path)
    with pytest.raises(RuntimeError, match="first key 'conv1.weight'"):
        mini_mila(init_cfg=dict(type='Pretrained',
                                checkpoint=str(path))).init_weights()


class Opaque:
    """A pickled object that weights_only=True refuses."""


def test_pretrained_prefers_weights_only(tmp_path):
    source = mini_mila()
    path = tmp_path / 'with_objects.pth'
    torch.save({'model': source.state_dict(), 'config': Opaque()}, path)
    model = mini_mila(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    from mmengine.logging import MMLogger
    MMLogger.get_instance('mila_det_test')
    model.init_weights()  # falls back, with a warning, for trusted files
    torch.testing.assert_close(model.patch_embed.conv1.conv.weight,
                               source.patch_embed.conv1.conv.weight)
