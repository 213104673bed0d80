"""The executor's straight-line program (backends/runtime/program.py): the same values as
fx's forward, views made as aliases of their root, and the graph's own view ops wherever
an alias could be wrong."""

import torch
import torch.nn.functional as F

from memopt.backends.runtime.program import straight_line
from memopt.compiler.capture import capture


def _program(fn, *inputs):
    (graph,) = capture(fn, inputs)
    program = straight_line(graph.gm)
    assert program is not None
    return graph.gm, program


def _chain(x, w):
    # view -> permute -> slice -> unsqueeze: one alias of x; x @ w.t() reads a view of w.
    y = x.view(4, 8, 6).permute(1, 0, 2)[:, 1:3].unsqueeze(0)
    return (y * 2).sum(-1), x @ w.t()


def test_views_of_static_layout_are_aliases_of_their_root():
    x, w = torch.randn(4, 48), torch.randn(5, 48)
    gm, program = _program(_chain, x, w)
    source = program.memopt_source
    # Every view of x is one alias of x; the intermediate views are not made.
    aliases = [line for line in source.splitlines() if "_reinterpret(v_arg0_1" in line]
    assert len(aliases) == 1 and "(1, 8, 2, 6), (48, 6, 48, 1), 48" in aliases[0]
    assert "v_view =" not in source and "v_permute =" not in source
    assert "torch.ops" not in source
    for got, want in zip(program(x, w), gm(x, w)):
        assert torch.equal(got, want)
    for got, want in zip(program(x, w), _chain(x, w)):
        torch.testing.assert_close(got, want)


def test_a_root_in_other_strides_runs_the_graphs_view_ops():
    """The graph was compiled for a contiguous x; a transposed copy with the same sizes
    must not be read through the compiled strides."""
    x, w = torch.randn(4, 48), torch.randn(5, 48)
    _, program = _program(_chain, x, w)
    other = torch.randn(48, 4).t()
    assert other.shape == x.shape and other.stride() != x.stride()
    for got, want in zip(program(other, w), _chain(other, w)):
        torch.testing.assert_close(got, want)


def test_a_view_at_a_storage_offset_keeps_its_offset():
    base = torch.randn(4 * 48 + 7)
    x = base[7:].view(4, 48)
    w = torch.randn(5, 48)
    _, program = _program(_chain, x.clone(), w)
    for got, want in zip(program(x, w), _chain(x, w)):
        torch.testing.assert_close(got, want)


def test_returned_views_stay_views_of_their_input():
    def fn(x):
        return x.t(), x.sum()

    x = torch.randn(3, 5)
    _, program = _program(fn, x)
    assert "_reinterpret" not in program.memopt_source
    t, _ = program(x)
    assert t._base is x and torch.equal(t, x.t())


def test_compiled_models_match_eager_through_the_program():
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 7, 32)
    compiled = torch.compile(model, backend="memopt")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v).sum(1)

    q = torch.randn(2, 6, 4, 8)
    k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 4, 6, 8)
    got = torch.compile(attention, backend="memopt")(q, k, v)
    torch.testing.assert_close(got, attention(q, k, v))


def test_a_size_one_dim_of_the_root_may_have_any_stride():
    """The stride of a dim of size 1 moves nothing: a root that differs only there is
    still read through the alias, not through the graph's view ops, with the same values."""

    def fn(x):
        return (x.view(2, 4).t() * 1,)

    _, program = _program(fn, torch.randn(1, 8))
    assert "(v_arg0_1.stride()) == 1 else" in program.memopt_source  # dim 1 only

    def replayed(*_):
        raise AssertionError("the view ops ran instead of the alias")

    for name, value in list(program.__globals__.items()):
        if getattr(value, "__name__", "") == "replay":
            program.__globals__[name] = replayed
    other = torch.empty_strided((1, 8), (99, 1)).copy_(torch.randn(1, 8))
    (got,) = program(other)
    torch.testing.assert_close(got, other.view(2, 4).t())


def test_views_that_are_more_than_strides_run_as_the_graph_has_them():
    """`_conj` sets a bit an alias would lose; `reshape` copies a transposed input."""
    import torch.fx

    aten = torch.ops.aten
    graph = torch.fx.Graph()
    z, x = graph.placeholder("z"), graph.placeholder("x")
    conj = graph.call_function(aten._conj.default, (z,))
    flat = graph.call_function(
        aten.reshape.default, (graph.call_function(aten.t.default, (x,)), [6])
    )
    graph.output(
        (
            graph.call_function(aten.mul.Tensor, (conj, 1)),
            graph.call_function(aten.mul.Tensor, (flat, 1)),
        )
    )
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    from memopt.compiler.graph import annotate

    z_value = torch.tensor([1 + 2j, 3 - 1j])
    x_value = torch.arange(6.0).reshape(2, 3)
    from torch.fx.experimental.proxy_tensor import make_fx

    traced = make_fx(gm, tracing_mode="fake")(z_value, x_value)
    annotate(traced)
    program = straight_line(traced)
    for got, want in zip(program(z_value, x_value), gm(z_value, x_value)):
        assert torch.equal(got, want)


def test_kernels_run_without_per_call_checks_and_fake_tensors_take_fx_forward():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memopt.backends.runtime.kernels import FusedKernel
    from memopt.config import Config
    from memopt.passes.pipeline import run_pipeline

    def fn(x, w):
        return (x.t() * w).exp().sum(0)

    x, w = torch.randn(6, 4), torch.randn(4, 6)
    (graph,) = capture(fn, (x, w))
    gm = run_pipeline(graph.gm, Config.from_options({}).pipeline(), "test", {}).gm
    program = straight_line(gm)
    calls = [
        v for v in program.__globals__.values() if getattr(v, "__name__", "") == "program_call"
    ]
    assert len(calls) == 1 and isinstance(calls[0].__self__, FusedKernel)
    for _ in range(2):  # the first call works out the launch, the second takes it
        torch.testing.assert_close(program(x, w)[0], fn(x, w))
    with FakeTensorMode() as mode:
        (fake,) = program(mode.from_tensor(x), mode.from_tensor(w))
    assert fake.shape == (6,) and type(fake).__name__ == "FakeTensor"
    mode = FakeTensorMode()  # fake tensors passed in outside their mode take fx's forward too
    (fake,) = program(mode.from_tensor(x), mode.from_tensor(w))
    assert fake.shape == (6,) and type(fake).__name__ == "FakeTensor"
