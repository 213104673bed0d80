"""`memopt report --out`: the HTML page, analysis.json (validated), per-pass diffs, kernels;
and `memopt diff`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import memopt
from memopt.cli import main
from memopt.passes import DEFAULT_PIPELINE
from memopt.reports.diff import parse_line, side_by_side, unified_diff
from memopt.reports.writer import write_report

from models import Block

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs" / "analysis-schema.json").read_text())
TIMING_KEYS = {"elapsed_ms", "capture_ms", "pipeline_ms"}
# Each pass's step name in reports: its place in the pipeline, then its name.
STEPS = [f"{index:02d}-{name}" for index, name in enumerate(DEFAULT_PIPELINE, start=1)]
FUSION = STEPS[DEFAULT_PIPELINE.index("fusion")]
CLEANUP = STEPS[DEFAULT_PIPELINE.index("cleanup")]


def program(x):
    """Rewrites for both default passes: a no-op copy and a common subexpression (cleanup),
    and a softmax-like reduction chain (fusion)."""
    y = x.exp() + x.exp() + torch.cat([x.clone()])
    return (y - y.amax(1, keepdim=True)).exp().sum(1)


def x48():
    return torch.randn(4, 8)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return memopt.report(program, x48(), out=out)


# --- a small JSON Schema validator (the subset docs/analysis-schema.json uses) ---------------

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_errors(value, schema, root=None, path="$") -> list[str]:
    """Errors of `value` against `schema`: $ref (local), type, enum, required, properties,
    additionalProperties, items."""
    root = root if root is not None else schema
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return schema_errors(value, target, root, path)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return [f"{path}: {value!r:.60} is not of type {'/'.join(types)}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        errors += [
            f"{path}: missing {key!r}" for key in schema.get("required", ()) if key not in value
        ]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], root, f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected {key!r}")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, root, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += schema_errors(item, schema["items"], root, f"{path}[{index}]")
    return errors


def validate(data: dict) -> None:
    errors = schema_errors(data, SCHEMA)
    assert not errors, "\n".join(errors[:10])
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.Draft202012Validator(SCHEMA).validate(data)


def test_the_validator_rejects_what_it_should(written):
    data = json.loads(written.json.read_text())
    broken = json.loads(json.dumps(data))
    del broken["totals"]["eager_bytes"]
    broken["graphs"][0]["kernels"][0]["flops"] = "many"
    broken["totals"]["bytes_moved"]["label"] = "measured"
    broken["surprise"] = 1
    errors = schema_errors(broken, SCHEMA)
    assert any("missing 'eager_bytes'" in e for e in errors)
    assert any("flops" in e and "integer" in e for e in errors)
    assert any("'measured' is not one of" in e for e in errors)
    assert any("unexpected 'surprise'" in e for e in errors)


# --- files ---------------------------------------------------------------------------------


def test_report_writes_every_file(written):
    a = written.analysis
    out = written.out
    assert written.index == out / "index.html" and written.index.is_file()
    assert written.json == out / "analysis.json" and written.json.is_file()
    steps = [e.pass_name for e in a.graphs[0].ledger]
    assert steps == list(DEFAULT_PIPELINE)
    assert sorted(p.name for p in (out / "diffs").iterdir()) == [f"{step}.diff" for step in STEPS]
    fusion_diff = (out / "diffs" / f"{FUSION}.diff").read_text()
    assert fusion_diff.startswith(f"--- inference before {FUSION}\n+++ inference after {FUSION}\n")
    assert "+%inference_fused_0" in fusion_diff
    cleanup_diff = (out / "diffs" / f"{CLEANUP}.diff").read_text()
    assert "-%clone" in cleanup_diff

    kernels = sorted(p.name for p in (out / "kernels").iterdir())
    assert "inference_fused_0.ir" in kernels
    ir = (out / "kernels" / "inference_fused_0.ir").read_text()
    assert ir.startswith("kernel inference_fused_0 (reduction)")
    assert set(written.kernel_files) == {out / "kernels" / name for name in kernels}


def test_triton_source_is_written_when_it_renders(written):
    source = (written.out / "kernels" / "inference_fused_0.py").read_text()
    assert "@triton.jit" in source


def test_analysis_json_validates_and_matches(written):
    data = json.loads(written.json.read_text())
    validate(data)
    a = written.analysis
    assert data["totals"]["bytes_moved"]["value"] == a.bytes_moved
    assert data["totals"]["eager_bytes"] == {"value": a.eager_bytes, "label": "counted"}
    assert set(data["predictions"]) >= {"h100", "a100", "mi300x"}
    assert data["report"]["device"] == "h100"
    assert [d["path"] for d in data["report"]["diffs"]] == [f"diffs/{step}.diff" for step in STEPS]
    (source,) = data["report"]["kernel_sources"]
    assert source["ir"] == "kernels/inference_fused_0.ir"
    assert source["kernel"] in {k.name for k in a.kernels}


def test_report_json_of_a_training_program_validates(tmp_path):
    block = Block().train()
    written = memopt.report(block, torch.randn(2, 8, 32), out=tmp_path, training=True)
    data = json.loads(written.json.read_text())
    validate(data)
    assert [g["name"] for g in data["graphs"]] == ["forward", "backward"]
    # One diff file per pipeline step, each with both graphs.
    for path in written.diffs:
        text = path.read_text()
        assert "forward" in text and "backward" in text
    html = written.index.read_text()
    assert html.count('class="pass-diff"') == len(written.diffs)


def test_names_are_deterministic_and_stale_files_go(tmp_path):
    first = memopt.report(program, x48(), out=tmp_path / "a")
    (tmp_path / "b" / "kernels").mkdir(parents=True)
    (tmp_path / "b" / "kernels" / "old_kernel.ir").write_text("stale")
    (tmp_path / "b" / "diffs").mkdir()
    (tmp_path / "b" / "diffs" / "07-gone.diff").write_text("stale")
    second = memopt.report(program, x48(), out=tmp_path / "b")

    def files(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): p.read_text()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".diff", ".ir", ".py")
        }

    assert files(first.out) == files(second.out)  # same names, same contents

    def without_timings(value):
        if isinstance(value, dict):
            return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
        if isinstance(value, list):
            return [without_timings(v) for v in value]
        return value

    one, two = (without_timings(json.loads(r.json.read_text())) for r in (first, second))
    one["target"] = two["target"]
    assert one == two


def test_missing_triton_renderer_is_reported_not_fatal(tmp_path, monkeypatch):
    import dataclasses

    from memopt.backends import registry

    def unavailable(kernel):
        raise ImportError("no module named 'triton'")

    triton = dataclasses.replace(registry.get_backend("triton"), source_file=unavailable)
    monkeypatch.setitem(registry._BACKENDS, "triton", triton)
    written = memopt.report(program, x48(), out=tmp_path)
    assert not list((tmp_path / "kernels").glob("*.py"))
    assert (tmp_path / "kernels" / "inference_fused_0.ir").is_file()
    (source,) = json.loads(written.json.read_text())["report"]["kernel_sources"]
    assert source["triton"] is None and "unavailable" in source["triton_error"]
    assert "No Triton source" in written.index.read_text()


# --- the page --------------------------------------------------------------------------------


def test_page_has_totals_ledger_kernels_and_one_diff_per_pass(written):
    html = written.index.read_text()
    a = written.analysis
    assert html.startswith("<!DOCTYPE html>")
    for row, value in [
        ("eager", a.eager_bytes),
        ("optimized", a.bytes_moved),
        ("lower-bound", a.lower_bound_bytes),
    ]:
        assert re.search(rf'<tr id="total-{row}"><td>[^<]+</td><td class="n">{value:,}</td>', html)
    assert "counted" in html and "modelled" in html
    sections = re.findall(r'<section class="pass-diff" id="diff-(\d\d-\w+)">', html)
    assert sections == STEPS
    for anchor in sections:
        assert f'href="#diff-{anchor}"' in html  # the ledger links to each diff
    fusion = html[html.index(f'id="diff-{FUSION}"') :]
    assert 'class="k-merged"' in fusion and "from %" in fusion  # fused nodes, and their sources
    cleanup = html[html.index(f'id="diff-{CLEANUP}"') : html.index(f'id="diff-{STEPS[1]}"')]
    assert 'class="k-removed"' in cleanup or 'class="k-merged"' in cleanup
    assert '<table id="kernel-table" class="sortable">' in html
    assert html.count("<tr><td>inference.k") == len(a.kernels)
    for heading in ("Missed opportunities", "Generated kernels", "Predicted time per device"):
        assert heading in html
    assert 'id="src-inference_fused_0"' in html


class _TagBalance(HTMLParser):
    VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.problems: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def test_page_is_well_formed(written):
    parser = _TagBalance()
    parser.feed(written.index.read_text())
    assert parser.problems == [] and parser.stack == []


def test_page_is_self_contained(written):
    html = written.index.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<link" not in html and "@import" not in html
    assert "<script src" not in html


def test_page_escapes_program_text(written, tmp_path):
    written.analysis.target = "<b>evil & co</b>"
    try:
        page = write_report(written.analysis, tmp_path).index.read_text()
    finally:
        written.analysis.target = "program"
    assert "<b>evil" not in page
    assert "&lt;b&gt;evil &amp; co&lt;/b&gt;" in page


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def rendered_dom(page: Path) -> str:
    """The DOM headless Chromium builds from `page` (scripts run), as HTML text."""
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"]
    result = subprocess.run([*command, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium installed")
def test_page_renders_in_headless_chromium(written):
    dom = rendered_dom(written.index)
    assert "Totals" in dom and 'id="kernel-table"' in dom
    assert f"{written.analysis.bytes_moved:,}" in dom


# --- diffs -----------------------------------------------------------------------------------

BEFORE = """\
%x: f32[4, 8] = input
%mul: f32[4, 8] = aten.mul.Tensor(%x, 2)  # 256 B
%exp: f32[4, 8] = aten.exp.default(%mul)  # 256 B
%t: f32[8, 4](1, 8) = aten.permute.default(%exp, [1, 0])  # view
%clone: f32[4, 8] = aten.clone.default(%x)  # 256 B
%add: f32[4, 8] = aten.add.Tensor(%exp, %clone)  # 384 B
return (%add, %t)
"""
AFTER = """\
%x: f32[4, 8] = input
%fused_0: (f32[4, 8]) = memopt.fused_0(%x)  # 256 B
%exp: f32[4, 8] = operator.getitem(%fused_0, 0)  # view
%t: f32[8, 4] = aten.permute.default(%exp, [1, 0])  # view
%add: f32[4, 8] = aten.add.Tensor(%exp, %x)  # 384 B
return (%add, %t)
"""


def test_parse_line():
    node = parse_line("%mul: f32[4, 8] = aten.mul.Tensor(%x, 2)  # 256 B")
    assert (node.name, node.meta, node.expr, node.nbytes) == (
        "mul",
        "f32[4, 8]",
        "aten.mul.Tensor(%x, 2)",
        256,
    )
    view = parse_line("%t: f32[8, 4](1, 8) = aten.permute.default(%exp, [1, 0])  # view")
    assert view.is_view and view.nbytes is None
    assert parse_line("return (%add,)").name == "return"


def test_side_by_side_marks_each_kind():
    rows = side_by_side(BEFORE, AFTER, merged={"mul", "exp"}, members={"fused_0": ("mul", "exp")})
    kinds = {
        (r.before.name if r.before else None, r.after.name if r.after else None): r.kind
        for r in rows
    }
    assert kinds[("x", "x")] == "same"
    assert kinds[("mul", "fused_0")] == "merged"  # the fused node shares its first member's row
    assert kinds[("exp", "exp")] == "changed"  # same name, now a getitem of the kernel
    assert kinds[("t", "t")] == "relaid"  # same node, new strides
    assert kinds[("clone", None)] == "removed"
    assert kinds[("add", "add")] == "changed"
    fused_row = next(r for r in rows if r.after and r.after.name == "fused_0")
    assert fused_row.note == "from %mul, %exp"


def test_unified_diff_is_empty_for_equal_graphs():
    assert unified_diff(BEFORE, BEFORE, "a", "b") == ""
    text = unified_diff(BEFORE, AFTER, "a", "b")
    assert text.startswith("--- a\n+++ b\n") and "-%clone" in text


# --- the command ---------------------------------------------------------------------------


def test_cli_report_out_writes_the_report(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", "mlp", "--top", "3", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("memopt report: mlp")
    assert f"memopt: wrote {out / 'index.html'}" in captured.err
    data = json.loads((out / "analysis.json").read_text())
    validate(data)
    assert data["target"] == "mlp (MLP)"
    assert (out / "diffs" / f"{FUSION}.diff").is_file()


def test_cli_diff_of_one_pass(capsys):
    assert main(["diff", "mlp", "--pass", "fusion"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"--- inference before {FUSION}\n+++ inference after {FUSION}\n")
    assert "+%inference_fused_0" in out


def test_cli_diff_between_option_sets(capsys):
    assert main(["diff", "mlp", "--from", "disable=fusion", "--to", "passes=cleanup,fusion"]) == 0
    out = capsys.readouterr().out
    assert "--- inference (disable=fusion)" in out
    assert "+++ inference (passes=cleanup,fusion)" in out
    assert "+%inference_fused_0" in out


def test_cli_diff_of_the_whole_pipeline(capsys):
    assert main(["diff", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "--- inference (captured)" in out and "+++ inference (optimized)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["diff", "mlp", "--pass", "nonsense"], "unknown pass 'nonsense'"),
        (["diff", "mlp", "--pass", "cleanup", "--disable", "cleanup"], "not in the pipeline"),
        (["diff", "mlp", "--from", "disable=fusion"], "--from and --to go together"),
        (["diff", "mlp", "--from", "fuel=1", "--to", "colour=red"], "unknown option 'colour'"),
        (["diff", "mlp", "--from", "fuel", "--to", "fuel=1"], "expected key=value"),
        (["diff", "mlp", "--from", "passes=nope", "--to", "fuel=1"], "unknown pass 'nope'"),
        (["diff", "mlp", "--graph", "backward"], "no graph 'backward'"),
        (["report", "mlp", "--out", "{file}"], "is a file, not a directory"),
    ],
)
def test_cli_errors_are_one_line(args, message, tmp_path, capsys):
    path = tmp_path / "a_file"
    path.write_text("")
    assert main([a.format(file=path) for a in args]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("memopt: error: ")]
    assert len(errors) == 1 and message in errors[0], captured.err
    assert captured.out == ""


# --- the compiled section (memopt report --compile-for) ---------------------------------


def test_report_compiled_for_a_gpu_lists_each_launch(tmp_path):
    written = memopt.report(program, x48(), out=tmp_path, compile_for="h100", backend="triton")
    data = json.loads(written.json.read_text())
    validate(data)
    rows = data["compiled"]
    generated = [k.name for k in written.analysis.kernels if k.kind != "aten"]
    assert [row["kernel"] for row in rows] == generated and rows
    for row in rows:
        assert row["arch"] == "sm_90" and row["label"] == "compiled" and row["error"] is None
        assert row["registers"] > 0 and row["spill_bytes"] == 0
    page = written.index.read_text()
    assert '<h2 id="compiled">' in page and 'href="#compiled"' in page
    assert page.count("<tr><td>inference.k") >= len(rows)
    parser = _TagBalance()
    parser.feed(page)
    assert parser.problems == [] and parser.stack == []
    if _chromium() is not None:  # the section survives a browser's parse (and sorting script)
        dom = rendered_dom(written.index)
        assert 'id="compiled-kernels"' in dom and "sm_90" in dom


def test_cli_report_compile_for(capsys):
    assert main(["report", "mlp", "--compile-for", "mi300x", "--top", "0"]) == 0
    out = capsys.readouterr().out
    assert "Triton kernels compiled for mi300x (gfx942)" in out
    assert "0 failed to compile, 0 spill registers" in out


def test_cli_report_compile_for_an_unknown_gpu_is_one_line(capsys):
    assert main(["report", "mlp", "--compile-for", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown GPU device for offline compilation 'cpu'; valid choices: a100, h100" in err


def test_analyze_compile_for_keeps_the_rows_on_the_analysis():
    a = memopt.analyze(program, x48(), backend="triton", compile_for="mi300x")
    assert a.compiled and {row.compiled.arch for row in a.compiled} == {"gfx942"}
    assert [row["kernel"] for row in a.to_dict()["compiled"]] == [r.kernel for r in a.compiled]
    assert "compiled" not in memopt.analyze(program, x48()).to_dict()
    with pytest.raises(memopt.OptionError, match="unknown GPU device.*'tpu'"):
        memopt.analyze(program, x48(), compile_for="tpu")


def test_a_program_that_updates_an_input_gets_its_reads_split_by_source():
    """A decode-like step: a weight read, a cache updated at one row and read whole. Each
    node's reads are split into read-only inputs and updated inputs (state), exactly."""
    from memopt.reports.summary import format_analysis

    def step(x, w, cache, position):
        row = x @ w  # reads w: 64 x 32 floats
        cache.index_copy_(0, position, row)  # writes one row of the cache
        return (cache * 2).sum(0)  # reads the whole cache: 16 x 32 floats

    x, w = torch.randn(1, 64), torch.randn(64, 32)
    cache, position = torch.randn(16, 32), torch.tensor([3])
    a = memopt.analyze(step, x, w, cache, position)
    costs = {c.node: c for g in a.graphs for c in g.node_costs}
    mm = next(c for c in costs.values() if c.op == "aten.mm.default")
    assert (mm.input_read_bytes, mm.state_read_bytes) == (4 * (64 + 64 * 32), 0)
    reader = max(costs.values(), key=lambda c: c.state_read_bytes)
    assert reader.state_read_bytes == 4 * 16 * 32
    # The update writes its row of the cache and reads the new row (computed), not the cache.
    update = next(c for c in costs.values() if "index" in c.op)
    assert update.state_read_bytes == 0
    for c in costs.values():
        assert c.input_read_bytes + c.state_read_bytes <= c.read_bytes
    text = format_analysis(a)
    assert "of inputs" in text and "of state" in text
    (reads,) = [line for line in text.splitlines() if "of state (a cache)" in line]
    assert not re.search(r"-\d", reads)  # no negative "computed" figure
    plain = format_analysis(memopt.analyze(lambda x, w: x @ w, x, w))
    assert "of state" not in plain


