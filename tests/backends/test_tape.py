"""A graph's launches replayed from a tape (backends/runtime/tape.py): from the call after
CAPTURE_AFTER plain calls, a static CPU graph's kernels run from one C loop. Every call
must give the program's values in new memory; an argument the tape cannot take (moved
memory the graph writes on every call, a weight written in place, another mode, another
thread) runs the program; a written input given in new memory moves the tape onto it;
kernels' errors are raised as the program raises them."""

from __future__ import annotations

import copy
import os
import shutil
import threading

import pytest
import torch
from launch_counting import kernel_calls
from torch.testing import assert_close

from memopt.backends.cpp import attention as attention_kernel
from memopt.backends.cpp import launcher, quantized
from memopt.backends.runtime import executor, tape
from memopt.backends.runtime.decode_attention import AppendAttention
from memopt.backends.runtime.executor import CompiledGraph

from lowering_harness import fused_kernels, run_fused

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX") or "g++") is None or launcher.module() is None,
    reason="needs a C++ compiler and the native launcher",
)


def _two_kernels(x, y):
    a = (x * 2 + y).relu()
    return a.sum(-1), (a.exp() * y).mean(0)


def _compiled(fn, inputs):
    outputs, gm = run_fused(fn, inputs, "cpp")
    count = len(outputs) if isinstance(outputs, (list, tuple)) else 1
    return CompiledGraph(gm, "inference", [None] * count), gm


@pytest.fixture(autouse=True)
def small_graphs_take_tapes(monkeypatch):
    """The tests' graphs are a few kernels: tapes for them too (MIN_LAUNCHES is about time,
    `test_a_graph_of_a_few_launches_keeps_its_program` checks it)."""
    monkeypatch.setattr(tape, "MIN_LAUNCHES", 1)


@pytest.fixture
def replays(monkeypatch):
    """The number of calls a tape answered (and those it sent to the program)."""
    counts = {"replayed": 0, "refused": 0}
    call = tape.Tape.__call__

    def counted(self, args):
        outputs = call(self, args)
        counts["replayed" if outputs is not None else "refused"] += 1
        return outputs

    monkeypatch.setattr(tape.Tape, "__call__", counted)
    return counts


