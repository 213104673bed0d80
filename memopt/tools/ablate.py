"""memopt.ablate: the pipeline with passes switched on and off, one row per configuration.

Configurations: no passes, each pass alone, all passes but each one, and all passes; and,
when asked, all passes with the precision pass narrowing weights to each format asked
for (int8, int4, bf16), or storing a training step's saved activations in bfloat16
("saved-bf16"): rows whose results differ from eager's by design. One
capture and one eager byte count serve every configuration (`analysis.analyze_captured`);
a pass list that two configurations share (with two passes, "only cleanup" is "all but
fusion") is run once.

Per row: bytes moved and kernels (modelled), predicted time on a device (modelled), the
pipeline's compile time (measured), and with `run=True` the median run time of the compiled
program (measured) and a check of its outputs against eager.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from memopt.compiler.eager_count import count_eager_bytes
from memopt.config import Config
from memopt.driver.analyze import Captures, analyze_captured, describe_target
from memopt.driver.measure import (
    compile_program,
    median_ms,
    relative_error,
    run_and_check,
    run_step,
)
from memopt.errors import MemoptError, OptionError
from memopt.passes import OPT_IN_PASSES
from memopt.reports.summary import format_bytes, format_table

# Where each column's figure comes from; never mixed within a column.
LABELS = {
    "bytes_moved": "modelled",
    "kernels": "modelled",
    "predicted_s": "modelled",
    "compile_ms": "measured",
    "run_ms": "measured",
}
# The ablation's name for the precision pass storing saved activations in bfloat16.
SAVED_BF16 = "saved-bf16"

CSV_COLUMNS = (
    "config",
    "passes",
    "bytes_moved",
    "kernels",
    "predicted_s",
    "compile_ms",
    "run_ms",
    "check",
    "precision",
)


@dataclass(frozen=True)
class AblationRow:
    """One configuration of the pipeline and what it gives."""

    config: str  # "no passes", "only fusion", "all but fusion", "all passes"
    passes: tuple[str, ...]  # the passes run, in order
    bytes_moved: int  # modelled
    kernels: int  # modelled
    predicted_s: float  # modelled: roofline seconds on the ablation's device
    compile_ms: float  # measured: the pass pipeline over every graph (no capture, no codegen)
    run_ms: float | None = None  # measured: median step time of the compiled program
    check: str | None = None  # "ok", or how the compiled program's output differs from eager
    # The precision pass's choice in this configuration (a weight format, "int8", ..., or
    # "saved-bf16"), else None: its check is the error against eager (measured), not a
    # pass/fail.
    precision: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "config": self.config,
            "passes": list(self.passes),
            "bytes_moved": self.bytes_moved,
            "kernels": self.kernels,
            "predicted_s": self.predicted_s,
            "compile_ms": round(self.compile_ms, 3),
            "run_ms": None if self.run_ms is None else round(self.run_ms, 4),
            "check": self.check,
            "precision": self.precision,
        }


@dataclass
class Ablation(Sequence[AblationRow]):
    """The rows of an ablation (a sequence of AblationRow) and the figures they share."""

    target: str
    training: bool
    device: str
    eager_bytes: int  # counted
    lower_bound_bytes: int  # modelled
    rows: list[AblationRow] = field(default_factory=list)
    eager_run_ms: float | None = None  # measured, with run=True
    repeats: int = 0  # timed steps per configuration, with run=True

    def __getitem__(self, index):  # type: ignore[override]
        return self.rows[index]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[AblationRow]:
        return iter(self.rows)

    def row(self, config: str) -> AblationRow:
        """The row of one configuration by name ("all passes", "only fusion", ...)."""
        for row in self.rows:
            if row.config == config:
                return row
        raise KeyError(f"no configuration {config!r}; have: {', '.join(r.config for r in self)}")

    def format(self) -> str:
        """The table `memopt ablate` prints (plain text, aligned, at most 110 wide)."""
        mode = "training (forward + backward)" if self.training else "inference"
        lines = [
            f"memopt ablate: {self.target}",
            f"  mode         {mode}",
            f"  eager        {format_bytes(self.eager_bytes)} ({self.eager_bytes:,} B, counted)",
            f"  lower bound  {format_bytes(self.lower_bound_bytes)} "
            f"({self.lower_bound_bytes:,} B, modelled)",
        ]
        if self.eager_run_ms is not None:
            lines.append(
                f"  eager run    {self.eager_run_ms:,.3f} ms (measured, median of {self.repeats})"
            )
        baseline = self.rows[0].bytes_moved if self.rows else 0
        run = any(r.run_ms is not None for r in self.rows)
        header = [
            "configuration",
            "passes",
            "bytes",
            "vs none",
            "kernels",
            f"{self.device} us",
            "compile ms",
        ]
        if run:
            header += ["run ms", "check"]
        table = []
        for r in self.rows:
            cells = [
                r.config,
                ",".join(r.passes) or "-",
                format_bytes(r.bytes_moved),
                _percent(r.bytes_moved - baseline, baseline),
                str(r.kernels),
                f"{r.predicted_s * 1e6:,.2f}",
                f"{r.compile_ms:,.1f}",
            ]
            if run:
                cells += ["-" if r.run_ms is None else f"{r.run_ms:,.3f}", r.check or "-"]
            table.append(cells)
        align = "llrrrrr" + ("rl" if run else "")
        lines += ["", *format_table(header, table, align, max_widths=[24, 28])]
        measured = "compile ms, run ms: measured" if run else "compile ms: measured"
        lines += [
            "",
            f"bytes, kernels, {self.device} us (roofline): modelled; {measured}",
        ]
        return "\n".join(line.rstrip() for line in lines) + "\n"

    def to_csv(self) -> str:
        """One line per row; columns CSV_COLUMNS; passes joined by '+'."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for r in self.rows:
            d = r.to_dict()
            d["passes"] = "+".join(r.passes)
            writer.writerow(["" if d[c] is None else d[c] for c in CSV_COLUMNS])
        return buffer.getvalue()

    def to_dict(self) -> dict[str, object]:
        """The JSON form: shared figures with their labels, then the rows."""
        eager_run = None
        if self.eager_run_ms is not None:
            eager_run = {"value": round(self.eager_run_ms, 4), "label": "measured"}
        return {
            "target": self.target,
            "training": self.training,
            "device": self.device,
            "eager_bytes": {"value": self.eager_bytes, "label": "counted"},
            "lower_bound_bytes": {"value": self.lower_bound_bytes, "label": "modelled"},
            "eager_run_ms": eager_run,
            "repeats": self.repeats,
            "labels": dict(LABELS),
            "rows": [r.to_dict() for r in self.rows],
        }

    def plot(self, path: str | Path) -> None:
        """Bytes per configuration as a bar chart (PNG); needs matplotlib, an optional extra."""
        plt = require_matplotlib()
        names = [r.config for r in self.rows]
        largest = max([r.bytes_moved for r in self.rows] + [self.eager_bytes, 1])
        # The largest binary unit in which the biggest bar is at least 1.
        power = max(k for k in range(5) if k == 0 or largest >= 1024**k)
        unit, scale = ("B", "KiB", "MiB", "GiB", "TiB")[power], 1024**power
        figure, axes = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
        axes.barh(names, [r.bytes_moved / scale for r in self.rows], color="#4c72b0")
        axes.invert_yaxis()  # first configuration on top, as in the table
        axes.axvline(
            self.eager_bytes / scale, color="#c44e52", linestyle="--", label="eager (counted)"
        )
        axes.axvline(
            self.lower_bound_bytes / scale,
            color="#55a868",
            linestyle=":",
            label="lower bound (modelled)",
        )
        axes.set_xlabel(f"{unit} moved (modelled)")
        axes.set_title(f"memopt ablate: {self.target}")
        axes.legend(loc="lower right")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)


