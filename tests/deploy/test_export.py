"""Deployable backbones: the ``mila_det`` custom ops (values and gradients
against the references), ``torch.compile`` without graph breaks,
``torch.export`` of the full-width backbones, and ONNX round trips through
onnxruntime (tools/deploy/export_onnx.py)."""
import importlib.util
import sys

import pytest
import torch

import mila_det  # noqa: F401  (registers the backbones and the ops)
from mila_det.models.backbones import MILA, VMamba
from mila_det.ops._custom_ops import (chunked_recurrence,
                                      export_cross_selective_scan,
                                      export_forget_gate_attention,
                                      export_linear_attention)
from mila_det.ops.cross_scan.naive import naive_cross_merge, naive_cross_scan
from mila_det.ops.cross_selective_scan.naive import naive_cross_selective_scan
from mila_det.ops.forget_gate import (forget_gate_attention,
                                     naive_forget_gate_attention)
from mila_det.ops.linear_attention.naive import (build_rope_table,
                                                 naive_linear_attention)
from tests.conftest import REPO_ROOT, rel_err
from tests.helpers import TINY_MILA

TINY_VMAMBA = dict(dims=16, depths=(1, 1, 1, 1), ssm_ratio=1.0, d_state=1)
OPS = torch.ops.mila_det


