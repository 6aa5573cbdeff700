"""Deployable backbones: the ``mila_det`` custom ops (registration, export
lowerings, compiled training steps), ``torch.compile`` without graph breaks,
``torch.export`` of the full-width backbones, and ONNX round trips through
onnxruntime (tools/deploy/export_onnx.py)."""
import importlib.util
import sys

import pytest
import torch

import mila_det  # noqa: F401  (registers the backbones and the ops)
from mila_det.models.backbones import MILA, VMamba
from mila_det.ops._export import chunked_recurrence, unrolled_recurrence
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
# The ops: registration, export lowerings, compiled training steps
# --------------------------------------------------------------------------
def chunk_scan_args(n_state=2, reverse=False, with_d=True):
    """Token-major scan inputs ``[B, G, L, Dg]`` with a tail chunk."""
    b, g, length, dg = 2, 2, 11, 3
    tensors = [torch.randn(b, g, length, dg), torch.rand(b, g, length, dg),
               -torch.rand(g * dg, n_state) - 0.1,
               torch.randn(b, g, length, n_state),
               torch.randn(b, g, length, n_state),
               torch.randn(g * dg) if with_d else None,
               torch.randn(g * dg) if with_d else None]
    tensors = [None if t is None else t.requires_grad_() for t in tensors]
    return (*tensors, with_d, reverse, with_d)


def op_cases():
    """(id, FastPathOp, args) for every op registered on every machine,
    and the Triton ones where Triton imports (run by the interpreter)."""
    from mila_det.ops._export import linear_recurrence
    from mila_det.ops.linear_attention.parallel import \
        linear_attention_parallel
    from mila_det.ops.selective_scan.chunk import selective_scan_chunk
    rope = build_rope_table(3, 4, 16)
    cases = [
        ('linear_attention_parallel', linear_attention_parallel,
         (*attention_inputs(n=12, requires_grad=True), 4, rope, 1e-6)),
        ('selective_scan_chunk-N2', selective_scan_chunk, chunk_scan_args()),
        ('selective_scan_chunk-N1-reverse', selective_scan_chunk,
         chunk_scan_args(n_state=1, reverse=True)),
        ('selective_scan_chunk-no-D', selective_scan_chunk,
         chunk_scan_args(with_d=False)),
        ('linear_recurrence', linear_recurrence,
         (torch.rand(6, 3, requires_grad=True),
          torch.randn(6, 3, requires_grad=True))),
    ]
    from mila_det.ops import HAS_TRITON
    if HAS_TRITON:
        from mila_det.ops.cross_scan.triton import (cross_merge_triton,
                                                    cross_scan_triton)
        from mila_det.ops.linear_attention.triton import \
            linear_attention_triton
        from mila_det.ops.selective_scan.triton import selective_scan_triton
        u = torch.randn(1, 4, 9, requires_grad=True)
        cases += [
            ('linear_attention_triton', linear_attention_triton,
             (*attention_inputs(n=12, requires_grad=True), 4, rope, 1e-6)),
            ('selective_scan_triton', selective_scan_triton,
             (u, torch.rand_like(u).requires_grad_(),
              -torch.rand(4, 2, requires_grad=True),
              torch.randn(1, 2, 2, 9, requires_grad=True),
              torch.randn(1, 2, 2, 9, requires_grad=True), None, None, False,
              True, 4)),
            ('cross_scan_triton', cross_scan_triton,
             (torch.randn(1, 2, 3, 4, requires_grad=True), )),
            ('cross_merge_triton', cross_merge_triton,
             (torch.randn(1, 4, 2, 12, requires_grad=True), 3, 4)),
        ]
    return cases


CASES = {case[0]: case for case in op_cases()}


@pytest.mark.parametrize('case', list(CASES))
def test_opcheck(case):
    """Schema, fake implementation (shapes, dtypes, strides), autograd
    registration and AOT dispatch of every op, as torch.library checks
    them."""
    _, op, args = CASES[case]
    torch.library.opcheck(op.default, args)


