"""VMamba-specific behaviour: the official fixtures, the authors' keywords
and ImageNet checkpoint layout (shared behaviour is in
test_backbones_common.py)."""
import pytest
import torch

from mila_det.models.backbones import MM_VSSM, VMamba
from mila_det.models.layers import Linear2d
from mila_det.utils.checkpoint import load_pretrained
from tests.conftest import (official_key_listing, reference_file,
                            shape_string)


@pytest.mark.parametrize('fixture', ['vmamba_mini_r2_n1.pt',
                                     'vmamba_mini_r1_n4.pt'])
def test_reference_fixtures_reproduced(fixture):
    ref = torch.load(reference_file(fixture), weights_only=False)
    arch = ref['arch']
    model = VMamba(arch=dict(dims=arch['dims'], depths=arch['depths'],
                             ssm_ratio=arch['ssm_ratio'],
                             d_state=arch['ssm_d_state']),
                   drop_path_rate=0.0).eval()
    model.load_state_dict(ref['state_dict'], strict=True)
    assert list(model.state_dict()) == list(ref['state_dict'])
    assert ref['cases']
    with torch.no_grad():
        for case in ref['cases']:
            outs = model(case['input'])
            assert len(outs) == len(case['outputs']) == 4
            for got, want in zip(outs, case['outputs']):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_official_parameter_counts():
    """Tiny / small backbones as in the official state dicts."""
    assert sum(p.numel() for p in VMamba('tiny').parameters()) == 29_481_408
    assert sum(p.numel() for p in VMamba('small').parameters()) == 49_380_096


@pytest.mark.parametrize('arch, title', [
    ('tiny', 'VMamba-T official detection backbone state dict'),
    ('small', 'VMamba-S official detection backbone state dict')])
def test_official_key_listing(arch, title):
    """Same keys, same order, same shapes as the official state dicts."""
    listing = official_key_listing('vmamba_official_keys.txt')[title]
    ours = {k: shape_string(v) for k, v in VMamba(arch).state_dict().items()}
    assert list(ours) == list(listing)
    assert ours == listing


def test_linear2d_loads_conv_shaped_weights():
    layer = Linear2d(4, 6, bias=False)
    weight = torch.randn(6, 4, 1, 1)
    layer.load_state_dict({'weight': weight})
    torch.testing.assert_close(layer.weight, weight.flatten(1))


def test_imagenet_checkpoint_drops_classifier(tmp_path):
    arch = dict(dims=16, depths=(1, 1, 1, 1), ssm_ratio=1.0, d_state=1)
    source = VMamba(arch=arch)
    state = {k: v for k, v in source.state_dict().items()
             if not k.startswith('outnorm')}
    state['classifier.norm.weight'] = torch.ones(128)
    state['classifier.head.weight'] = torch.zeros(1000, 128)
    path = tmp_path / 'vssm_mini.pth'
    torch.save({'model': state}, path)
    model = VMamba(arch=arch)
    report = load_pretrained(model, str(path), ignore=model.ignored_keys)
    assert sorted(report.missing) == sorted(
        f'outnorm{i}.{p}' for i in range(4) for p in ('weight', 'bias'))
    assert report.unexpected == [] and len(report.ignored) == 2


def test_d_state_must_be_positive():
    with pytest.raises(ValueError, match='d_state must be >= 1'):
        VMamba(arch=dict(dims=16, depths=(1, 1, 1, 1), ssm_ratio=1.0,
                         d_state=0))


def test_mm_vssm_accepts_the_authors_config():
    """Keys of the authors' mask_rcnn_vssm_fpn_coco_tiny config."""
    model = MM_VSSM(
        out_indices=(0, 1, 2, 3), pretrained='', dims=16,
        depths=(1, 1, 1, 1), ssm_d_state=1, ssm_dt_rank='auto',
        ssm_ratio=1.0, ssm_conv=3, ssm_conv_bias=False,
        forward_type='v05_noz', mlp_ratio=4.0, downsample_version='v3',
        patchembed_version='v2', drop_path_rate=0.2, norm_layer='ln2d',
        embed_dims=96, num_heads=[3, 6, 12, 24], window_size=7)
    assert model.num_features == [16, 32, 64, 128]
    with pytest.raises(ValueError, match="forward_type='v05_noz'"):
        MM_VSSM(dims=16, depths=(1, 1, 1, 1), forward_type='v2')