@pytest.fixture
def graphs(monkeypatch):
    """The CompiledGraphs torch.compile makes in the test (Dynamo's caches reset)."""
    made = []
    init = CompiledGraph.__init__

    def kept(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(CompiledGraph, "__init__", kept)
    torch._dynamo.reset()
    return made


def test_replays_give_the_programs_values_in_new_memory(replays):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(33, generator=g)
    compiled, gm = _compiled(_two_kernels, (torch.randn(5, 33, generator=g), y))
    results = []
    for _ in range(tape.CAPTURE_AFTER + 4):
        x = torch.randn(5, 33, generator=g)  # new memory each call: copied into the tape's
        results.append((x, compiled(x, y)))
    # the capture's call and three replays, every node one launch
    assert replays == {"replayed": 3, "refused": 0}
    assert compiled._tape.launches == len(fused_kernels(gm)) == 2
    assert compiled._tape.python_calls == 0
    for x, got in results:  # earlier results untouched by later calls
        for value, want in zip(got, _two_kernels(x, y)):
            assert_close(value, want)
    pointers = {t.data_ptr() for _, got in results for t in got}
    assert len(pointers) == 2 * len(results)


def test_with_replay_off_there_is_no_tape(monkeypatch, replays):
    monkeypatch.setattr(executor, "REPLAY", False)
    x, y = torch.randn(5, 33), torch.randn(33)
    compiled, _ = _compiled(_two_kernels, (x, y))
    for _ in range(5):
        assert_close(compiled(x, y)[0], _two_kernels(x, y)[0])
    assert compiled._tape is None and replays == {"replayed": 0, "refused": 0}
    assert compiled.no_tape == "replay is off (executor.REPLAY)"


def _write_row(cache, x, position):
    cache.index_put_((position,), x)
    return _two_kernels(cache, x)


def _steps(compiled, cache, want_cache, steps, g, first=0, fn=None):
    fn = fn or _write_row
    for step in range(first, first + steps):
        x = torch.randn(6 if fn is _write_a_view_read_others else cache.shape[1], generator=g)
        position = torch.tensor([step % 6])
        for got, want in zip(compiled(cache, x, position), fn(want_cache, x, position)):
            assert_close(got, want)
        assert_close(cache, want_cache)


def _write_a_view_read_others(cache, x, position):
    """A row written through a view of the cache (a Python entry holding that view), and
    kernels reading the cache at offsets into it (launches with pointers inside it)."""
    cache[:, 2:].index_put_((position,), x)
    a = (cache[2:] * 2 + 1).relu()
    return a.sum(-1), (cache[1:4, 3:] * x[1:]).exp().sum(-1)


def test_a_written_input_in_new_memory_moves_the_tape(graphs, replays):
    """A new cache of the same layout (the next sequence's) moves the tape onto it: the
    launches' pointers at their offsets into it, the Python entry's view of it made again;
    no program call, no new capture; the old cache is not written again."""
    fn = _write_a_view_read_others
    cache, want_cache = torch.zeros(6, 8), torch.zeros(6, 8)
    compiled = torch.compile(fn, backend="memopt")
    g = torch.Generator().manual_seed(1)
    _steps(compiled, cache, want_cache, tape.CAPTURE_AFTER + 1 + tape.REBIND_AFTER, g, fn=fn)
    (graph,) = graphs
    assert graph._tape.python_calls >= 1 and graph._tape.launches >= 2
    assert replays == {"replayed": tape.REBIND_AFTER, "refused": 0}
    for sequence in range(1, 3):
        old, kept = cache, cache.clone()
        cache = torch.randn(6, 8, generator=g)  # the next sequence's cache
        want_cache = cache.clone()
        _steps(compiled, cache, want_cache, tape.REBIND_AFTER + 1, g, fn=fn)
        assert_close(old, kept, rtol=0, atol=0)
        assert graph._captures == 1 and graph._tape.rebinds == sequence
    assert replays == {"replayed": 3 * tape.REBIND_AFTER + 2, "refused": 0}


def _strided_window(cache, x, position):
    cache.index_put_((position,), x)
    window = torch.as_strided(cache, (4, 8), (8, 1), 8)  # from the storage's start
    return (window * 2).relu().sum(-1), (window.exp() * 3).sum(0)


@pytest.mark.parametrize("fn", [_write_row, _strided_window])
def test_a_written_input_at_another_storage_offset_runs_the_program(graphs, replays, fn):
    """`as_strided` counts from the storage's start: an input at another offset in its
    storage cannot take the tape's views of it. The calls run the program, with its
    values."""
    cache, want_cache = torch.zeros(6, 8), torch.zeros(6, 8)
    compiled = torch.compile(fn, backend="memopt")
    g = torch.Generator().manual_seed(5)
    _steps(compiled, cache, want_cache, tape.CAPTURE_AFTER + 1 + tape.REBIND_AFTER, g, fn=fn)
    buffer = torch.randn(20, 8, generator=g)
    want_buffer = buffer.clone()
    _steps(compiled, buffer[7:13], want_buffer[7:13], 2, g, fn=fn)
    assert_close(buffer, want_buffer)
    (graph,) = graphs
    assert replays["refused"] == 2 and graph._tape.rebinds == 0


def test_a_written_input_moving_every_call_is_a_miss(graphs, replays):
    """Two caches in turn, call by call: the tape moves onto the other only after
    REBIND_AFTER replays where it is, so a call in three runs the program. New memory on
    every call: after MISSES calls the graph captures again, sees the cache moving and
    takes no tape. The values are the program's throughout."""
    assert tape.REBIND_AFTER == 2  # the counts below
    caches = [torch.zeros(6, 8), torch.zeros(6, 8)]
    wants = [torch.zeros(6, 8), torch.zeros(6, 8)]
    compiled = torch.compile(_write_row, backend="memopt")
    g = torch.Generator().manual_seed(3)
    _steps(compiled, caches[0], wants[0], tape.CAPTURE_AFTER + 2, g)
    for step in range(6):  # replay, move, miss, replay, move, miss
        _steps(compiled, caches[step % 2], wants[step % 2], 1, g, first=step)
    (graph,) = graphs
    assert replays == {"replayed": 1 + 4, "refused": 2}
    assert graph._captures == 1 and graph._tape.rebinds == 2
    cache, want = caches[1], wants[1]
    for step in range(tape.MISSES + tape.CAPTURE_AFTER + 2):
        cache, want = cache.clone(), want.clone()
        _steps(compiled, cache, want, 1, g, first=step)
    assert graph._tape is None and graph._captures == 2
    assert graph.no_tape == "no tape: input arg0_1 is new memory each call"


def test_a_written_input_sharing_memory_with_another_argument_is_a_miss(graphs, replays):
    """A new cache whose memory another argument shares (the row written, here) cannot
    take the tape's pointers: the call runs the program."""
    cache, want_cache = torch.zeros(6, 8), torch.zeros(6, 8)
    compiled = torch.compile(_write_row, backend="memopt")
    g = torch.Generator().manual_seed(4)
    _steps(compiled, cache, want_cache, tape.CAPTURE_AFTER + 3, g)
    (graph,) = graphs
    both, want_both = torch.zeros(7, 8), torch.zeros(7, 8)
    x, position = both[6], torch.tensor([2])
    x.copy_(torch.randn(8, generator=g))
    want_both[6] = x
    got = compiled(both[:6], x, position)
    want = _write_row(want_both[:6], want_both[6], position)
    for a, b in zip(got, want):
        assert_close(a, b)
    assert_close(both, want_both)
    assert replays["refused"] == 1 and graph._tape.rebinds == 0


def test_a_move_that_fails_warns_and_the_program_answers(graphs, replays, monkeypatch):
    """A failure of the tape's own code working out a move is a warning, not the call's
    error: the new cache's calls run the program, with its values."""

    def broken(*args):
        raise AttributeError("a bug")

    monkeypatch.setattr(tape._Reach, "of", broken)
    cache, want_cache = torch.zeros(6, 8), torch.zeros(6, 8)
    compiled = torch.compile(_write_row, backend="memopt")
    g = torch.Generator().manual_seed(6)
    _steps(compiled, cache, want_cache, tape.CAPTURE_AFTER + 1 + tape.REBIND_AFTER, g)
    cache, want_cache = torch.ones(6, 8), torch.ones(6, 8)
    with pytest.warns(UserWarning, match="cannot move onto new inputs .AttributeError: a bug"):
        _steps(compiled, cache, want_cache, 2, g)
    (graph,) = graphs
    assert graph._tape.rebinds == 0 and replays["refused"] == 2


def test_inputs_sharing_memory_with_a_written_one_keep_the_tape_where_it_is():
    """A view of a written input's memory could not be told from a view of another input
    of the same memory: a tape whose written input shares memory with another input never
    moves (`_Reach.possible`)."""
    big = torch.zeros(12, 8)

    def same(t, written):
        home = t.untyped_storage().data_ptr() if written else None
        return ("same", t, (t.data_ptr(), t.dtype, t.shape, t.stride()), None, home)

    apart = [same(torch.zeros(6, 8), True), same(torch.zeros(6, 8), False)]
    assert tape._Reach.of(apart, [], []).possible
    for written in (True, False):
        shared = [same(big[:6], True), same(big[6:], written)]
        assert not tape._Reach.of(shared, [], []).possible


def test_a_narrowed_weight_written_in_place_is_quantized_again(graphs, replays):
    """int8 weights: the tape's launch reads the narrow copy made from the parameter. A
    write to the parameter (its version counter) sends calls to the program, which
    quantizes it again, until a new tape is made."""
    model = torch.nn.Linear(64, 48).eval()
    options = {"pass_options": {"precision": {"weights": "int8"}}}
    compiled = torch.compile(model, backend="memopt", options=options)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for step in range(tape.CAPTURE_AFTER + tape.MISSES + 6):
            if step == tape.CAPTURE_AFTER + 2:
                model.weight.mul_(-3)
            x = torch.randn(1, 64, generator=g)
            assert_close(compiled(x), model(x), rtol=0.05, atol=0.05)
    (graph,) = graphs
    assert graph._captures == 2 and replays["refused"] == tape.MISSES
    assert graph._tape.launches == 1  # the narrow GEMV and its bias, one launch


def _gather(table, index):
    return table[index] * 2


def test_a_kernel_error_is_raised_as_the_program_raises_it():
    table = torch.randn(10, 4)
    compiled, _ = _compiled(_gather, (table, torch.tensor([1, 2])))
    for _ in range(tape.CAPTURE_AFTER):
        compiled(table, torch.tensor([3, 9]))
    with pytest.raises(Exception) as raised:  # during the capture: the graph counts anew
        compiled(table, torch.tensor([3, 10]))
    assert "index" in str(raised.value).lower()
    assert compiled._tape is None and compiled._replay is not None
    for _ in range(tape.CAPTURE_AFTER + 2):
        assert_close(compiled(table, torch.tensor([3, 9])), _gather(table, torch.tensor([3, 9])))
    assert compiled._tape is not None
    with pytest.raises(Exception) as replayed:
        compiled(table, torch.tensor([3, 10]))
    with pytest.raises(Exception) as program:
        compiled._forward(table, torch.tensor([3, 10]))
    assert type(replayed.value) is type(program.value)
    assert str(replayed.value) == str(program.value)


def test_another_thread_or_mode_runs_the_program(replays):
    x, y = torch.randn(5, 33), torch.randn(33)
    compiled, _ = _compiled(_two_kernels, (x, y))
    for _ in range(tape.CAPTURE_AFTER + 1):
        compiled(x, y)
    with compiled._tape._lock:  # as if another thread were replaying
        assert_close(compiled(x, y)[0], _two_kernels(x, y)[0])
    with torch.inference_mode():  # the capture ran outside inference mode
        assert_close(compiled(x, y)[0], _two_kernels(x, y)[0])
    assert replays == {"replayed": 0, "refused": 2}
    done = []
    worker = threading.Thread(target=lambda: done.append(compiled(x, y)))
    worker.start()
    worker.join()
    assert_close(done[0][1], _two_kernels(x, y)[1])
    assert replays == {"replayed": 1, "refused": 2}


def _scaled(x, w):
    return (x * w * 2).relu().sum(-1), (x + w).exp().mean(0)


def test_an_input_used_where_it_is_changing_layout_in_place_runs_the_program(replays):
    """The same tensor at the same address and version with other strides (`.data` given
    another view of its memory): Dynamo's layout check says no, the rule in Python agrees, and the
    program answers, here with its error for a layout it was not compiled for."""
    x, w = torch.randn(5, 33), torch.randn(5, 33)
    compiled, _ = _compiled(_scaled, (x, w))
    for _ in range(tape.CAPTURE_AFTER + 2):
        compiled(x, w)
    assert replays == {"replayed": 1, "refused": 0}
    assert compiled._tape._layouts is not None and compiled._tape._layouts()
    ((_, _, address, _, version),) = [row for row in compiled._tape._same if row[1] is w]
    w.data = w.data.as_strided((5, 33), (1, 5))
    assert (w.data_ptr(), w._version) == (address, version or 0)
    with pytest.raises(ValueError, match="strides"):
        compiled(x, w)
    assert replays == {"replayed": 1, "refused": 1}


def test_a_stricter_layout_check_defers_to_the_rule_and_is_made_again(replays):
    """requires_grad, which Dynamo's layout check reads and the tape's rule does not: the
    call is checked in Python and replayed, and the check made again for the next one."""
    x, w = torch.randn(5, 33), torch.randn(5, 33)
    compiled, _ = _compiled(_scaled, (x, w))
    with torch.no_grad():
        for _ in range(tape.CAPTURE_AFTER + 1):
            compiled(x, w)
        w.requires_grad_()
        assert not compiled._tape._layouts()
        for _ in range(2):
            for got, want in zip(compiled(x, w), _scaled(x, w)):
                assert_close(got, want)
            assert compiled._tape._layouts()
    assert replays == {"replayed": 2, "refused": 0}


def test_the_layout_check_follows_the_tape_onto_new_inputs(replays):
    """After the tape moves onto a new cache, the layout check is the new cache's: the new
    cache given other strides at the same address runs the program (here its error for a
    layout it was not compiled for), where a check of the old cache would replay."""
    g = torch.Generator().manual_seed(4)
    cache, want_cache = torch.zeros(6, 8), torch.zeros(6, 8)
    compiled, _ = _compiled(_write_row, (cache, torch.randn(8), torch.tensor([0])))
    _steps(compiled, cache, want_cache, tape.CAPTURE_AFTER + 1 + tape.REBIND_AFTER, g)
    cache = torch.randn(6, 8, generator=g)
    want_cache = cache.clone()
    _steps(compiled, cache, want_cache, 2, g)
    assert compiled._tape.rebinds == 1 and compiled._tape._layouts()
    refused = replays["refused"]
    cache.data = cache.data.as_strided((6, 8), (1, 6))
    with pytest.raises(ValueError, match="strides"):
        compiled(cache, torch.randn(8, generator=g), torch.tensor([1]))
    assert replays["refused"] == refused + 1


def test_a_tensor_at_two_positions_is_checked_in_c_alone(replays):
    """Dynamo's tensor check refuses a tensor given twice, so a tape whose inputs repeat
    one checks layouts in the launcher's call, and replays without building it again."""
    x, w = torch.randn(5, 33), torch.randn(5, 33)
    compiled, _ = _compiled(lambda x, w, v: _scaled(x, w + v), (x, w, w.clone()))
    for _ in range(tape.CAPTURE_AFTER + 4):
        for got, want in zip(compiled(x, w, w), _scaled(x, w + w)):
            assert_close(got, want)
    assert compiled._tape._layouts is None
    assert replays == {"replayed": 3, "refused": 0}


def _view_and_double(x):
    return x.view(-1), x * 2


def test_no_tape_where_an_output_is_an_inputs_memory(replays):
    x = torch.randn(4, 6)
    compiled, _ = _compiled(_view_and_double, (x,))
    for _ in range(tape.CAPTURE_AFTER + 3):
        view, doubled = compiled(x)
        assert view.data_ptr() == x.data_ptr()
        assert_close(doubled, x * 2)
    assert compiled._tape is None and compiled._replay is None
    assert compiled.no_tape == (
        "no tape: an output is an input's memory, another output's, a view of a varying "
        "value, or overlaps itself"
    )


def _two_sums(x, y):
    a = (x * 2 + y).relu()
    return a.sum(-1), (a.exp() * y).sum(0)


def test_a_graph_of_size_symbols_only_keeps_its_program(graphs):
    """Every node of `_two_sums` compiled with dynamic sizes reads a varying value: a tape
    of Python calls only would cost more than the program."""
    compiled = torch.compile(_two_sums, backend="memopt", dynamic=True)
    for rows in (3, 4, 5, 6, 7):
        x, y = torch.randn(rows, 9), torch.randn(9)
        for got, want in zip(compiled(x, y), _two_sums(x, y)):
            assert_close(got, want)
    assert graphs and all(g._replay is None and g._tape is None for g in graphs)
    assert all(g.no_tape.startswith("no tape: 0 of its") for g in graphs)


def _grown(x, cache):
    """A cache grown by one row each call (its length a size symbol once Dynamo sees it
    change), a reduction over it that static kernels read, and kernels of x alone."""
    h = (x * 2 + 1).relu()
    grown = torch.cat([cache, h[:1]])
    total = grown.sum(0) * 0.01
    return grown, (h * total).exp().sum(-1), h.tanh()


def test_a_graph_with_size_symbols_replays_its_static_launches(graphs, replays, monkeypatch):
    """The launches of static sizes come from the tape; the nodes reading the cache run
    through Python each replay, on that call's cache, the static result they hand the
    launches copied into the tape's memory: every call's values, each grown cache in
    memory of its own. (memopt makes two kernels of `_grown`, and leaves the cache's
    concatenation and its sum to ATen: a tape for those two launches too.)"""
    monkeypatch.setattr(tape, "MIN_LAUNCH_SHARE", 0)
    compiled = torch.compile(_grown, backend="memopt")
    g = torch.Generator().manual_seed(0)
    results = []
    for length in range(3, 3 + tape.CAPTURE_AFTER + 6):
        x, cache = torch.randn(4, 33, generator=g), torch.randn(length, 33, generator=g)
        results.append((x, cache, compiled(x, cache)))
    for x, cache, got in results:  # earlier results untouched by later calls
        for value, want in zip(got, _grown(x, cache)):
            assert_close(value, want)
    dynamic = [g for g in graphs if g._tape is not None]
    assert len(dynamic) == 1 and replays["refused"] == 0
    # the first call compiled static sizes; the dynamic graph's calls after its capture
    assert replays["replayed"] == len(results) - 1 - tape.CAPTURE_AFTER - 1
    made = dynamic[0]._tape
    # the kernels of x's values and of the product with the sum; the cache's concatenation
    # (ATen's cat: fusion.refused_per_size) and its sum through Python
    assert (made.launches, made.python_calls) == (2, 2)
    assert made.python_nodes == ("cat", "sum_1")
    assert len({got[0].data_ptr() for *_, got in results}) == len(results)


def _appended_step(x, k_old, v_old):
    """A dynamic cache's decode step in small: the query and the new rows from kernels,
    the attention over the cache and them, concatenated (the attention pass makes the three
    one AppendAttention call), and a kernel after it."""
    h = (x * 2 + 1).relu()
    k = torch.cat([k_old, h.tanh()], dim=-2)
    v = torch.cat([v_old, h.sin()], dim=-2)
    out = torch.nn.functional.scaled_dot_product_attention(h, k, v)
    return (out * 2).exp(), k, v


@pytest.mark.parametrize("bound_takes", [True, False])
def test_an_appended_attention_replays_bound_to_the_tapes_memory(
    graphs, replays, monkeypatch, bound_takes
):
    """The per-call AppendAttention of a replay runs bound to its static operands
    (`AppendAttention.bind`): one kernel call a replay, the old caches that call's, its
    output written into the tape's memory where the launch after it reads it, the
    concatenations that call's own; every call's values eager's, earlier ones untouched.
    Where the bound call does not take a replay's caches, the whole call runs instead."""
    monkeypatch.setattr(tape, "MIN_LAUNCH_SHARE", 0)
    if not bound_takes:
        bind = AppendAttention.bind

        def refusing(self, *args):
            made = bind(self, *args)
            if made is None:
                return None

            def call(k_old, v_old):
                return None

            call.kept = made.kept
            return call

        monkeypatch.setattr(AppendAttention, "bind", refusing)
    calls = kernel_calls(monkeypatch, attention_kernel, "append_function")
    whole = []  # whole calls on real tensors (a compile calls it on fake ones too)
    call = AppendAttention.__call__

    def counted_call(self, *args, **kwargs):
        if type(args[0]) is torch.Tensor:
            whole.append(args)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(AppendAttention, "__call__", counted_call)
    compiled = torch.compile(_appended_step, backend="memopt", options={"cpu_attention": "memopt"})
    g = torch.Generator().manual_seed(0)
    results = []
    for length in range(9, 9 + tape.CAPTURE_AFTER + 6):
        x = torch.randn(1, 4, 1, 64, generator=g)
        k_old, v_old = (torch.randn(1, 4, length, 64, generator=g) for _ in "kv")
        results.append(((x, k_old, v_old), compiled(x, k_old, v_old)))
    for inputs, got in results:  # the new rows from memopt's kernels: to float32 rounding
        for value, want in zip(got, _appended_step(*inputs)):
            assert_close(value, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1][:, :, :-1], inputs[1])
        assert torch.equal(got[2][:, :, :-1], inputs[2])
    assert replays["replayed"] == len(results) - 1 - tape.CAPTURE_AFTER - 1
    assert len(calls) == len(results)  # every call on the kernel
    # replays bound, not whole calls (whole calls where the bound one refuses)
    assert len(whole) == len(results) - (replays["replayed"] if bound_takes else 0)


