"""memopt.ablate and `memopt ablate`: rows consistent with plain analyses, CSV/JSON, --run."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
import torch

import memopt
from memopt.cli import main
from memopt.passes import DEFAULT_PIPELINE
from memopt.reports.summary import MAX_WIDTH
from memopt.tools.ablate import configurations

from models import MLP


def program(x):
    y = x.exp() + x.exp() + torch.cat([x.clone()])
    return (y - y.amax(1, keepdim=True)).exp().sum(1)


def x48():
    return torch.randn(4, 8)


@pytest.fixture(scope="module")
def ablation():
    messages: list[str] = []
    result = memopt.ablate(program, x48(), progress=messages.append)
    return result, messages


def test_configurations():
    assert configurations(["a", "b", "c"]) == [
        ("no passes", ()),
        ("only a", ("a",)),
        ("only b", ("b",)),
        ("only c", ("c",)),
        ("all but a", ("b", "c")),
        ("all but b", ("a", "c")),
        ("all but c", ("a", "b")),
        ("all passes", ("a", "b", "c")),
    ]
    assert configurations([]) == [("no passes", ()), ("all passes", ())]


def test_rows_agree_with_plain_analyses(ablation):
    result, _ = ablation
    x = x48()
    assert [r.config for r in result] == [name for name, _ in configurations(DEFAULT_PIPELINE)]
    full = memopt.analyze(program, x)
    every = result.row("all passes")
    assert every.passes == DEFAULT_PIPELINE
    assert (every.bytes_moved, every.kernels) == (full.bytes_moved, len(full.kernels))
    assert every.predicted_s == pytest.approx(full.predict("h100"))
    assert result.eager_bytes == full.eager_bytes
    assert result.lower_bound_bytes == full.lower_bound_bytes

    # No passes: the unoptimized graph, as the first pass saw it.
    none = result.row("no passes")
    assert none.bytes_moved == full.ledger[0].bytes_before
    assert none.kernels == full.ledger[0].kernels_before

    # Every row is the plain analysis with that row's passes.
    for row in result:
        plain = memopt.analyze(program, x, passes=list(row.passes))
        assert (row.bytes_moved, row.kernels) == (plain.bytes_moved, len(plain.kernels)), row
    assert every.bytes_moved < result.row("only cleanup").bytes_moved < none.bytes_moved
    assert all(r.run_ms is None and r.check is None for r in result)
    assert all(r.compile_ms > 0 for r in result)


def test_progress_names_each_configuration(ablation):
    result, messages = ablation
    for index, row in enumerate(result, start=1):
        assert any(m.startswith(f"[{index}/{len(result)}] {row.config}") for m in messages)


def test_table_csv_and_json(ablation):
    result, _ = ablation
    table = result.format()
    assert "configuration" in table and "all passes" in table
    assert max(len(line) for line in table.splitlines()) <= MAX_WIDTH
    assert "modelled" in table and "measured" in table

    rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert [r["config"] for r in rows] == [r.config for r in result]
    assert rows[-1]["passes"] == "+".join(DEFAULT_PIPELINE)
    assert int(rows[-1]["bytes_moved"]) == result.row("all passes").bytes_moved
    assert rows[0]["run_ms"] == ""

    data = json.loads(json.dumps(result.to_dict()))
    assert data["eager_bytes"] == {"value": result.eager_bytes, "label": "counted"}
    assert data["labels"]["bytes_moved"] == "modelled"
    assert data["labels"]["run_ms"] == "measured"
    assert [r["bytes_moved"] for r in data["rows"]] == [r.bytes_moved for r in result]


def test_disable_narrows_the_ablated_passes():
    result = memopt.ablate(program, x48(), disable=["cleanup"])
    rest = tuple(name for name in DEFAULT_PIPELINE if name != "cleanup")
    assert [r.config for r in result] == [name for name, _ in configurations(rest)]
    assert "only cleanup" not in [r.config for r in result]
    assert result.row("all passes").passes == rest


def test_run_times_and_checks_every_configuration():
    result = memopt.ablate(program, x48(), run=True, repeats=2, backend="reference")
    assert result.eager_run_ms is not None and result.eager_run_ms > 0
    for row in result:
        assert row.check == "ok", row
        assert row.run_ms is not None and row.run_ms > 0
    assert "run ms" in result.format()


@pytest.mark.slow
def test_run_checks_gradients_when_training():
    torch.manual_seed(0)
    model = MLP(8, 16).train()
    x = torch.randn(2, 8, requires_grad=True)
    result = memopt.ablate(model, x, training=True, run=True, repeats=1, backend="reference")
    assert all(row.check == "ok" for row in result), [r.check for r in result]
    assert (
        result.row("all passes").bytes_moved
        == memopt.analyze(model, x, training=True, backend="reference").bytes_moved
    )


def test_rows_without_recompute_use_the_default_partition():
    # The partition is chosen at capture: a row without recompute must not keep the one the
    # recompute pass chose, and each row equals the plain analysis with its passes.
    torch.manual_seed(0)
    x, w = torch.randn(8, 32, requires_grad=True), torch.randn(32, 32, requires_grad=True)

    def fn(x, w):
        return torch.tanh(torch.sigmoid((x @ w).exp() * 0.5).relu() + x).sum(-1)

    result = memopt.ablate(fn, x, w, training=True, disable=["cleanup", "layout"])
    without = memopt.analyze(fn, x, w, training=True, disable=["cleanup", "layout", "recompute"])
    full = memopt.analyze(fn, x, w, training=True, disable=["cleanup", "layout"])
    assert result.row("all but recompute").bytes_moved == without.bytes_moved
    assert result.row("all passes").bytes_moved == full.bytes_moved
    assert full.bytes_moved < without.bytes_moved  # recompute is worth something here


def test_run_reports_a_wrong_answer(monkeypatch):
    # A compiled program that is off by one: the check says how, and the row still has a time.
    import memopt.tools.ablate as ablate_module

    real = ablate_module.compile_program

    def off_by_one(fn, options, dynamic=False):
        program = real(fn, options, dynamic)
        return lambda *args: program(*args) + 1

    monkeypatch.setattr(ablate_module, "compile_program", off_by_one)
    result = memopt.ablate(program, x48(), run=True, repeats=1, passes=["cleanup"])
    assert all(r.check.startswith("differs: tensor 0") for r in result)
    assert all(r.run_ms is not None for r in result)


# --- the command ---------------------------------------------------------------------------

TARGET = """\
import torch


