"""The `memopt` command: reports on examples and files, JSON output, and one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memopt
from memopt import examples
from memopt.cli import main
from memopt.driver.targets import load_target
from memopt.errors import TargetError
from memopt.reports.summary import MAX_WIDTH, format_bytes

ROOT = Path(__file__).resolve().parents[1]

# A target file with a tiny model, so file-target tests take well under a second.
TARGET_FILE = """\
import torch


def scale_relu(x, y):
    return (x * y).relu() + 1


def example():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 4), torch.randn(2, 8)  # a bare tensor: load_target wraps it


def pointwise():
    return scale_relu, [torch.randn(16), torch.randn(16)]  # a list: load_target makes a tuple


def junk():
    return 42


def boom():
    raise RuntimeError("no model today\\nsecond line")


class Helper:
    pass
"""

TOTALS_LINE = re.compile(
    r"^  (eager|optimized|lower bound) +([\d,]+) +\S+ \S+ +(counted|modelled)$"
)


def run_captured(args: list[str]) -> tuple[int, str, str]:
    """main(args) with stdout and stderr captured (for module-scoped fixtures, not capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(args)
    return status, out.getvalue(), err.getvalue()


def totals(report: str) -> dict[str, tuple[int, str]]:
    """The totals table as printed: row name -> (bytes, source label)."""
    rows = {}
    for line in report.splitlines():
        match = TOTALS_LINE.match(line)
        if match:
            rows[match[1]] = (int(match[2].replace(",", "")), match[3])
    return rows


@pytest.fixture(scope="module")
def default_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, str, Path]:
    """`memopt report --json PATH` on the default example, run once for several tests."""
    json_path = tmp_path_factory.mktemp("report") / "analysis.json"
    status, out, err = run_captured(["report", "--json", str(json_path)])
    return status, out, err, json_path


@pytest.fixture(scope="module")
def default_analysis() -> memopt.Analysis:
    target = load_target(examples.DEFAULT_EXAMPLE)
    return memopt.analyze(target.fn, *target.inputs)


@pytest.fixture
def target_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_model.py"
    path.write_text(TARGET_FILE)
    return path


# --- reports --------------------------------------------------------------------------------


def test_default_report_prints_totals_and_ledger(default_report, default_analysis):
    status, out, err, _ = default_report
    assert status == 0, err
    assert f"memopt: loading {examples.DEFAULT_EXAMPLE} ..." in err
    assert "memopt: analyzing" in err
    assert out.startswith(f"memopt report: {examples.DEFAULT_EXAMPLE}")
    assert "inference" in out.splitlines()[1]

    a = default_analysis
    assert totals(out) == {
        "eager": (a.eager_bytes, "counted"),
        "optimized": (a.bytes_moved, "modelled"),
        "lower bound": (a.lower_bound_bytes, "modelled"),
    }
    assert f"kernels                  {len(a.kernels)}  (eager ran {a.eager_ops} ATen ops" in out
    assert "Predicted time on h100 (modelled)" in out
    assert "Pass ledger" in out
    for summary in a.ledger:
        assert re.search(rf"^  {re.escape(summary.pass_name)} ", out, re.MULTILINE)


def test_report_is_plain_and_narrow(default_report):
    _, out, _, _ = default_report
    assert "\x1b" not in out  # no colour codes
    assert max(len(line) for line in out.splitlines()) <= MAX_WIDTH


def test_json_output_has_labelled_totals(default_report, default_analysis):
    status, out, err, json_path = default_report
    assert status == 0
    assert f"memopt: wrote {json_path}" in err
    data = json.loads(json_path.read_text())
    eager = {"value": default_analysis.eager_bytes, "label": "counted"}
    assert data["totals"]["eager_bytes"] == eager
    assert data["totals"]["bytes_moved"]["value"] == default_analysis.bytes_moved
    assert data["totals"]["bytes_moved"]["label"] == "modelled"
    assert data["totals"]["lower_bound_bytes"]["label"] == "modelled"
    prediction = data["predictions"]["h100"]
    assert prediction["label"] == "modelled"
    assert prediction["seconds"] == pytest.approx(default_analysis.predict("h100"))
    assert totals(out)["optimized"][0] == data["totals"]["bytes_moved"]["value"]