def _with_a_row(x, cache):
    h = (x * 2 + 1).relu()
    return (h * cache.sum(0)).exp(), h.tanh(), cache[1].unsqueeze(0)


def _with_a_sum(x, cache):
    return (x * 2 + 1).relu().exp(), cache.sum(0) * 0.5


@pytest.mark.parametrize("replay_views", [True, False])
def test_a_row_of_a_varying_input_returned_keeps_the_program(graphs, monkeypatch, replay_views):
    """An output that is a view of the cache (through a per-call node whose result has a
    static layout): a copy of it would lose the alias, which AOTAutograd rebuilds from the
    output's storage when it does not replay views; the program's values every call."""
    monkeypatch.setattr(tape, "MIN_LAUNCH_SHARE", 0)
    monkeypatch.setattr(torch._functorch.config, "view_replay_for_aliased_outputs", replay_views)
    compiled = torch.compile(_with_a_row, backend="memopt")
    for length in range(3, 3 + tape.CAPTURE_AFTER + 5):
        x, cache = torch.randn(4, 33), torch.randn(length, 33)
        for got, want in zip(compiled(x, cache), _with_a_row(x, cache)):
            assert_close(got, want)
    symbolic = [g for g in graphs if tape.varying_values(g.gm)]
    assert symbolic and all(g._tape is None for g in symbolic)
    assert all("a view of a varying value" in g.no_tape for g in symbolic)