def example():
    return (lambda x: (x.exp() + x.exp()).sum(1)), (torch.randn(4, 8),)
"""


@pytest.fixture
def target_file(tmp_path):
    path = tmp_path / "target.py"
    path.write_text(TARGET)
    return path


def test_cli_ablate_prints_and_writes(target_file, tmp_path, capsys):
    out = tmp_path / "ablation"
    assert main(["ablate", str(target_file), "--out", str(out), "--device", "a100"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"memopt ablate: {target_file}")
    assert "a100 us" in captured.out
    count = len(configurations(DEFAULT_PIPELINE))
    assert f"memopt: [1/{count}] no passes" in captured.err
    rows = list(csv.DictReader((out / "ablation.csv").open()))
    assert len(rows) == count
    data = json.loads((out / "ablation.json").read_text())
    assert data["device"] == "a100" and len(data["rows"]) == count


def test_cli_ablate_run(target_file, tmp_path, capsys):
    args = ["ablate", str(target_file), "--out", str(tmp_path), "--run", "--repeats", "2"]
    assert main([*args, "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "eager run" in out and "check" in out
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert all(r["check"] == "ok" for r in data["rows"])
    assert data["eager_run_ms"]["label"] == "measured"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_plot_without_matplotlib_is_a_clear_error(target_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["ablate", str(target_file), "--out", str(tmp_path), "--plot", "x.png"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "memopt: error: plotting needs matplotlib, which is not installed (pip install matplotlib)"
    )
    assert not (tmp_path / "ablation.csv").exists()  # it failed before the slow part


@pytest.mark.skipif(not _has_matplotlib(), reason="matplotlib is not installed")
def test_cli_plot_draws_a_png(target_file, tmp_path):
    png = tmp_path / "bytes.png"
    assert main(["ablate", str(target_file), "--out", str(tmp_path), "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ablate", "mlp", "--disable", "nope"], "unknown pass 'nope'"),
        (["ablate", "mlp", "--backend", "abacus"], "unknown backend 'abacus'"),
        (["ablate", "mlp", "--repeats", "0"], "--repeats"),
        (["ablate", "mlp", "--out", "{file}"], "is a file, not a directory"),
    ],
)
def test_cli_errors_are_one_line(args, message, tmp_path, capsys):
    path = tmp_path / "a_file"
    path.write_text("")
    assert main([a.format(file=path) for a in args]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("memopt: error: ")]
    assert len(errors) == 1 and message in errors[0], captured.err


def test_a_row_per_precision_choice():
    """Each weight format asked for adds a row of all passes with the precision pass; its
    bytes are the narrowed weights', and its check is the error against eager (by design
    not zero), not a pass/fail."""
    torch.manual_seed(0)
    model = MLP(64, 128).eval()
    x = torch.randn(2, 64)
    with torch.no_grad():  # without the epilogue pass, which takes float32 matmuls only
        result = memopt.ablate(
            model, x, run=True, repeats=1, precision=("int8", "bf16"), disable=["epilogue"]
        )
    full = result.row("all passes")
    int8, bf16 = result.row("all passes, int8 weights"), result.row("all passes, bf16 weights")
    assert (int8.precision, bf16.precision, full.precision) == ("int8", "bf16", None)
    assert "precision" in int8.passes and "precision" not in full.passes
    # fp32 weights 64x128 twice (32 KiB each) become int8 with a float32 scale per row
    w = 64 * 128
    assert full.bytes_moved - int8.bytes_moved == 2 * (4 * w - w) - 4 * (128 + 64)
    assert full.bytes_moved - bf16.bytes_moved == 2 * (4 * w - 2 * w)
    assert full.check == "ok"
    for row in (int8, bf16):
        error = float(row.check.split()[1])
        assert 0 < error < 0.05 and row.check.endswith("(by design)")
    assert json.loads(json.dumps(result.to_dict()))["rows"][-1]["precision"] == "bf16"
