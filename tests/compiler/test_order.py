"""Reordering a rewritten graph (compiler/order.py): inputs first, and reads of a buffer
kept on their side of the writes to it."""

import pytest
import torch
import torch.fx
from torch.fx.passes.tools_common import legalize_graph

from memopt.compiler.order import legalize

aten = torch.ops.aten


def _counter_graph() -> torch.fx.GraphModule:
    """r reads the counter c before copy_ writes c + 1 into it; copy_'s inputs are ready
    long before r's."""
    graph = torch.fx.Graph()
    x, c = graph.placeholder("x"), graph.placeholder("c")
    bumped = graph.call_function(aten.add.Tensor, (c, 1))
    m1 = graph.call_function(aten.mul.Tensor, (x, 2))
    m2 = graph.call_function(aten.mul.Tensor, (m1, 3))
    r = graph.call_function(aten.add.Tensor, (m2, c))
    graph.call_function(aten.copy_.default, (c, bumped))
    graph.output(r)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _run(gm):
    x, c = torch.arange(3.0), torch.tensor(10.0)
    return gm(x, c), c


def test_a_write_stays_after_the_reads_of_the_old_values():
    gm = _counter_graph()
    want, counter = _run(gm)
    assert torch.equal(want, torch.tensor([10.0, 16.0, 22.0])) and counter == 11
    legalize(gm.graph)
    gm.recompile()
    got, counter = _run(gm)
    assert torch.equal(got, want) and counter == 11
    # torch.fx's topological sort places the write as soon as its inputs are ready:
    # before the read, which then sees the new value. This is the case legalize exists for.
    broken = _counter_graph()
    legalize_graph(broken)
    assert not torch.equal(_run(broken)[0], want)


def test_nodes_move_after_their_inputs_and_nothing_else_moves():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    early = graph.call_function(aten.neg.default, (x,))
    late_input = graph.call_function(aten.mul.Tensor, (x, 2))
    other = graph.call_function(aten.exp.default, (x,))
    graph.output((early, late_input, other))
    # a user of late_input placed before it, as a fused kernel's users can be
    user = graph.call_function(aten.add.Tensor, (late_input, 1))
    early.append(user)
    graph.output_node().args = ((early, user, other),)
    legalize(graph)
    assert list(graph.nodes) == [x, early, late_input, user, other, graph.output_node()]


def test_no_order_keeps_a_read_before_a_write_it_depends_on():
    """r must read c before the write (it comes first), but needs a value computed from
    the written c: no order runs it."""
    graph = torch.fx.Graph()
    c = graph.placeholder("c")
    write = graph.call_function(aten.add_.Tensor, (c, 1))
    after = graph.call_function(aten.mul.Tensor, (write, 2))
    r = graph.call_function(aten.add.Tensor, (c, after))
    graph.output(r)
    write.prepend(r)  # r now reads c before the write, and depends on it: impossible
    with pytest.raises(ValueError, match=f"no order runs %{r.name} after its inputs"):
        legalize(graph)


def test_reads_through_the_pieces_of_a_split_stay_before_the_write():
    """r reads a piece of b (split returns views of it) before copy_ writes b, and its other
    input is placed after the write (as a fused kernel is): the write must follow r."""
    import operator

    graph = torch.fx.Graph()
    b, src = graph.placeholder("b"), graph.placeholder("src")
    piece = graph.call_function(
        operator.getitem, (graph.call_function(aten.split.Tensor, (b, 2)), 0)
    )
    late = graph.call_function(aten.neg.default, (src,))
    r = graph.call_function(aten.add.Tensor, (piece, late))
    write = graph.call_function(aten.copy_.default, (b, src))
    graph.output(r)
    write.append(late)  # order now: ..., r, copy_, neg (r before its input)
    legalize(graph)
    nodes = list(graph.nodes)
    assert nodes.index(late) < nodes.index(r) < nodes.index(write)