def test_a_static_result_of_a_per_call_node_returned_is_copied(graphs, replays, monkeypatch):
    """The cache's sum is per-call with a static layout: returned as a copy of the tape's
    memory, new each call."""
    monkeypatch.setattr(tape, "MIN_LAUNCH_SHARE", 0)
    compiled = torch.compile(_with_a_sum, backend="memopt")
    results = []
    for length in range(3, 3 + tape.CAPTURE_AFTER + 5):
        x, cache = torch.randn(4, 33), torch.randn(length, 33)
        results.append((x, cache, compiled(x, cache)))
    for x, cache, got in results:
        for value, want in zip(got, _with_a_sum(x, cache)):
            assert_close(value, want)
    assert [g._tape is not None for g in graphs if tape.varying_values(g.gm)] == [True]
    assert replays["replayed"] >= 3
    assert len({got[1].data_ptr() for *_, got in results}) == len(results)


def _scaled_in_place(x, cache):
    cache.mul_(2)
    return (x * 2 + 1).relu(), cache.sum(0)


def test_a_graph_with_size_symbols_that_writes_keeps_its_program(graphs):
    """A write into a varying input: the tape would need to know every alias of it."""
    compiled = torch.compile(_scaled_in_place, backend="memopt")
    for length in range(3, 3 + tape.CAPTURE_AFTER + 4):
        x, cache = torch.randn(4, 33), torch.randn(length, 33)
        want_cache = cache * 2
        got = compiled(x, cache)
        assert_close(cache, want_cache)
        assert_close(got[1], want_cache.sum(0))
    symbolic = [g for g in graphs if tape.varying_values(g.gm)]
    assert symbolic and all(g._tape is None for g in symbolic)
    assert all("writes in place in a graph with size symbols" in g.no_tape for g in symbolic)


