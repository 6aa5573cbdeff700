"""Behaviour every backbone shares: shapes at any input size, gradients,
freezing, gradient checkpointing, state-dict round trips, and the errors of
pretrained loading."""
import re

import pytest
import torch

from mila_det.models.backbones import MILA, VMamba

BACKBONES = {
    'MILA': (MILA, dict(arch=dict(embed_dims=16, depths=(1, 1, 1, 1),
                                  num_heads=(1, 2, 2, 4))), 'norm'),
    'VMamba': (VMamba, dict(arch=dict(dims=16, depths=(1, 1, 1, 1),
                                      ssm_ratio=2.0, d_state=2)), 'outnorm'),
}
WIDTHS = [16, 32, 64, 128]


def build(name, **kwargs):
    cls, args, _ = BACKBONES[name]
    kwargs.setdefault('drop_path_rate', 0.0)
    return cls(**args, **kwargs)


@pytest.mark.parametrize('name', BACKBONES)
@pytest.mark.parametrize('size', [(97, 131), (32, 32), (32, 200), (64, 64),
                                  (33, 47)],
                         ids=lambda s: f'{s[0]}x{s[1]}')
def test_output_shapes_any_size(name, size):
    model = build(name).eval()
    h, w = size
    with torch.no_grad():
        outs = model(torch.randn(2, 3, h, w))
    assert len(outs) == 4
    exp_h, exp_w = -(-h // 4), -(-w // 4)
    for i, out in enumerate(outs):
        assert out.shape == (2, WIDTHS[i], exp_h, exp_w)
        assert out.is_contiguous() and torch.isfinite(out).all()
        exp_h, exp_w = -(-exp_h // 2), -(-exp_w // 2)


@pytest.mark.parametrize('name', BACKBONES)
def test_empty_batch(name):
    """A batch of no images (e.g. a filtered-out batch) gives empty maps of
    the right shapes, not an error."""
    with torch.no_grad():
        outs = build(name).eval()(torch.randn(0, 3, 45, 61))
    assert [tuple(o.shape) for o in outs] == [
        (0, 16, 12, 16), (0, 32, 6, 8), (0, 64, 3, 4), (0, 128, 2, 2)]


@pytest.mark.parametrize('name', BACKBONES)
def test_every_parameter_gets_a_gradient(name):
    model = build(name, drop_path_rate=0.1).train()
    outs = model(torch.randn(2, 3, 45, 61))
    assert all(torch.isfinite(o).all() for o in outs)
    sum(o.square().mean() for o in outs).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize('name', BACKBONES)
@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-5),
                                        (torch.bfloat16, 0.05)],
                         ids=['float64', 'bfloat16'])
def test_runs_in_other_dtypes(name, dtype, tol):
    """A model cast with ``.to(dtype)`` returns that dtype and the fp32
    result to the dtype's precision (bf16 keeps ~3 significant digits)."""
    torch.manual_seed(0)
    model = build(name).eval()
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        want = model(x)
        got = model.to(dtype)(x.to(dtype))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        err = (g.float() - w).abs().max() / w.abs().max()
        assert err < tol, f'{dtype}: relative error {err:.2g}'


@pytest.mark.parametrize('name', BACKBONES)
def test_out_indices(name):
    norm = BACKBONES[name][2]
    model = build(name, out_indices=(1, 3)).eval()
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 128]
    assert hasattr(model, f'{norm}1') and not hasattr(model, f'{norm}0')
    with pytest.raises(ValueError, match='out_indices'):
        build(name, out_indices=(4, ))
    with pytest.raises(ValueError, match='frozen_stages'):
        build(name, frozen_stages=5)