@pytest.mark.parametrize('case', list(CASES))
def test_export_lowering_matches_the_op(case):
    """What each op lowers to for export (its definition, or the chunked
    recurrence for the scans) computes the op's output."""
    from mila_det.ops._op import EXPORT_LOWERINGS
    _, op, args = CASES[case]
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    with torch.no_grad():
        want = op(*args)
        got = EXPORT_LOWERINGS[op.default](*args)
        got = got[0] if op.residuals else got
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize('act', ['relu', 'gelu', 'silu'])
def test_onednn_conv_lowering_matches_onednn(act):
    """The export lowering of oneDNN's conv with an activation, which
    ``conv2d_act`` calls as it is, computes what oneDNN computes (strided,
    grouped, channels-last)."""
    from mila_det.models.layers import fused
    from mila_det.ops._op import EXPORT_LOWERINGS
    if not fused.HAS_FUSED_CONV:
        pytest.skip('this torch build has no oneDNN fused convolution')
    op = torch.ops.mkldnn._convolution_pointwise.default
    x = torch.randn(1, 8, 7, 9).to(memory_format=torch.channels_last)
    weight, bias = torch.randn(16, 4, 3, 3), torch.randn(16)
    _, attr, algorithm = fused.ACTIVATIONS[act]
    args = (x, weight, bias, [1, 1], [2, 2], [1, 1], 2, attr, [], algorithm)
    with torch.no_grad():
        want = op(*args)
        got = EXPORT_LOWERINGS[op](*args)
        with fused.cpu_fusion(False):
            plain = fused.conv2d_act(x, weight, bias, act, 2, 1, 2)
    assert rel_err(got, want) < 1e-5
    assert rel_err(plain, want) < 1e-5


@pytest.mark.parametrize('memory_format',
                         [torch.channels_last, torch.contiguous_format],
                         ids=['channels_last', 'contiguous'])
def test_conv_add_op_writes_the_sum_into_the_residual(memory_format):
    """``mila_det::conv2d_add_``, which ``conv2d_add`` calls where no
    gradient is needed: oneDNN on CPU tensors and its plain decomposition
    (what traced graphs hold) each add the conv into the residual's memory
    as the plain composition does (strided, grouped), and torch.library's
    checks find the mutation declared."""
    from mila_det.models.layers import fused
    if not fused.HAS_FUSED_CONV:
        pytest.skip('this torch build has no oneDNN fused convolution')
    x = torch.randn(1, 8, 7, 9).to(memory_format=memory_format)
    residual = torch.randn(1, 16, 4, 5).to(memory_format=memory_format)
    weight, bias = torch.randn(16, 4, 3, 3), torch.randn(16)
    args = (x, weight, bias, [2, 2], [1, 1], 2)
    op = torch.ops.mila_det.conv2d_add_.default
    torch.library.opcheck(op, (residual.clone(), *args),
                          test_utils=('test_schema', 'test_faketensor'))
    with torch.no_grad(), fused.cpu_fusion(False):
        want = fused.conv2d_add(residual, x, weight, bias, 2, 1, 2)
    for run in (op, op.decompose):
        got = residual.clone()
        assert run(got, *args) in (None, NotImplemented)
        assert rel_err(got, want) < 1e-5, run
    with torch.no_grad():
        fast = residual.clone()
        assert fused.conv2d_add(fast, x, weight, bias, 2, 1, 2) is fast
    assert rel_err(fast, want) < 1e-5


@pytest.mark.parametrize('case', ['linear_attention_parallel',
                                  'selective_scan_chunk-N2'])
def test_compiled_training_step_runs_forward_and_backward_once(
        case, monkeypatch):
    """A ``torch.compile``d training step (AOT autograd, full graph) calls
    the path's forward once and its backward once, as eager does: the
    backward op works from the saved tensors and never re-runs the
    forward. Its gradients equal eager's."""
    _, op, args = CASES[case]
    calls = dict(forward=0, backward=0)
    forward, backward = op.forward, op.backward

    def counted_forward(*a):
        calls['forward'] += 1
        return forward(*a)

    def counted_backward(*a):
        calls['backward'] += 1
        return backward(*a)

    monkeypatch.setattr(op, 'forward', counted_forward)
    monkeypatch.setattr(op, 'backward', counted_backward)
    tensors = [a for a in args
               if isinstance(a, torch.Tensor) and a.requires_grad]

    def step(*a):
        return op(*a).square().sum()

    torch._dynamo.reset()
    loss = torch.compile(step, backend='aot_eager', fullgraph=True)(*args)
    got = torch.autograd.grad(loss, tensors)
    assert calls == dict(forward=1, backward=1)
    want = torch.autograd.grad(step(*args), tensors)
    assert calls == dict(forward=2, backward=2)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_mixed_devices_are_refused_by_name():
    """A tensor on another device would reach the fake (meta) kernel and
    come back as garbage; the op names it instead."""
    from mila_det.ops.linear_attention.parallel import \
        linear_attention_parallel
    q, k, v = attention_inputs(n=12)
    with pytest.raises(ValueError, match='v is on meta'):
        linear_attention_parallel(q, k, v.to('meta'), 4,
                                  build_rope_table(3, 4, 16), 1e-6)


def test_export_decompositions_match_reference():
    """The export module's scan (chunked recurrence, padded tail) against
    the definitions, through the public functions' compositions."""
    from mila_det.ops._export import export_selective_scan
    from mila_det.ops.selective_scan.naive import naive_selective_scan
    u = torch.randn(2, 6, 37)
    args = (u, torch.rand_like(u), -torch.rand(6, 3), torch.randn(2, 2, 3, 37),
            torch.randn(2, 2, 3, 37), torch.randn(6), torch.randn(6))
    for softplus, scale in ((True, True), (False, False)):
        assert rel_err(export_selective_scan(*args, softplus, scale),
                       naive_selective_scan(*args, softplus, scale)) < 1e-5