def _plus_one(x):
    return (x * 2 + 1).relu()


def _expanded_sum(x):
    return (x.sum(1, keepdim=True) * 2).expand(5, 8)


def test_overlapping_memory_takes_no_tape(graphs):
    """An input made anew each call with a stride of 0, and an output that is an expanded
    view: the tape could copy neither; the program's values every call."""
    inputs = torch.compile(_plus_one, backend="memopt")
    outputs = torch.compile(_expanded_sum, backend="memopt")
    for _ in range(tape.CAPTURE_AFTER + 3):
        x = torch.randn(33).expand(5, 33)
        assert_close(inputs(x), _plus_one(x))
        y = torch.randn(5, 8)
        assert_close(outputs(y), _expanded_sum(y))
    assert graphs and all(g._tape is None for g in graphs)
    assert {g.no_tape.split(":")[0] for g in graphs} == {"no tape"}


def test_an_inference_tensor_weight_takes_the_tape(graphs, replays):
    """Inference tensors keep no version counter: read where they are, not checked."""
    compiled = torch.compile(_two_kernels, backend="memopt")
    with torch.inference_mode():
        y = torch.randn(33)
        for _ in range(tape.CAPTURE_AFTER + 3):
            x = torch.randn(5, 33)
            for got, want in zip(compiled(x, y), _two_kernels(x, y)):
                assert_close(got, want)
    assert replays == {"replayed": 2, "refused": 0}