def require_matplotlib():
    """matplotlib.pyplot with a file-only backend; a MemoptError saying how to get it if absent."""
    try:
        import matplotlib
    except ImportError:
        raise MemoptError(
            "plotting needs matplotlib, which is not installed (pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    return plt


def configurations(passes: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(name, pass list) for: no passes, each pass alone, all but each pass, all passes."""
    passes = tuple(passes)
    configs = [("no passes", ())]
    configs += [(f"only {name}", (name,)) for name in passes]
    configs += [
        (f"all but {name}", tuple(p for k, p in enumerate(passes) if k != index))
        for index, name in enumerate(passes)
    ]
    configs.append(("all passes", passes))
    return configs


def ablate(
    fn: Callable,
    *example_inputs: object,
    training: bool = False,
    dynamic: bool = False,
    run: bool = False,
    repeats: int = 10,
    progress: Callable[[str], None] | None = None,
    precision: Sequence[str] = (),
    **options: object,
) -> Ablation:
    """Run the pipeline on `fn(*example_inputs)` with passes on and off; one row each.

    `precision`: weight formats of the precision pass ("int8", "int4", "bf16"), each adding
    a row "all passes, <format> weights", and "saved-bf16", a row "all passes, bf16 saved
    activations" (a training step's; the pass's other options, if given, kept).

    The passes ablated are the configured ones (`passes` minus `disable`, default the
    default pipeline); other options (device, fuel, pass_options, backend) apply to every
    configuration. With run=True each configuration is compiled, run once and compared
    with eager (`check`), then timed over `repeats` steps (`run_ms`, the median).
    `progress(message)` is told when each configuration starts and ends.
    """
    say = progress or (lambda message: None)
    base = Config.from_options(options)
    configs = [(name, passes, options) for name, passes in configurations(base.pass_names())]
    for kind in precision:
        if kind == SAVED_BF16 and not training:
            raise OptionError(
                f"precision {SAVED_BF16!r} narrows a training step's saved activations: "
                "ablate with training=True (--train)"
            )
        narrowed = _with_precision_choice(options, kind)  # an OptionError for a bad one, now
        names = Config.from_options(narrowed).pass_names()
        if "precision" not in names:  # an explicit pass list: the pass joins it at its place
            narrowed["passes"] = _with_precision(names)
        label = "bf16 saved activations" if kind == SAVED_BF16 else f"{kind} weights"
        configs.append(
            (f"all passes, {label}", Config.from_options(narrowed).pass_names(), narrowed)
        )
    say("counting eager bytes and capturing ...")
    eager = count_eager_bytes(fn, tuple(example_inputs), training=training)
    # Passes that act during capture (attention rewrites the traced graph before
    # AOTAutograd; recompute chooses the forward/backward partition, costed through the
    # configuration's other passes) make configurations need captures of their own.
    captures = Captures(fn, example_inputs, training=training, dynamic=dynamic)

    result = Ablation(
        target=describe_target(fn),
        training=training,
        device=base.device,
        eager_bytes=eager.total_bytes,
        lower_bound_bytes=0,
        repeats=repeats if run else 0,
    )
    expected = None
    if run:
        say("running eager ...")
        expected, _ = run_step(fn, fn, example_inputs, training)
        result.eager_run_ms = median_ms(fn, fn, example_inputs, training, repeats)

    done: dict[tuple[str, ...], AblationRow] = {}
    for index, (name, passes, row_options) in enumerate(configs, start=1):
        prefix = f"[{index}/{len(configs)}] {name}"
        choice = _precision_choice(row_options) if "precision" in passes else None
        key = (*passes, choice or "")
        if key in done:
            result.rows.append(replace(done[key], config=name))
            say(f"{prefix}: same passes as {done[key].config}")
            continue
        say(f"{prefix} ...")
        config_options = {**row_options, "passes": list(passes), "disable": []}
        config = Config.from_options(config_options)
        analysis = analyze_captured(
            captures.for_config(config),
            config,
            target=result.target,
            eager_bytes=eager.total_bytes,
            eager_ops=eager.ops,
        )
        result.lower_bound_bytes = analysis.lower_bound_bytes
        row = AblationRow(
            config=name,
            passes=passes,
            bytes_moved=analysis.bytes_moved,
            kernels=len(analysis.kernels),
            predicted_s=analysis.predict(base.device),
            compile_ms=analysis.pipeline_ms,
            precision=choice,
        )
        if run:
            row = _measured(
                row, fn, example_inputs, training, dynamic, config_options, repeats, expected
            )
        done[key] = row
        result.rows.append(row)
        timing = f", run {row.run_ms:,.3f} ms, {row.check}" if row.run_ms is not None else ""
        kernels = f"{row.kernels} kernel{'' if row.kernels == 1 else 's'}"
        say(f"{prefix}: {format_bytes(row.bytes_moved)}, {kernels}{timing}")
    return result


def _measured(
    row: AblationRow,
    fn: Callable,
    inputs: Sequence[object],
    training: bool,
    dynamic: bool,
    options: dict[str, object],
    repeats: int,
    expected: list,
) -> AblationRow:
    program = compile_program(fn, {**options, "check": False}, dynamic=dynamic)
    problem = run_and_check(program, fn, inputs, training, expected)  # compiles on this call
    if problem is not None and problem.startswith("raised"):
        return replace(row, check=problem)
    check = "ok" if problem is None else f"differs: {problem}"
    if row.precision is not None:  # differs by design: how much is the figure
        actual, _ = run_step(program, fn, inputs, training)
        check = f"error {relative_error(expected, actual):.1e} (by design)"
    return replace(row, run_ms=median_ms(program, fn, inputs, training, repeats), check=check)


def _with_precision_choice(options: dict[str, object], kind: str) -> dict[str, object]:
    """`options` with the precision pass narrowing weights to `kind`, or saved activations
    for SAVED_BF16 (run even where `disable` names it: the row is asked for by name)."""
    passes = dict(options.get("pass_options") or {})
    choice = {"saved_activations": "bf16"} if kind == SAVED_BF16 else {"weights": kind}
    passes["precision"] = {**passes.get("precision", {}), **choice}
    disable = options.get("disable") or ()
    if isinstance(disable, str):
        disable = disable.split(",")
    kept = [name.strip() for name in disable if name.strip() != "precision"]
    return {**options, "pass_options": passes, "disable": kept}


def _with_precision(names: Sequence[str]) -> list[str]:
    after = OPT_IN_PASSES["precision"]
    at = names.index(after) + 1 if after in names else 0
    return [*names[:at], "precision", *names[at:]]


def _precision_choice(options: dict[str, object]) -> str | None:
    """What the precision pass narrows in `options`: a weight format, SAVED_BF16, both
    ("int8 + saved-bf16"), or None."""
    chosen = (options.get("pass_options") or {}).get("precision", {})
    weights, saved = chosen.get("weights", "none"), chosen.get("saved_activations", "float32")
    kinds = [*([weights] if weights != "none" else []), *([SAVED_BF16] if saved == "bf16" else [])]
    return " + ".join(kinds) or None


def _percent(change: int, whole: int) -> str:
    return f"{100 * change / whole:+.1f}%" if whole else "n/a"