@pytest.mark.parametrize("factory", ["", ":pointwise"])
def test_report_on_file_target(target_file, factory, capsys):
    spec = f"{target_file}{factory}"
    assert main(["report", spec, "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"memopt report: {spec}")
    assert set(totals(out)) == {"eager", "optimized", "lower bound"}


def test_report_passes_only_given_options(target_file, capsys):
    spec = f"{target_file}:pointwise"
    assert main(["report", spec, "--disable", "cleanup", "--fuel", "0"]) == 0
    out = capsys.readouterr().out
    assert "options   disable=cleanup, fuel=0" in out


def test_pass_options_on_the_command_line(capsys):
    args = ["report", "mlp", "--pass-option", "precision.weights=int8"]
    assert main([*args, "--pass-option", "precision.max_error=0.5"]) == 0
    out = capsys.readouterr().out
    assert "pass_options={'precision': {'weights': 'int8', 'max_error': 0.5}}" in out
    assert "Narrowed weights" in out and out.count("  narrowed  ") == 2  # fc1, fc2
    assert main(["report", "mlp", "--pass-option", "precision.weights=int3"]) == 2
    assert "option 'weights' of pass 'precision' takes one of" in capsys.readouterr().err
    assert main(["report", "mlp", "--pass-option", "precision"]) == 2
    assert "expected PASS.OPTION=VALUE" in capsys.readouterr().err


def test_report_training_on_mlp(capsys):
    assert main(["report", "mlp", "--train", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "training (forward + backward)" in out
    assert "backward" in out.splitlines()[3]  # the graphs line lists the backward graph
    assert totals(out)["eager"][0] > 0


@pytest.mark.parametrize("name", ["mlp", "convnet", "layernorm_gelu"])
def test_every_example_reports(name, capsys):
    # The default example is covered above; each of the others must load, capture and run.
    assert main(["report", name, "--top", "3"]) == 0
    assert capsys.readouterr().out.startswith(f"memopt report: {name}")


@pytest.mark.slow
def test_convnet_trains(capsys):
    # --train puts the eval-mode example into train mode: batchnorm with batch statistics.
    assert main(["report", "convnet", "--train", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "training (forward + backward)" in out


def test_function_trains_with_respect_to_its_inputs(target_file, capsys):
    # A plain function has no parameters: --train differentiates its floating-point inputs.
    assert main(["report", f"{target_file}:pointwise", "--train", "--top", "3"]) == 0
    captured = capsys.readouterr()
    assert "training (forward + backward)" in captured.out
    assert "differentiating with respect to floating-point inputs 0, 1" in captured.err


def test_examples_lists_every_example(capsys):
    assert main(["examples"]) == 0
    out = capsys.readouterr().out
    for name, description in examples.EXAMPLES.items():
        assert f"{name}  " in out and description in out


@pytest.mark.slow
def test_python_dash_m_memopt():
    result = subprocess.run(
        [sys.executable, "-m", "memopt", "report", "mlp", "--top", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "memopt report: mlp" in result.stdout


# --- errors: one line on stderr, exit status 2 ----------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "no_such_example"], "unknown example 'no_such_example'; built-in examples: "),
        (["report", "{dir}/missing.py"], "not found"),
        (["report", "{dir}/broken.py"], "SyntaxError"),
        (["report", "{file}:nothing"], "no factory 'nothing'; callables it defines: Helper, boom,"),
        (["report", "{file}:junk"], "junk() in tiny_model.py must return (model_or_fn, inputs)"),
        (["report", "{file}:boom"], "boom() in tiny_model.py raised RuntimeError: no model today"),
        (["report", "mlp", "--device", "abacus"], "unknown device 'abacus'"),
        (["report", "mlp", "--disable", "cleanup,nonsense"], "unknown pass 'nonsense'"),
        (["report", "mlp", "--top", "many"], "--top"),
        (["frobnicate"], "invalid choice"),
        ([], "missing command"),
    ],
)
def test_errors_are_one_line_with_status_2(args, message, target_file, capsys):
    (target_file.parent / "broken.py").write_text("def f(:\n")
    args = [a.format(dir=target_file.parent, file=target_file) for a in args]
    assert main(args) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("memopt: error: ")]
    assert len(errors) == 1, captured.err
    assert message in errors[0]
    assert "Traceback" not in captured.err
    assert all(line.startswith("memopt: ") for line in captured.err.splitlines())
    assert captured.out == ""


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupt(spec):
        raise KeyboardInterrupt

    monkeypatch.setattr("memopt.driver.targets.load_target", interrupt)
    assert main(["report", "mlp"]) == 130


# --- units ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024**2 - 1, "1.0 MiB"),  # rounds up into the next unit, never "1024.0 KiB"
        (12 * 1024**2, "12.0 MiB"),
        (3 * 1024**3 + 512 * 1024**2, "3.5 GiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_bytes(nbytes, text):
    assert format_bytes(nbytes) == text


def test_load_target_default_and_wrapping(target_file):
    assert load_target(None).name == examples.DEFAULT_EXAMPLE
    single = load_target(str(target_file))
    assert isinstance(single.fn, torch.nn.Linear)
    assert isinstance(single.inputs, tuple) and len(single.inputs) == 1
    listed = load_target(f"{target_file}:pointwise")
    assert listed.fn.__name__ == "scale_relu" and isinstance(listed.inputs, tuple)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gpt3", "unknown example 'gpt3'; built-in examples: gpt2_block, mlp"),
        ("{dir}/absent.py", "not found"),
        ("{dir}", "is a directory"),
        ("{dir}/broken.py", "cannot import"),
        ("{file}:missing", "it defines: Helper, boom, example, junk, pointwise, scale_relu"),
        ("{file}:junk", "got an int"),
        ("{file}:boom", "raised RuntimeError: no model today"),
        ("{file}:", "not a valid factory name"),
    ],
)
def test_load_target_errors(spec, message, target_file):
    (target_file.parent / "broken.py").write_text("x = (\n")
    spec = spec.format(dir=target_file.parent, file=target_file)
    with pytest.raises(TargetError) as error:
        load_target(spec)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
