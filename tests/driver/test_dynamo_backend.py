"""torch.compile(backend="memopt"): found by entry point, matches eager, rejects bad options."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import memopt

from models import model_and_input

MODELS = ["mlp", "block", "convnet"]


@pytest.mark.slow
def test_backend_found_through_entry_point_in_fresh_interpreter():
    script = textwrap.dedent(
        """
        import sys, torch
        assert "memopt" not in sys.modules
        f = torch.compile(lambda x: torch.relu(x) * 2 + 1, backend="memopt")
        x = torch.randn(8, 4)
        torch.testing.assert_close(f(x), torch.relu(x) * 2 + 1)
        assert "memopt" in sys.modules  # loaded by torch through the entry point
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


@pytest.mark.parametrize("name", MODELS)
def test_inference_matches_eager(name):
    model, x = model_and_input(name)
    model.eval()
    compiled = torch.compile(model, backend="memopt")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_training_gradients_match_eager(name):
    model, x = model_and_input(name)
    model.train()
    expected_model, _ = model_and_input(name)
    expected_model.train()
    expected_model.load_state_dict(model.state_dict())

    loss = torch.compile(model, backend="memopt")(x).square().mean()
    loss.backward()
    expected_loss = expected_model(x).square().mean()
    expected_loss.backward()

    torch.testing.assert_close(loss, expected_loss)
    for (pname, p), q in zip(model.named_parameters(), expected_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, pname=pname: f"{pname}: {m}")
    # BatchNorm's running statistics are mutated buffers: the mutation must be honoured.
    for b, c in zip(model.buffers(), expected_model.buffers()):
        torch.testing.assert_close(b, c)


def test_options_reach_the_compilation(tmp_path):
    """disable, fuel and report_dir shape what torch.compile runs; device, what analyze predicts."""

    def fn(x):
        return x.exp() + x.exp() + torch.cat([x.clone()])  # three cleanup rewrites

    x = torch.randn(5)
    options = {"disable": ["layout"], "check": True, "fuel": 1, "report_dir": str(tmp_path)}
    f = torch.compile(fn, backend="memopt", options=options)
    torch.testing.assert_close(f(x), fn(x))
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    passes = [entry["pass"] for entry in record["ledger"]]
    assert "layout" not in passes and passes[0] == "cleanup"
    decisions = [d for entry in record["ledger"] for d in entry["decisions"]]
    assert sum(d["applied"] for d in decisions) == 1  # fuel=1: the first rewrite only
    assert all("out of fuel" in d["reason"] for d in decisions if not d["applied"])
    a100 = memopt.analyze(fn, x, device="a100")
    assert a100.predict() == a100.predict("a100") != a100.predict("h100")


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"fusoin": True}, ["'fusoin'", "disable", "fuel", "passes"]),
        ({"disable": ["cleanupp"]}, ["'cleanupp'", "cleanup"]),
        ({"passes": ["nope"]}, ["'nope'", "cleanup"]),
        ({"backend": "cuda"}, ["'cuda'", "triton", "reference"]),
        ({"device": "tpu"}, ["'tpu'", "h100"]),
    ],
)
def test_bad_options_are_clear_errors(options, names):
    f = torch.compile(lambda x: x + 1, backend="memopt", options=options)
    with pytest.raises(Exception) as raised:
        f(torch.randn(3))
    message = str(raised.value)
    for name in names:
        assert name in message


@pytest.mark.slow
def test_dynamic_shapes_compile_once_and_run_at_new_sizes():
    model, _ = model_and_input("block")
    model.eval()
    compiled = torch.compile(model, backend="memopt", dynamic=True)
    with torch.no_grad():
        for batch in (1, 3, 5):
            x = torch.randn(batch, 8, 32)
            torch.testing.assert_close(compiled(x), model(x))


def test_report_dir_writes_the_ledger(tmp_path):
    f = torch.compile(
        lambda x: x.clone().sum(0) + x.clone().sum(0),
        backend="memopt",
        options={"report_dir": str(tmp_path)},
    )
    x = torch.randn(4, 4)
    torch.testing.assert_close(f(x), 2 * x.sum(0))
    import json

    record = json.loads((tmp_path / "inference.json").read_text())
    assert record["bytes_moved"]["label"] == "modelled"
    assert record["ledger"][0]["pass"] == "cleanup"
    assert any(d["applied"] for d in record["ledger"][0]["decisions"])


def _has_triton_backend() -> bool:
    try:
        import memopt.backends.triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_triton_backend(), reason="triton is not installed")