def tiny_backbone(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == 'mila':
        return MILA(arch=TINY_MILA, drop_path_rate=0.0)
    return VMamba(arch=TINY_VMAMBA, drop_path_rate=0.0)


def attention_inputs(b=2, n=7 * 9, c=16, requires_grad=False):
    q, k = (torch.randn(b, n, c).sigmoid() + 0.5 for _ in range(2))
    v = torch.randn(b, n, c)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def scan_inputs(b=2, inner=8, h=5, w=7, rank=2, n_state=2,
                requires_grad=False):
    tensors = [torch.randn(b, inner, h, w),
               torch.randn(4, rank + 2 * n_state, inner) * 0.5,
               torch.randn(4, inner, rank) * 0.5,
               torch.randn(4, inner) * 0.5 - 1.0,
               torch.rand(4 * inner, n_state).add(0.5).log(),
               torch.randn(4 * inner)]
    return [t.requires_grad_(requires_grad) for t in tensors]


def forget_gate_inputs(b=2, n=7 * 9, heads=2, d=4, requires_grad=False):
    """q, k positive ``[B, L, H*d]``, v, a positive step, A negative."""
    q, k = (torch.randn(b, n, heads * d).sigmoid() + 0.5 for _ in range(2))
    v = torch.randn(b, n, heads * d)
    delta = torch.rand(b, n, heads * d) * 0.5 + 0.05
    A = -torch.rand(heads * d, d) - 0.1
    return [t.requires_grad_(requires_grad) for t in (q, k, v, delta, A)]


def grads(out, inputs, weight):
    return torch.autograd.grad((out * weight).sum(), inputs)


# --------------------------------------------------------------------------
# The ops against the references
# --------------------------------------------------------------------------
def test_linear_attention_op_values_and_grads_match_reference():
    q, k, v = attention_inputs(requires_grad=True)
    rope = build_rope_table(7, 9, 16)
    want = naive_linear_attention(q, k, v, 4, rope)
    got = OPS.linear_attention(q, k, v, rope, 4, 1e-6)
    assert rel_err(got, want) < 1e-5
    weight = torch.randn_like(want)
    for g, w in zip(grads(got, (q, k, v), weight),
                    grads(want, (q, k, v), weight)):
        assert rel_err(g, w) < 1e-5


def test_cross_selective_scan_op_values_and_grads_match_reference():
    inputs = scan_inputs(requires_grad=True)
    want = naive_cross_selective_scan(*inputs)
    got = OPS.cross_selective_scan(*inputs)
    assert got.shape == (2, 5, 7, 8) and got.is_contiguous()
    assert rel_err(got, want) < 1e-5
    weight = torch.randn_like(want)
    for g, w in zip(grads(got, inputs, weight), grads(want, inputs, weight)):
        assert rel_err(g, w) < 1e-4


@pytest.mark.parametrize('normalize,scale_input',
                         [(True, False), (False, True)],
                         ids=['normalised', 'scaled-input'])
def test_forget_gate_op_values_and_grads_match_reference(normalize,
                                                         scale_input):
    inputs = forget_gate_inputs(requires_grad=True)
    want = naive_forget_gate_attention(*inputs, 2, 1e-6, normalize,
                                       scale_input)
    got = OPS.forget_gate_attention(*inputs, 2, 1e-6, normalize,
                                    scale_input)
    assert rel_err(got, want) < 1e-5
    weight = torch.randn_like(want)
    for g, w in zip(grads(got, inputs, weight), grads(want, inputs, weight)):
        assert rel_err(g, w) < 1e-4
    # compiled, the public function is that one node
    torch._dynamo.reset()
    explained = torch._dynamo.explain(forget_gate_attention)(
        *inputs, 2, 1e-6, normalize, scale_input)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert 'mila_det.forget_gate_attention' in str(
        explained.graphs[0].graph)


def test_cross_scan_and_merge_ops_match_reference_and_are_adjoint():
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    y = OPS.cross_scan(x)
    assert torch.equal(y, naive_cross_scan(x))
    weight = torch.randn_like(y)
    (gx, ) = grads(y, (x, ), weight)
    assert torch.allclose(gx, naive_cross_merge(weight, 5, 7).view_as(x),
                          atol=1e-6)
    merged = OPS.cross_merge(y, 5, 7)
    assert torch.allclose(merged, naive_cross_merge(y, 5, 7))


@pytest.mark.parametrize('length', [1, 5, 16, 37], ids=lambda n: f'L{n}')
def test_chunked_recurrence_matches_the_sequential_one(length):
    a = torch.rand(length, 6, dtype=torch.float64)
    b = torch.randn(length, 6, dtype=torch.float64)
    h, want = torch.zeros(6, dtype=torch.float64), []
    for t in range(length):
        h = a[t] * h + b[t]
        want.append(h)
    want = torch.stack(want)
    assert torch.allclose(chunked_recurrence(a, b), want, atol=1e-12)
    assert torch.allclose(OPS.linear_recurrence(a, b), want, atol=1e-12)


def test_linear_recurrence_op_gradcheck():
    a = torch.rand(11, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(OPS.linear_recurrence, (a, b))


def test_export_decompositions_match_reference():
    q, k, v = attention_inputs()
    rope = build_rope_table(7, 9, 16)
    assert rel_err(export_linear_attention(q, k, v, rope, 4, 1e-6),
                   naive_linear_attention(q, k, v, 4, rope)) < 1e-5
    inputs = scan_inputs(h=9, w=11)  # L = 99: chunks and a padded tail
    assert rel_err(export_cross_selective_scan(*inputs),
                   naive_cross_selective_scan(*inputs)) < 1e-5
    gate = forget_gate_inputs(n=37)
    for normalize, scale in ((True, False), (False, True)):
        assert rel_err(
            export_forget_gate_attention(*gate, 2, 1e-6, normalize, scale),
            naive_forget_gate_attention(*gate, 2, 1e-6, normalize,
                                        scale)) < 1e-5


@pytest.mark.parametrize('name', ['linear_attention', 'cross_selective_scan',
                                  'cross_scan', 'cross_merge',
                                  'linear_recurrence',
                                  'forget_gate_attention'])
def test_opcheck(name):
    """Schema, fake implementation, autograd registration and AOT dispatch
    of every op, as torch.library checks them."""
    if name == 'linear_attention':
        args = (*attention_inputs(n=12, requires_grad=True),
                build_rope_table(3, 4, 16), 4, 1e-6)
    elif name == 'cross_selective_scan':
        args = tuple(scan_inputs(b=1, h=3, w=4, requires_grad=True))
    elif name == 'cross_scan':
        args = (torch.randn(1, 2, 3, 4, requires_grad=True), )
    elif name == 'cross_merge':
        args = (torch.randn(1, 4, 2, 12, requires_grad=True), 3, 4)
    elif name == 'forget_gate_attention':
        args = (*forget_gate_inputs(b=1, n=5, requires_grad=True), 2, 1e-6,
                True, False)
    else:
        args = (torch.rand(6, 3, requires_grad=True),
                torch.randn(6, 3, requires_grad=True))
    torch.library.opcheck(getattr(OPS, name).default, args)


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['mila', 'vmamba'])
def test_compile_has_no_graph_breaks_and_one_node_per_op(name):
    """``torch._dynamo.explain`` counts no graph break; the one graph
    holds each block's operator as one ``mila_det`` node and, compiled,
    computes the eager outputs."""
    model = tiny_backbone(name).eval()
    x = torch.randn(1, 3, 50, 70)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=keep_graph, fullgraph=True)(x)
        want = model(x)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    op = (OPS.linear_attention.default if name == 'mila' else
          OPS.cross_selective_scan.default)
    nodes = [n for n in graphs[0].graph.nodes
             if n.op == 'call_function' and 'mila_det' in str(n.target)]
    assert len(nodes) == 4, [str(n.target) for n in nodes]  # one per block
    assert all(n.target in (op, op.overloadpacket) for n in nodes)