def test_a_copy_makes_a_tape_of_its_own(replays):
    x, y = torch.randn(5, 33), torch.randn(33)
    compiled, _ = _compiled(_two_kernels, (x, y))
    for _ in range(tape.CAPTURE_AFTER + 1):
        compiled(x, y)
    twin = copy.deepcopy(compiled)
    assert twin._tape is None and compiled._tape is not None
    for _ in range(tape.CAPTURE_AFTER + 2):
        x = torch.randn(5, 33)
        assert_close(twin(x, y)[1], _two_kernels(x, y)[1])
    assert twin._tape is not None and twin._tape is not compiled._tape
    assert replays == {"replayed": 1, "refused": 0}


def test_one_thread_records_at_a_time():
    native = launcher.module()
    mine, theirs, errors = [], [], []
    native.record(mine)
    try:

        def other() -> None:
            try:
                native.record(theirs)
            except RuntimeError as error:
                errors.append(str(error))
            native.record(None)  # not this thread's recording: nothing to end

        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
    finally:
        native.record(None)
    assert errors == ["memopt launcher: another thread is recording"]
    native.record(theirs)  # free again
    native.record(None)


@pytest.mark.parametrize("step", ["_take_inputs", "_make"])
def test_a_capture_that_fails_warns_and_the_program_answers(monkeypatch, step):
    """A failure of the tape's own (before any node ran, or after all did) is a warning;
    the call's values are the program's and the graph gets no tape."""

    def broken(*args, **kwargs):
        raise ValueError("broken on purpose")

    monkeypatch.setattr(tape.Tape, step, broken)
    x, y = torch.randn(5, 33), torch.randn(33)
    compiled, _ = _compiled(_two_kernels, (x, y))
    for _ in range(tape.CAPTURE_AFTER):
        compiled(x, y)
    with pytest.warns(UserWarning, match="broken on purpose"):
        got = compiled(x, y)
    for value, want in zip(got, _two_kernels(x, y)):
        assert_close(value, want)
    assert compiled._tape is None
    assert compiled.no_tape == "no tape: making it failed (ValueError: broken on purpose)"