@pytest.mark.parametrize('length', [1, 5, 16, 37], ids=lambda n: f'L{n}')
def test_chunked_recurrence_matches_the_sequential_one(length):
    from mila_det.ops._export import linear_recurrence
    a = torch.rand(length, 6, dtype=torch.float64)
    b = torch.randn(length, 6, dtype=torch.float64)
    h, want = torch.zeros(6, dtype=torch.float64), []
    for t in range(length):
        h = a[t] * h + b[t]
        want.append(h)
    want = torch.stack(want)
    assert torch.allclose(chunked_recurrence(a, b), want, atol=1e-12)
    assert torch.allclose(unrolled_recurrence(a, b), want, atol=1e-12)
    assert torch.allclose(linear_recurrence(a, b), want, atol=1e-12)


def test_linear_recurrence_op_gradcheck():
    from mila_det.ops._export import linear_recurrence
    a = torch.rand(11, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_recurrence, (a, b))


@pytest.mark.parametrize('normalize,scale_input',
                         [(True, False), (False, True)],
                         ids=['normalised', 'scaled-input'])
def test_forget_gate_compiles_without_graph_breaks(normalize, scale_input):
    """The public function under ``torch.compile``: one graph around the
    scan's op, the same values and gradients as the definition."""
    inputs = forget_gate_inputs(requires_grad=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(forget_gate_attention)(
        *inputs, 2, 1e-6, normalize, scale_input)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert 'mila_det.selective_scan_chunk' in str(
        explained.graphs[0].graph)
    torch._dynamo.reset()
    compiled = torch.compile(forget_gate_attention, backend='aot_eager',
                             fullgraph=True)
    got = compiled(*inputs, 2, 1e-6, normalize, scale_input)
    want = naive_forget_gate_attention(*inputs, 2, 1e-6, normalize,
                                       scale_input)
    assert rel_err(got, want) < 1e-5
    weight = torch.randn_like(want)
    for g, w in zip(grads(got, inputs, weight), grads(want, inputs, weight)):
        assert rel_err(g, w) < 1e-4


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------
# The op each block runs on the CPU, and how many per block.
BLOCK_OPS = dict(mila=('linear_attention_parallel', 1),
                 vmamba=('selective_scan_chunk', 2))


@pytest.mark.parametrize('name', ['mila', 'vmamba'])
def test_compile_has_no_graph_breaks_and_ops_stay_nodes(name):
    """``torch._dynamo.explain`` counts no graph break; the one graph
    holds each block's fast path as ``mila_det`` nodes and, compiled,
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
    op_name, per_block = BLOCK_OPS[name]
    op = getattr(OPS, op_name)
    names = [str(n.target) for n in graphs[0].graph.nodes
             if n.op == 'call_function' and 'mila_det' in str(n.target)]
    assert names.count(str(op)) + names.count(str(op.default)) == \
        4 * per_block, names
    # the rest: the CPU's fused convolutions, at least each block's MLP:
    # the residual add (the package's op) and oneDNN's conv with an
    # activation (PyTorch's, kept as it is)
    assert {n.split('.')[1] for n in names} == {op_name, 'conv2d_add_'}
    blocks = sum(model.arch_settings['depths'])
    assert names.count('mila_det.conv2d_add_.default') >= blocks, names
    onednn = [n for n in graphs[0].graph.nodes if n.op == 'call_function'
              and str(n.target) == 'mkldnn._convolution_pointwise.default']
    assert len(onednn) >= blocks


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
    op_name, per_block = BLOCK_OPS[name]
    op = getattr(OPS, op_name).default
    count = sum(n.target == op for n in program.graph.nodes)
    assert count == per_block * sum(model.arch_settings['depths'])


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
def test_onnx_tool_round_trip_at_dynamic_sizes(name, tmp_path):
    """The tool's export with dynamic H, W (the ONNX ``Scan`` kept), run at
    the export size and a second one; onnxruntime matches PyTorch. (A
    fixed odd size is the stock exporter's test below: the tool's fixed
    export differs from its dynamic one only in the shapes.)"""
    tool = export_tool()
    torch.manual_seed(0)
    if name == 'mila':  # two stages: half the graph to export
        model = MILA(arch=dict(embed_dims=16, depths=(1, 1),
                               num_heads=(1, 2)), out_indices=(0, 1))
    else:
        model = VMamba(arch=dict(dims=16, depths=(1, 1), ssm_ratio=1.0,
                                 d_state=1), out_indices=(0, 1))
    model.eval()
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