def test_compiled_ops_match_reference_gradients():
    """The public functions under ``torch.compile`` (AOT autograd through
    the fake implementations and the backward ops), with a full graph,
    against the references."""
    q, k, v = attention_inputs(requires_grad=True)
    scan = scan_inputs(requires_grad=True)

    def both(q, k, v, *scan):
        from mila_det.ops import cross_selective_scan, linear_attention
        return (linear_attention(q, k, v, 4, (7, 9)),
                cross_selective_scan(*scan))

    torch._dynamo.reset()
    compiled = torch.compile(both, backend='aot_eager', fullgraph=True)
    got = compiled(q, k, v, *scan)
    want = (naive_linear_attention(q, k, v, 4, (7, 9)),
            naive_cross_selective_scan(*scan))
    inputs = (q, k, v, *scan)
    weights = [torch.randn_like(w) for w in want]
    got_grads = torch.autograd.grad(
        sum((w * o).sum() for w, o in zip(weights, got)), inputs)
    want_grads = torch.autograd.grad(
        sum((w * o).sum() for w, o in zip(weights, want)), inputs)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    for g, w in zip(got_grads, want_grads):
        assert rel_err(g, w) < 1e-4


# --------------------------------------------------------------------------
# torch.export of the full-width backbones
# --------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['mila', 'vmamba'])
def test_torch_export_full_width_backbone(name):
    torch.manual_seed(0)
    model = (MILA('tiny') if name == 'mila' else VMamba('tiny')).eval()
    x = torch.randn(1, 3, 224, 320)
    with torch.no_grad():
        program = torch.export.export(model, (x, ))
    op = (OPS.linear_attention.default if name == 'mila' else
          OPS.cross_selective_scan.default)
    count = sum(n.target == op for n in program.graph.nodes)
    assert count == sum(model.arch_settings['depths'])


# --------------------------------------------------------------------------
# ONNX through onnxruntime
# --------------------------------------------------------------------------
def export_tool():
    """tools/deploy/export_onnx.py as a module."""
    pytest.importorskip('onnxruntime', reason='onnxruntime is not installed '
                        '(pip install mila_det[deploy]; make test installs '
                        'it)')
    pytest.importorskip('onnxscript', reason='onnxscript is not installed '
                        '(pip install mila_det[deploy])')
    name = 'mila_det_export_onnx_tool'
    if name not in sys.modules:
        path = REPO_ROOT / 'tools' / 'deploy' / 'export_onnx.py'
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # onnxscript reads the function's module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize('name', ['mila', 'vmamba'])
def test_onnx_round_trip_fixed_and_dynamic_sizes(name, tmp_path):
    """Exported at an odd fixed size, and with dynamic H, W at a second size
    and run at two; onnxruntime matches PyTorch."""
    tool = export_tool()
    torch.manual_seed(0)
    if name == 'mila':  # two stages: half the graph to export
        model = MILA(arch=dict(embed_dims=16, depths=(1, 1),
                               num_heads=(1, 2)), out_indices=(0, 1))
    else:
        model = VMamba(arch=dict(dims=16, depths=(1, 1), ssm_ratio=1.0,
                                 d_state=1), out_indices=(0, 1))
    model.eval()
    fixed = tool.export_onnx(model, (50, 70), str(tmp_path / 'fix.onnx'))
    result = tool.check_onnx(model, fixed, (50, 70), repeat=0)
    assert result['max_abs_err'] < 1e-4, result
    dynamic = tool.export_onnx(model, (64, 96), str(tmp_path / 'dyn.onnx'),
                               dynamic=True)
    for shape in ((64, 96), (96, 160)):
        result = tool.check_onnx(model, dynamic, shape, repeat=0)
        assert result['max_abs_err'] < 1e-4, (shape, result)


@pytest.mark.parametrize('name', ['mila', 'vmamba'])
def test_stock_onnx_exporter_at_an_odd_fixed_size(name, tmp_path):
    """``torch.onnx.export(model, (x, ), f, dynamo=True)``, with nothing of
    mila_det called first: every op lowers to its decomposition (the scan's
    carry unrolled, no Scan) and onnxruntime matches PyTorch."""
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    torch.manual_seed(0)
    if name == 'mila':
        model = MILA(arch=dict(embed_dims=16, depths=(1, 1),
                               num_heads=(1, 2)), out_indices=(0, 1))
    else:  # N = 2 states: the scan's state axis is not squeezed away
        model = VMamba(arch=dict(dims=16, depths=(1, 1), ssm_ratio=1.0,
                                 d_state=2), out_indices=(0, 1))
    model.eval()
    x = torch.randn(1, 3, 45, 67)
    path = str(tmp_path / 'stock.onnx')
    torch.onnx.export(model, (x, ), path, dynamo=True)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert rel_err(torch.from_numpy(g), w) < 1e-4