@pytest.mark.parametrize("attention", ["aten", "memopt"])
def test_a_cache_concatenated_into_an_output_is_state_too(attention):
    """A dynamic cache's step: the cache concatenated with the new row and returned (the
    next cache). Its reads are state, whether the concatenation is a node of its own or
    written by memopt's appended attention; the weights' reads are inputs."""
    from memopt.reports.summary import format_analysis

    def step(x, w, k_cache, v_cache):
        q = (x @ w).view(1, 4, 1, 64)
        k = torch.cat([k_cache, q], dim=-2)
        v = torch.cat([v_cache, q * 2], dim=-2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v), k, v

    x, w = torch.randn(1, 64), torch.randn(64, 256)
    caches = [torch.randn(1, 4, 20, 64) for _ in "kv"]
    a = memopt.analyze(step, x, w, *caches, cpu_attention=attention)
    costs = [c for g in a.graphs for c in g.node_costs]
    assert sum(c.state_read_bytes for c in costs) == 2 * 4 * (4 * 20 * 64)
    assert sum(c.input_read_bytes for c in costs) == 4 * (64 + 64 * 256)
    for c in costs:
        assert c.input_read_bytes + c.state_read_bytes <= c.read_bytes
    assert "of state" in format_analysis(a)


def test_a_training_forward_returning_a_concatenation_has_no_state():
    """A training forward returns what its backward saves: a concatenation of a weight is
    not a next state, and the weight's reads stay the inputs'."""
    w, x = torch.randn(16, 16, requires_grad=True), torch.randn(16, 16)
    a = memopt.analyze(lambda w, x: (torch.cat([w, x]) @ w).sum(), w, x, training=True)
    assert not any(c.state_read_bytes for g in a.graphs for c in g.node_costs)


def test_a_gathered_table_never_makes_the_split_exceed_the_reads():
    """A kernel that gathers rows of a table (its cost: the rows) beside a cache it reads."""

    def step(table, index, cache, x):
        h = table[index] + cache
        cache.add_(x)
        return h.sum(0)

    table, index = torch.randn(1000, 32), torch.tensor([1, 5, 7, 9])
    cache, x = torch.randn(4, 32), torch.randn(4, 32)
    a = memopt.analyze(step, table, index, cache, x)
    for c in (c for g in a.graphs for c in g.node_costs):
        assert 0 <= c.input_read_bytes + c.state_read_bytes <= c.read_bytes
