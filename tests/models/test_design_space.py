"""The design-space backbone (LinearAttentionTransformer): the counts of
every row, the attention of every switch against its definition, shapes,
gradients, freezing, errors naming the switch, and every Mask R-CNN config
of configs/design_space/ taking a training step."""
import glob
import os.path as osp

import pytest
import torch
import torch.nn.functional as F

from mila_det.analysis.design_space import (design_space_flop_analyzer,
                                            forget_gate_macs)
from mila_det.models.backbones.design_space import (
    DESIGN_ROWS, MILA_DESIGN, PUBLISHED, LinearAttentionTransformer,
    resolve_switches)
from mila_det.models.layers.design_block import LinearAttention, phi
from mila_det.ops import rope_table
from mila_det.ops.linear_attention.naive import global_linear_attention
from mila_det.ops.forget_gate import naive_forget_gate_attention
from mila_det.ops.linear_attention import apply_rope
from tests.conftest import (REPO_ROOT, official_key_listing,
                            reference_file, shape_string)
from tests.helpers import narrow_heads
from tests.models.reference import assert_reproduces

TINY = dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
ROWS = list(DESIGN_ROWS)

# Parameters of each row in classification form (backbone + final norm +
# Linear(768 -> 1000)), counted by hand from each row's layout (the readings
# of docs/design_space.md); they round to the paper's Table 1/2 columns.
SPEC_PARAMS_M = {
    'baseline': 28.27, 'input_gate': 28.54, 'forget_gate': 28.68,
    'shortcut': 28.27, 'no_norm': 28.27, 'single_head': 24.23,
    'block_sub': 30.47, 'block_all': 32.66, 'ape': 29.70, 'lepe': 28.31,
    'cpe': 28.35, 'rope': 28.27,
}


def tiny(design, **kwargs):
    kwargs.setdefault('drop_path_rate', 0.0)
    return LinearAttentionTransformer(arch=TINY, design=design, **kwargs)


@pytest.mark.parametrize('row', sorted(SPEC_PARAMS_M))
def test_parameter_count_of_each_row(row):
    model = LinearAttentionTransformer(design=row, out_indices=(3, ))
    params = sum(p.numel() for p in model.parameters()) + 768 * 1000 + 1000
    assert round(params / 1e6, 2) == SPEC_PARAMS_M[row]
    if row not in ('block_sub', 'block_all'):  # the unresolved rows
        assert round(params / 1e6) == PUBLISHED[row][0]


@pytest.mark.parametrize('row', ROWS)
@pytest.mark.parametrize('size', [(45, 61), (32, 32), (33, 97)],
                         ids=lambda s: f'{s[0]}x{s[1]}')
