"""Behaviour every backbone shares: shapes at any input size, gradients,
freezing, input checks, gradient checkpointing, state-dict round trips, and
the Triton backend against the PyTorch one (checkpoint loading is in
tests/utils/test_checkpoint.py)."""
import pytest
import torch

from mila_det.models.backbones import MILA, VMamba
from tests.conftest import needs_triton

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
    # a frozen stage really does not learn: no gradient, no change after an
    # optimiser step (with weight decay, which would move any parameter it
    # is given), and its BatchNorm statistics stay put
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1,
                                  weight_decay=0.5)
    outs = model(torch.randn(2, 3, 40, 40))
    if frozen < 4:
        sum(o.square().mean() for o in outs).backward()
        optimizer.step()
    frozen_names = [k for k in before
                    if any(k.startswith(pre) for pre in prefixes)]
    assert frozen_names
    for pname, p in model.named_parameters():
        frozen_param = any(pname.startswith(pre) for pre in prefixes)
        assert (p.grad is None) == frozen_param, pname
    after = model.state_dict()
    for key in frozen_names:
        assert torch.equal(after[key], before[key]), key
    if frozen < 4:
        assert any(not torch.equal(after[k], before[k]) for k in before
                   if k not in frozen_names)


@pytest.mark.parametrize('name', BACKBONES)
def test_wrong_channel_count_is_named(name):
    model = build(name)
    with pytest.raises(ValueError, match=r'in_channels=3.*\(2, 4, 32, 32\)'):
        model(torch.randn(2, 4, 32, 32))
    four = build(name, in_channels=4).eval()
    with torch.no_grad():
        assert len(four(torch.randn(1, 4, 32, 32))) == 4


def test_mila_norm_eval_and_norm_cfg():
    """MILA's stem and downsampling BatchNorms stay in eval mode while
    training (statistics untouched) unless norm_eval=False; norm_cfg picks
    the norm (GroupNorm here) under the checkpoint's names."""
    model = build('MILA')
    model.train()
    bns = [m for m in model.modules()
           if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    stats = [m.running_mean.clone() for m in bns]
    model(torch.randn(2, 3, 40, 40))
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bns, stats))
    trained = build('MILA', norm_eval=False).train()
    assert all(m.training for m in trained.modules()
               if isinstance(m, torch.nn.BatchNorm2d))
    gn = build('MILA', norm_cfg=dict(type='GN', num_groups=4)).eval()
    assert isinstance(gn.patch_embed.conv1.norm, torch.nn.GroupNorm)
    assert 'patch_embed.conv1.norm.weight' in gn.state_dict()
    with torch.no_grad():
        assert len(gn(torch.randn(1, 3, 40, 40))) == 4


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


@needs_triton()
@pytest.mark.parametrize('name', BACKBONES)
def test_triton_backend_matches_pytorch(name, monkeypatch):
    """The whole backbone with every operator on its Triton kernels (in the
    interpreter here) against the PyTorch paths: outputs and every
    parameter's gradient, training mode, a non-square input. VMamba at
    ``ssm_ratio=1``: the interpreter's time grows with the scan's channels,
    and twice as many test nothing more."""
    cls, args, _ = BACKBONES[name]
    if name == 'VMamba':
        args = dict(arch=dict(args['arch'], ssm_ratio=1.0))
    model = cls(**args, drop_path_rate=0.0).train()
    x = torch.randn(1, 3, 24, 40)
    results = []
    from mila_det.ops import use_backend
    for backend in ('torch', 'triton'):
        with use_backend(backend):
            outs = model(x)
            loss = sum((o * o).mean() for o in outs)
            results.append((outs, torch.autograd.grad(
                loss, list(model.parameters()))))
    (want, g_want), (got, g_got) = results
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for (pname, _), a, b in zip(model.named_parameters(), g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=pname)
