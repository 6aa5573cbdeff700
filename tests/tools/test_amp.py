"""Mixed precision: a Mask R-CNN + MILA training step under bf16 autocast on
CPU (what ``tools/train.py --amp`` uses without a GPU) stays finite, also at
1333x800 where stage 1 holds 66k tokens."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from mila_det.engine import CPUAutocastOptimWrapper
from mila_det.utils.synthetic import synthetic_det_batch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize('shape', [(256, 320), (800, 1333)],
                         ids=['256x320', '800x1333'])
def test_autocast_training_step_is_finite(shape):
    register_all_modules()
    cfg = Config.fromfile(osp.join(REPO_ROOT,
                                   'configs/demo/mask_rcnn_mila_demo.py'))
    cfg.model.backbone.arch = dict(embed_dims=16, depths=(1, 1, 1, 1),
                                   num_heads=(1, 2, 2, 4))
    cfg.model.neck.in_channels = [16, 32, 64, 128]
    model = MODELS.build(cfg.model)
    model.init_weights()
    wrapper = CPUAutocastOptimWrapper(
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4))
    images, samples = synthetic_det_batch(1, *shape)
    data = dict(inputs=[(img * 50 + 110).clamp(0, 255) for img in images],
                data_samples=samples)
    model.train()
    before = [p.detach().clone() for p in model.backbone.parameters()]
    seen = []
    model.backbone.register_forward_hook(
        lambda mod, inp, out: seen.append(out[0].dtype))
    log = model.train_step(data, wrapper)
    assert seen == [torch.bfloat16]  # the backbone really ran under autocast
    assert all(torch.isfinite(v).all() for v in log.values()), log
    assert log['loss_mask'] > 0
    after = list(model.backbone.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_autocast_keeps_attention_sums_in_fp32():
    from mila_det.ops import linear_attention
    q = torch.rand(1, 200 * 336, 32) + 0.5
    k = torch.rand(1, 200 * 336, 32) + 0.5
    v = torch.randn(1, 200 * 336, 32)
    want = linear_attention(q, k, v, 2, (200, 336))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 2,
                               (200, 336))
    assert torch.isfinite(got).all()
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 1e-2