def test_output_shapes_any_size(row, size):
    h, w = size
    with torch.no_grad():
        outs = tiny(row).eval()(torch.randn(2, 3, h, w))
    exp_h, exp_w = -(-h // 4), -(-w // 4)
    for i, out in enumerate(outs):
        assert out.shape == (2, 16 * 2**i, exp_h, exp_w)
        assert out.is_contiguous() and torch.isfinite(out).all()
        exp_h, exp_w = -(-exp_h // 2), -(-exp_w // 2)


def test_empty_batch():
    with torch.no_grad():
        outs = tiny('mila_like_forget_gate').eval()(torch.randn(0, 3, 45, 61))
    assert [tuple(o.shape) for o in outs] == [
        (0, 16, 12, 16), (0, 32, 6, 8), (0, 64, 3, 4), (0, 128, 2, 2)]


@pytest.mark.parametrize('row', ROWS)
def test_every_parameter_gets_a_gradient(row):
    model = tiny(row, drop_path_rate=0.1).train()
    outs = model(torch.randn(2, 3, 37, 50))
    sum(o.square().mean() for o in outs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_frozen_stages_and_out_indices():
    model = tiny('forget_gate', frozen_stages=2, out_indices=(1, 3)).train()
    assert not hasattr(model, 'norm0') and hasattr(model, 'norm3')
    outs = model(torch.randn(1, 3, 40, 56))
    assert [o.shape[1] for o in outs] == [32, 128]
    sum(o.sum() for o in outs).backward()
    for name, p in model.named_parameters():
        frozen = name.startswith(('patch_embed', 'layers.0', 'layers.1',
                                  'norm1'))
        assert p.requires_grad != frozen, name
        assert (p.grad is None) == frozen, name
    assert not model.layers[1].training and model.layers[2].training


def test_with_cp_gives_the_same_outputs_and_gradients():
    torch.manual_seed(1)
    plain = tiny('mila_like_forget_gate').train()
    ckpt = tiny('mila_like_forget_gate', with_cp=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 33, 47)
    grads = []
    for m in (plain, ckpt):
        out = m(x.clone().requires_grad_())
        sum(o.square().sum() for o in out).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])


def test_init():
    model = tiny('forget_gate', shortcut=True, pos_encodings=('ape', ))
    attn = model.layers[0].blocks[0].attn
    torch.testing.assert_close(attn.A_log[3], torch.log(torch.arange(
        1.0, 17.0)))
    assert (attn.D == 1).all() and (attn.absolute_pos_embed == 0).all()
    step = F.softplus(attn.forget_gate.up.bias)
    assert (step > 0.9e-3).all() and (step < 0.11).all()
    assert attn.input_gate is None


def definition(q, k, v, heads, normalize, q_num=None, k_num=None,
               v_num=None, eps=1e-6):
    """Non-causal linear attention token by token, head by head (fp64)."""
    q_num = q if q_num is None else q_num
    k_num = k if k_num is None else k_num
    v_num = v if v_num is None else v_num
    b, n, c = q.shape
    dk, dv = c // heads, v.shape[-1] // heads
    out = torch.zeros(b, n, v.shape[-1], dtype=torch.float64)
    for h in range(heads):
        sk, sv = slice(h * dk, (h + 1) * dk), slice(h * dv, (h + 1) * dv)
        for i in range(n):
            num = sum(torch.outer(k_num[0, j, sk], v_num[0, j, sv])
                      for j in range(n))
            num = q_num[0, i, sk] @ num
            den = q[0, i, sk] @ k[0, :, sk].sum(0) + eps if normalize else n
            out[0, i, sv] = num / den
    return out


@pytest.mark.parametrize('normalize', [True, False])
@pytest.mark.parametrize('heads,dk', [(2, 6), (1, 4)])
def test_global_linear_attention_against_definition(normalize, heads, dk):
    n = 7
    q, k = phi(torch.randn(1, n, heads * dk, dtype=torch.float64)), phi(
        torch.randn(1, n, heads * dk, dtype=torch.float64))
    v = torch.randn(1, n, heads * 5, dtype=torch.float64)
    gate = torch.rand_like(v)
    qr, kr = torch.randn_like(q), torch.randn_like(k)
    got = global_linear_attention(q, k, v, heads, normalize, q_num=qr,
                                  k_num=kr, v_num=gate * v)
    want = definition(q, k, v, heads, normalize, qr, kr, gate * v)
    torch.testing.assert_close(got, want)


def attention(**switches):
    torch.manual_seed(0)
    attn = LinearAttention(dim=8, num_heads=2, project_v=True,
                           ape_grid=(3, 5), **switches).double()
    with torch.no_grad():  # non-trivial values for the zero/one inits
        for name, p in attn.named_parameters():
            if name in ('D', 'absolute_pos_embed'):
                p.normal_()
    return attn


def split(attn, x, hw):
    """q, k (after phi, with APE), v, as the module forms them."""
    proj = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    d = attn.qk_dim
    q, k, v = proj[..., :d], proj[..., d:2 * d], proj[..., 2 * d:]
    if attn.absolute_pos_embed is not None:
        k = k + attn.ape_tokens(hw)
    return phi(q), phi(k), v


@pytest.mark.parametrize('switches', [
    dict(), dict(input_gate=True), dict(shortcut=True),
    dict(normalize=False), dict(single_head=True, single_head_dim=4),
    dict(pos_encodings=('ape', )), dict(pos_encodings=('lepe', )),
    dict(pos_encodings=('rope', )),
    dict(pos_encodings=('rope', ), input_gate=True),
    dict(pos_encodings=('rope', ), single_head=True, single_head_dim=4),
    dict(mean_normaliser=True, eps=0.5),
    dict(pos_encodings=('rope', ), mean_normaliser=True, eps=0.5),
], ids=lambda s: '-'.join(f'{k}' for k in s) or 'baseline')
def test_attention_switches_against_definition(switches):
    """Every switch against :func:`definition`; MILA's normaliser
    ``q . mean(k) + eps`` is the definition's ``q . sum(k) + N eps`` (a
    large eps so the two forms differ measurably)."""
    attn = attention(**switches)
    hw = (3, 5)
    x = torch.randn(1, 15, 8, dtype=torch.float64)
    q, k, v = split(attn, x, hw)
    v_num = v if attn.input_gate is None else attn.input_gate(x) * v
    q_num = k_num = None
    if attn.use_rope:
        table = rope_table(*hw, attn.qk_dim).double()
        q_num, k_num = apply_rope(q, table), apply_rope(k, table)
    eps = attn.eps * 15 if attn.mean_normaliser else attn.eps
    want = definition(q, k, v, attn.num_heads, attn.normalize, q_num, k_num,
                      v_num, eps=eps)
    if attn.D is not None:
        want = want + attn.D * v
    if attn.lepe is not None:
        conv = attn.lepe(v.view(1, 3, 5, 8).permute(0, 3, 1, 2))
        want = want + conv.permute(0, 2, 3, 1).reshape(1, 15, 8)
    with torch.no_grad():
        got = attn(x, hw)
    torch.testing.assert_close(got, want)


def test_rope_row_uses_mila_operator_with_the_same_normaliser():
    """The RoPE row runs MILA's operator (normaliser ``q . mean(k) + eps``)
    with eps / N, which is exactly ``q . sum(k) + eps``."""
    attn = attention(pos_encodings=('rope', )).float()
    hw = (3, 5)
    x = torch.randn(1, 15, 8)
    q, k, v = split(attn, x, hw)
    table = rope_table(*hw, 8)
    want = global_linear_attention(q, k, v, 2, True, attn.eps,
                                   apply_rope(q, table), apply_rope(k, table))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, hw), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('switches', [
    dict(), dict(normalize=False), dict(scale_input=True),
    dict(input_gate=True, shortcut=True),
    dict(pos_encodings=('rope', )),
    dict(single_head=True, single_head_dim=4, pos_encodings=('rope', )),
    dict(mean_normaliser=True, eps=0.5),
], ids=lambda s: '-'.join(s) or 'plain')
def test_forget_gate_against_naive_scan(switches):
    attn = attention(forget_gate=True, **switches)
    hw = (3, 5)
    x = torch.randn(1, 15, 8, dtype=torch.float64)
    q, k, v = split(attn, x, hw)
    v_num = v if attn.input_gate is None else attn.input_gate(x) * v
    delta = attn.forget_gate(x)
    A = -torch.exp(attn.A_log)
    with torch.no_grad():
        if attn.use_rope:
            table = rope_table(*hw, attn.qk_dim).double()
            num = naive_forget_gate_attention(
                apply_rope(q, table), apply_rope(k, table), v_num, delta, A,
                attn.num_heads, normalize=False)
            dk = attn.qk_dim // attn.num_heads
            den = (q.view(1, 15, attn.num_heads, dk) * k.view(
                1, 15, attn.num_heads, dk).cumsum(1)).sum(-1) + attn.eps
            want = (num.view(1, 15, attn.num_heads, -1) / den[..., None]).view(
                1, 15, 8)
        else:
            eps = attn.eps * 15 if attn.mean_normaliser else attn.eps
            want = naive_forget_gate_attention(
                q, k, v_num, delta, A, attn.num_heads, eps=eps,
                normalize=attn.normalize, scale_input=attn.scale_input)
            if not attn.normalize:
                want = want / 15
        if attn.D is not None:
            want = want + attn.D * v
        got = attn(x, hw)
    torch.testing.assert_close(got, want)