@pytest.mark.parametrize("name", ["block", "convnet"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_triton_interpreter_end_to_end(name, training):
    """The generated Triton kernels, run by Triton's interpreter on CPU tensors."""
    model, x = model_and_input(name)
    expected_model, _ = model_and_input(name)
    expected_model.load_state_dict(model.state_dict())
    model.train(training)
    expected_model.train(training)
    compiled = torch.compile(model, backend="memopt", options={"backend": "triton"})
    with torch.set_grad_enabled(training), warnings.catch_warnings():
        # A kernel that fell back to the reference backend would warn: fail instead.
        warnings.filterwarnings("error", message="memopt")
        out = compiled(x)
        expected = expected_model(x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        if training:
            out.square().mean().backward()
            expected.square().mean().backward()
            for p, q in zip(model.parameters(), expected_model.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


def test_backend_for_resolves_auto_by_device_and_keeps_cpp_on_the_cpu():
    from memopt.backends.registry import backend_for

    def name(option, device):
        return backend_for(option, device).name

    assert name("auto", "cpu") == "cpp"
    assert name("auto", "cuda") == "triton"
    assert name("auto", "mps") == "reference"
    assert name("cpp", "cuda") == "triton"  # C++ kernels run on the CPU only
    assert [name(b, "cpu") for b in ("triton", "cpp", "reference")] == [
        "triton",
        "cpp",
        "reference",
    ]


def test_report_dir_keeps_every_graph_of_every_compiled_frame(tmp_path):
    """A recompile (new sizes) compiles in a session of its own: its graph is written
    beside the first, not over it."""
    import json

    f = torch.compile(
        lambda x: (x * 2).sum(),
        backend="memopt",
        dynamic=False,
        options={"report_dir": str(tmp_path)},
    )
    for n in (4, 6):
        x = torch.randn(n)
        torch.testing.assert_close(f(x), (x * 2).sum())
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert names == ["inference.1.json", "inference.json"]
    records = [json.loads((tmp_path / n).read_text()) for n in names]
    assert [r["graph"] for r in records] == ["inference.1", "inference"]
    first, second = (r["bytes_moved"]["value"] for r in records[::-1])
    assert second > first  # the 6-element graph's, not the 4-element one's twice


def _scaled_relu(x, w):
    return (x * w + 1).relu().sum(-1)


def _written(x, w):
    w.mul_(2).add_(x)
    return x * w


def test_inputs_with_a_negation_or_conjugation_bit_are_read_through_it():
    """A negated or conjugated view (a dispatch key ATen applies as it reads) given to a
    compiled graph: memopt's kernels read memory as it is, so such inputs reach them
    materialized, and a write to one lands in the caller's tensor through its bit."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)
    compiled = torch.compile(_scaled_relu, backend="memopt")
    for _ in range(4):  # past the tape's capture, on the plain graph
        torch.testing.assert_close(compiled(x, w), _scaled_relu(x, w))
    for _ in range(4):  # another graph (Dynamo guards the bit), its tape included
        negated = torch._neg_view(w.clone())
        torch.testing.assert_close(compiled(x, negated), _scaled_relu(x, negated))
    given = torch._neg_view(torch.randn(8, 64, generator=g))
    eager = torch._neg_view(torch._neg_view(given).clone())  # the same values, negated view
    compiled_written = torch.compile(_written, backend="memopt")
    torch.testing.assert_close(compiled_written(x, given), _written(x, eager))
    assert given.is_neg()
    torch.testing.assert_close(given, eager)  # the write reached the caller's tensor
    z = torch.randn(4, 3, dtype=torch.complex64, generator=g)
    doubled = torch.compile(lambda z: z * 2 + 1, backend="memopt")
    torch.testing.assert_close(doubled(z.conj()), z.conj() * 2 + 1)


def test_a_graph_without_such_inputs_runs_as_compiled(monkeypatch):
    """No wrapper where no input carries a bit: the compiled graph is what AOTAutograd
    calls. With one, the wrapper knows the input is written."""
    from memopt.compiler import capture

    made = []
    resolving = capture._resolving_bits

    def counted(compiled, bits):
        made.append(bits)
        return resolving(compiled, bits)

    monkeypatch.setattr(capture, "_resolving_bits", counted)
    torch._dynamo.reset()
    x, w = torch.randn(8, 64), torch.randn(8, 64)
    torch.compile(_scaled_relu, backend="memopt")(x, w)
    assert made == []
    torch.compile(_written, backend="memopt")(x, torch._neg_view(w.clone()))
    (bits,) = made
    assert list(bits.values()) == [True]  # one input with a bit, which the graph writes