def test_a_graph_of_a_few_launches_keeps_its_program(monkeypatch):
    """Must not: a tape for fewer than MIN_LAUNCHES launches (the replay's own work would
    cost more than the program around them)."""
    monkeypatch.setattr(tape, "MIN_LAUNCHES", 3)
    x, y = torch.randn(5, 33), torch.randn(33)
    compiled, _ = _compiled(_two_kernels, (x, y))
    for _ in range(tape.CAPTURE_AFTER + 2):
        assert_close(compiled(x, y)[0], _two_kernels(x, y)[0])
    assert compiled._tape is None
    assert compiled.no_tape == "no tape: 2 launches: the program costs less around so few"


def test_a_graph_with_much_to_copy_for_its_launches_keeps_its_program(monkeypatch):
    """Must not: a tape whose copies in and out (moved inputs, outputs) exceed
    COPY_NBYTES_PER_LAUNCH a launch: they would cost more than the launches save."""
    monkeypatch.setattr(tape, "COPY_NBYTES_PER_LAUNCH", 1024)
    y = torch.randn(33)
    compiled, _ = _compiled(_two_kernels, (torch.randn(5, 33), y))
    for _ in range(tape.CAPTURE_AFTER + 2):
        x = torch.randn(5, 33)  # 660 bytes copied in, 20 + 132 out: 812, under 2 x 1024
        assert_close(compiled(x, y)[0], _two_kernels(x, y)[0])
    assert compiled._tape is not None
    monkeypatch.setattr(tape, "COPY_NBYTES_PER_LAUNCH", 256)
    compiled, _ = _compiled(_two_kernels, (torch.randn(5, 33), y))
    for _ in range(tape.CAPTURE_AFTER + 2):
        x = torch.randn(5, 33)
        assert_close(compiled(x, y)[0], _two_kernels(x, y)[0])
    assert compiled._tape is None
    assert compiled.no_tape == "no tape: 812 bytes to copy a call for 2 launches"