def test_forget_gate_scan_is_counted_analytically():
    attn = LinearAttention(dim=12, num_heads=3, project_v=True,
                           forget_gate=True).eval()
    x = torch.randn(1, 20, 12)
    with torch.no_grad():
        analyzer = design_space_flop_analyzer(attn, (x, (4, 5)))
        ops = analyzer.by_operator()
    # the scan, one node of the selective scan's op, without D
    assert ops['selective_scan_chunk'] == \
        forget_gate_macs(1, 20, 12, 4) == 9 * 20 * 12 * 4
    # the projections: qkv, and the step's two linears
    assert ops['linear'] == 20 * (12 * 36 + 12 * 1 + 1 * 12)
    assert set(ops) == {'selective_scan_chunk', 'linear'}


def test_design_kwargs_override_the_row():
    sw = resolve_switches('mila_like_forget_gate', forget_gate=False)
    assert sw['block'] == 'sub' and sw['forget_gate'] is False
    assert sw['pos_encodings'] == ('lepe', 'cpe', 'rope')
    assert resolve_switches() == resolve_switches('baseline')


@pytest.mark.parametrize('kwargs,words', [
    (dict(design='gate'), ['design']),
    (dict(block='mamba'), ['block']),
    (dict(pos_encodings=('ape', 'sinusoid')), ['pos_encodings', 'sinusoid']),
    (dict(pos_encodings='rope'), ['pos_encodings']),
    (dict(pos_encodings=('rope', 'rope')), ['pos_encodings']),
    (dict(input_gate='yes'), ['input_gate']),
    (dict(normalize=1), ['normalize']),
    (dict(single_head_dim=0), ['single_head_dim']),
    (dict(scale_input=True), ['scale_input', 'forget_gate']),
    (dict(single_head=True, single_head_dim=30, pos_encodings=('rope', )),
     ['single_head', 'rope']),
    (dict(stem='swin'), ['stem']),
    (dict(downsample='pool'), ['downsample']),
    (dict(mean_normaliser=1), ['mean_normaliser']),
])
def test_bad_switches_raise_errors_naming_them(kwargs, words):
    with pytest.raises(ValueError) as err:
        LinearAttentionTransformer(arch=TINY, **kwargs)
    for word in words:
        assert word in str(err.value)