@pytest.mark.parametrize('name', BACKBONES)
@pytest.mark.parametrize('frozen', [0, 1, 2, 4])
def test_frozen_stages(name, frozen):
    norm = BACKBONES[name][2]
    model = build(name, frozen_stages=frozen)
    model.train()
    prefixes = ['patch_embed.'] + [f'layers.{i}.' for i in range(frozen)]
    prefixes += [f'{norm}{i}.' for i in range(frozen)]
    for pname, p in model.named_parameters():
        frozen_param = any(pname.startswith(pre) for pre in prefixes)
        assert p.requires_grad != frozen_param, pname
    assert not model.patch_embed.training
    for i in range(4):
        assert model.layers[i].training == (i >= frozen)
    # a frozen stage really does not learn
    outs = model(torch.randn(2, 3, 40, 40))
    if frozen < 4:
        sum(o.sum() for o in outs).backward()
    assert all(p.grad is None for p in model.patch_embed.parameters())


@pytest.mark.parametrize('name', BACKBONES)
def test_with_cp_matches_plain(name):
    plain = build(name).train()
    ckpt = build(name, with_cp=True).train()
    ckpt.load_state_dict(plain.state_dict())
    for m in (plain, ckpt):  # same BN statistics in both runs
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.eval()
    x = torch.randn(1, 3, 40, 52)
    outs_a, outs_b = plain(x), ckpt(x)
    sum(o.sum() for o in outs_a).backward()
    sum(o.sum() for o in outs_b).backward()
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b)
    for (pname, pa), pb in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=pname)


@pytest.mark.parametrize('name', BACKBONES)
def test_state_dict_round_trip(name, tmp_path):
    model = build(name).eval()
    path = tmp_path / 'backbone.pth'
    torch.save(model.state_dict(), path)
    other = build(name).eval()
    other.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(1, 3, 37, 50)
    for a, b in zip(model(x), other(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('name', BACKBONES)
def test_coco_checkpoint_loads(name, tmp_path):
    source = build(name)
    state = {f'backbone.{k}': v for k, v in source.state_dict().items()}
    state['neck.lateral_convs.0.conv.weight'] = torch.zeros(256, 16, 1, 1)
    path = tmp_path / 'mask_rcnn.pth'
    torch.save({'state_dict': state, 'meta': {'epoch': 36}}, path)
    model = build(name, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


@pytest.mark.parametrize('name', BACKBONES)
def test_pretrained_errors_name_the_file_and_key(name, tmp_path):
    def load(path):
        build(name, init_cfg=dict(type='Pretrained',
                                  checkpoint=path)).init_weights()

    with pytest.raises(ValueError, match='path is empty'):
        load('')
    missing = tmp_path / 'nowhere' / 'weights.pth'
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load(str(missing))
    cls, args, _ = BACKBONES[name]
    wider = {k: (v * 2 if k in ('embed_dims', 'dims') else v)
             for k, v in args['arch'].items()}
    path = tmp_path / 'wider.pth'
    torch.save({'model': cls(arch=wider).state_dict()}, path)
    with pytest.raises(RuntimeError, match=re.escape(str(path)) +
                       r".*'patch_embed\..*another architecture"):
        load(str(path))
    path = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(64, 3, 7, 7)}},
               path)
    with pytest.raises(RuntimeError, match="first key 'conv1.weight'"):
        load(str(path))


class Opaque:
    """A pickled object that weights_only=True refuses."""


@pytest.mark.parametrize('name', BACKBONES)
def test_pretrained_prefers_weights_only(name, tmp_path, monkeypatch):
    source = build(name)
    safe = tmp_path / 'safe.pth'
    torch.save({'model': source.state_dict()}, safe)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get('weights_only'))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, 'load', spy)
    build(name, init_cfg=dict(type='Pretrained',
                              checkpoint=str(safe))).init_weights()
    assert calls == [True]
    # a trusted file with other pickled objects still loads, after a warning
    unsafe = tmp_path / 'with_objects.pth'
    torch.save({'model': source.state_dict(), 'config': Opaque()}, unsafe)
    calls.clear()
    model = build(name, init_cfg=dict(type='Pretrained',
                                      checkpoint=str(unsafe)))
    model.init_weights()
    assert calls == [True, False]
    torch.testing.assert_close(model.state_dict(), source.state_dict())