def _logits(x, w1, w2):
    """A decode step's end: a GEMV, a kernel on its result, the output GEMV (viewed)."""
    return ((x @ w1.t()).relu() @ w2.t()).view(1, 1, -1)


def _logits_sorted(x, w1, w2):
    """The output GEMV's result read again by an ATen op (a Python entry of the tape)."""
    logits = (x @ w1.t()).relu() @ w2.t()
    return logits, torch.sort(logits, dim=-1).values


def _logits_part(x, w1, w2):
    """An output that is part of the GEMV's result: a buffer of its size would not hold
    what the GEMV writes."""
    return ((x @ w1.t()).relu() @ w2.t())[:, :20]


@pytest.mark.parametrize("fn", [_logits, _logits_sorted, _logits_part])
def test_an_output_a_gemv_makes_is_written_into_new_memory(graphs, replays, fn):
    """Must: the output GEMV of `_logits` writes each replay's output into memory the replay
    allocates (the tape's launches patched), no copy. Must not: in `_logits_sorted` a
    Python entry reads that GEMV's result from the tape's memory, and `_logits_part`
    returns part of it, so the output is copied out of the tape's memory. Either way every
    call's values are eager's, in memory of their own."""
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(48, 64, generator=g), torch.randn(40, 48, generator=g)
    compiled = torch.compile(fn, backend="memopt", options={"cpu_gemv": "memopt"})
    results = []
    with torch.no_grad():
        for _ in range(tape.CAPTURE_AFTER + 4):
            x = torch.randn(1, 64, generator=g)
            results.append((x, compiled(x, w1, w2)))
    assert replays == {"replayed": 3, "refused": 0}
    made = graphs[-1]._tape
    fresh = [how for kind, how in made._outputs if kind == "fresh"]
    assert len(fresh) == (1 if fn is _logits else 0) and (len(made._patches) > 0) == bool(fresh)
    if fn is _logits:  # the two GEMVs; the ReLU, ATen's, a Python entry on the first's result
        assert (made.launches, made.python_calls, made.python_nodes) == (2, 1, ("relu",))
    pointers = set()
    for x, got in results:  # earlier results untouched by later calls
        got, want = (v if isinstance(v, tuple) else (v,) for v in (got, fn(x, w1, w2)))
        assert len(got) == len(want)
        for value, expected in zip(got, want):
            assert_close(value, expected)
            pointers.add(value.data_ptr())
    kept = {t.data_ptr() for t in made._kept if isinstance(t, torch.Tensor)}
    assert len(pointers) == len(results) * (2 if fn is _logits_sorted else 1)
    assert not pointers & kept


def test_a_tape_with_patches_takes_one_address_a_buffer():
    """The launcher's tape: a patch points a launch's pointer at the buffer address a call
    passes (plus its offset), so each call's GEMV writes where that call says; a patch
    naming no launch pointer is refused when made, and a call must pass one address a
    buffer."""
    native = launcher.module()
    x, w = torch.randn(1, 24), torch.randn(10, 24)
    kept = torch.empty(1, 10)
    gemv = quantized.packed_address("memopt_f32_matmul")  # pointers x, w, y; M, N, K, bias
    entry = (gemv, (x.data_ptr(), w.data_ptr(), kept.data_ptr()), (1, 10, 24, 0))
    made = native.tape([entry], ((0, 2, 0, 4),))  # y: the buffer's address + one float
    outputs = [torch.full((1, 11), -1.0) for _ in range(2)]
    for out in outputs:
        assert made(out.data_ptr()) is None
    for out in outputs:
        assert out[0, 0] == -1.0  # the offset: nothing before it written
        assert_close(out[:, 1:], x @ w.t())
    with pytest.raises(TypeError, match="takes 1 addresses, got 0"):
        made()
    with pytest.raises(ValueError, match="names no pointer of a launch"):
        native.tape([lambda: None], ((0, 0, 0, 0),))
    with pytest.raises(ValueError, match="names no pointer of a launch"):
        native.tape([entry], ((0, 3, 0, 0),))  # the launch has three pointers
    unpatched = native.tape([entry], ())
    with pytest.raises(TypeError, match="takes 0 addresses, got 1"):
        unpatched(1)