def test_bad_arch_errors():
    with pytest.raises(ValueError, match='num_heads'):
        LinearAttentionTransformer(arch=dict(embed_dims=16, depths=(1, 1),
                                             num_heads=(3, 3)),
                                   out_indices=(0, 1))
    with pytest.raises(ValueError, match='rope'):
        LinearAttentionTransformer(arch=dict(embed_dims=6, depths=(1, ),
                                             num_heads=(1, )),
                                   out_indices=(0, ), pos_encodings=('rope', ))


# MILA as a point of the space, every setting spelled out: the 'sub' block
# with CPE, LePE and RoPE, the normaliser of the authors' code, MILA's
# convolutional stem and downsampling.
MILA_POINT = dict(block='sub', pos_encodings=('cpe', 'lepe', 'rope'),
                  mean_normaliser=True, stem='conv', downsample='conv')


def test_mila_backbone_is_the_mila_point():
    """``MILA`` is the design-space backbone at MILA's point: the same
    state-dict layout, and the same outputs from the same weights."""
    from mila_det.models.backbones import MILA
    assert dict(MILA_DESIGN, pos_encodings=set(MILA_DESIGN['pos_encodings'])
                ) == dict(MILA_POINT, pos_encodings={'cpe', 'lepe', 'rope'})
    mila = MILA(arch=TINY, drop_path_rate=0.0).eval()
    point = tiny(None, **MILA_POINT).eval()
    point.load_state_dict(mila.state_dict(), strict=True)
    x = torch.randn(1, 3, 37, 50)
    with torch.no_grad():
        for a, b in zip(mila(x), point(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mila_fixtures_through_the_design_space_backbone(tmp_path):
    """The official MILA outputs of tests/data/reference/mila_mini.pt (a
    small random model of the authors' code), from the design-space
    backbone at MILA's point: the official state dict, saved as the
    official files are (with a classifier, its final norm and the RoPE
    tables), loads strictly through ``init_cfg`` and every case matches at
    the MILA fixture's tolerance."""
    ref = torch.load(reference_file('mila_mini.pt'), weights_only=False)
    arch = ref['arch']
    state = dict(ref['state_dict'])
    for key in ref['state_dict']:  # the tables the official blocks hold
        if key.endswith('attn.qk.weight'):
            c = state[key].shape[1]
            state[key.replace('qk.weight', 'rope.rotations')] = torch.zeros(
                56 // c, 56 // c, c // 2, 2)
    width = arch['embed_dim'] * 8
    state.update({'norm.weight': torch.ones(width),
                  'norm.bias': torch.zeros(width),
                  'head.weight': torch.zeros(10, width),
                  'head.bias': torch.zeros(10)})
    path = tmp_path / 'mila_mini.pth'
    torch.save({'model': state}, path)
    model = LinearAttentionTransformer(
        arch=dict(embed_dims=arch['embed_dim'], depths=arch['depths'],
                  num_heads=arch['num_heads']),
        drop_path_rate=0.0, **MILA_POINT,
        init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    assert type(model) is LinearAttentionTransformer
    model.init_weights()
    model.eval()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref['state_dict'][key]), key
    assert len(ref['cases']) == 3
    assert_reproduces(model, ref['cases'])  # the MILA fixture's tolerance


def test_mila_t_point_has_the_official_keys():
    """At MILA-T's widths the MILA point has every tensor of the official
    MILA-T detection checkpoint (but the derived RoPE tables) with its
    shape, and nothing else (built on the meta device)."""
    title, = [t for t in official_key_listing('mila_official_keys.txt')
              if t.startswith('MILA-T official detection')]
    listing = {k: v for k, v in
               official_key_listing('mila_official_keys.txt')[title].items()
               if not k.endswith('rope.rotations')}
    with torch.device('meta'):
        model = LinearAttentionTransformer(
            arch=dict(embed_dims=64, depths=(2, 4, 8, 4),
                      num_heads=(2, 4, 8, 16)), **MILA_POINT)
    ours = {k: shape_string(v) for k, v in model.state_dict().items()}
    assert ours == listing


@pytest.mark.parametrize('stem,downsample', [('conv', 'merge'),
                                             ('patch', 'conv')])
def test_mixed_macro_designs(stem, downsample):
    """Either stem with either downsampling: shapes at an odd size and a
    gradient for every parameter."""
    model = tiny('rope', stem=stem, downsample=downsample).train()
    outs = model(torch.randn(1, 3, 37, 50))
    assert [tuple(o.shape) for o in outs] == [
        (1, 16, 10, 13), (1, 32, 5, 7), (1, 64, 3, 4), (1, 128, 2, 2)]
    sum(o.square().mean() for o in outs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


DS_CONFIGS = sorted(
    c for c in glob.glob(osp.join(REPO_ROOT, 'configs', 'design_space',
                                  '*.py'))
    if not osp.basename(c).startswith('_'))


def test_a_config_per_row():
    names = {osp.basename(c)[len('mask_rcnn_ds_'):-len('_1x.py')]
             for c in DS_CONFIGS}
    assert names == set(DESIGN_ROWS)


@pytest.mark.parametrize('path', DS_CONFIGS,
                         ids=lambda p: osp.basename(p)[:-3])
def test_config_builds_and_takes_a_training_step(path):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from mila_det.utils.synthetic import synthetic_det_batch
    register_all_modules()
    cfg = Config.fromfile(path)
    row = osp.basename(path)[len('mask_rcnn_ds_'):-len('_1x.py')]
    bb = cfg.model.backbone
    assert (bb.type, bb.design, bb.arch) == ('LinearAttentionTransformer',
                                             row, 'tiny')
    assert cfg.model.neck.in_channels == [96, 192, 384, 768]
    assert cfg.custom_imports.imports == ['mila_det']
    # Narrow and shallow (full width checks nothing more here, and costs
    # ~10 s a row): the row's switches, the detector and the step are the
    # config's own.
    cfg.model.backbone.arch = dict(embed_dims=32, depths=(1, 1, 1, 1),
                                   num_heads=(1, 2, 4, 8))
    cfg.model.neck.in_channels = [32, 64, 128, 256]
    narrow_heads(cfg, 32)
    frozen = 1 if row == 'baseline' else -1
    cfg.model.backbone.frozen_stages = frozen
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    images, samples = synthetic_det_batch(1, 96, 160)
    data = model.data_preprocessor(
        dict(inputs=[(images[0] * 50 + 110).clamp(0, 255)],
             data_samples=samples), True)
    losses = model(**data, mode='loss')
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total)
    total.backward()
    for name, p in model.backbone.named_parameters():
        is_frozen = frozen >= 1 and name.startswith(
            ('patch_embed', 'layers.0', 'norm0'))
        assert p.requires_grad != is_frozen, name
        assert (p.grad is None) == is_frozen, name
