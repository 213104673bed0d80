"""memopt bisect: the first rewrite decision after which the compiled program is wrong.

Fuel caps the rewrite decisions of a compilation (`fuel=k`: the first k applied, every
later one refused). With `fuel=0` the program runs unoptimized; with unlimited fuel it runs
fully optimized. If the second differs from eager and the first does not, a binary search
over k finds the k where `fuel=k-1` matches eager and `fuel=k` does not: decision k is the
miscompile (assuming, as every bisection does, that a program once wrong stays wrong).

Each probe compiles and runs the whole program (forward and backward when training) and
compares every output, and every gradient when training, with eager at the dtype's
tolerances. Decisions are numbered as `memopt.analyze` and the ledger number them: in the
order graphs are compiled, passes run, and each pass decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from memopt.config import Config
from memopt.driver.analyze import Captures, analyze_captured, describe_target
from memopt.driver.measure import compile_program, run_and_check, run_step
from memopt.driver.results import Analysis
from memopt.passes.ledger import Decision
from memopt.reports.diff import analysis_diff


@dataclass(frozen=True)
class Probe:
    """One compiled run: the fuel it had and how its output differed from eager (or None)."""

    fuel: int
    mismatch: str | None

    @property
    def matches(self) -> bool:
        return self.mismatch is None


@dataclass(frozen=True)
class BisectResult:
    """What `bisect` found. `status` says which of three outcomes it is."""

    target: str
    decisions: int  # rewrite decisions the fully optimized program applies
    first_bad: int | None  # k: fuel=k differs from eager, fuel=k-1 does not
    decision: Decision | None  # the decision fuel=k applied and fuel=k-1 did not
    mismatch: str | None  # how the program differs (at fuel=k, or everywhere)
    probes: tuple[Probe, ...] = ()
    graph_diff: str = ""  # the optimized graphs at fuel=k-1 against fuel=k
    options: dict[str, object] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """ "clean": every decision is fine; "found": decision `first_bad` is the first wrong
        one; "unoptimized": the program differs from eager with no rewrite at all (fuel=0),
        so no decision is to blame (capture, decomposition, or randomness)."""
        if self.first_bad is not None:
            return "found"
        return "clean" if self.mismatch is None else "unoptimized"

    def format(self) -> str:
        """The text `memopt bisect` prints."""
        tried = ", ".join(f"{p.fuel} {'ok' if p.matches else 'differs'}" for p in self.probes)
        lines = [
            f"memopt bisect: {self.target}",
            f"  decisions  {self.decisions} applied with unlimited fuel",
            f"  probes     fuel={tried}" if self.probes else "  probes     none",
            "",
        ]
        if self.status == "clean":
            lines.append(
                f"No miscompile: with all {self.decisions} decisions the program matches eager."
            )
        elif self.status == "unoptimized":
            lines += [
                "The program differs from eager with no rewrite at all (fuel=0): no decision is",
                "to blame (capture, decompositions or random ops).",
                f"  {self.mismatch}",
            ]
        else:
            d = self.decision
            assert d is not None
            lines += [
                f"First bad decision: #{self.first_bad} of {self.decisions} "
                f"(fuel={self.first_bad - 1} matches eager, fuel={self.first_bad} does not)",
                f"  pass    {d.pass_name} ({d.code})",
                f"  graph   {d.graph}",
                f"  what    {d.what}",
                f"  reason  {d.reason}",
                f"  nodes   {', '.join('%' + n for n in sorted(d.nodes)) or '-'}",
                f"  output  {self.mismatch}",
            ]
            if self.graph_diff:
                lines += ["", "The optimized graph, without and with this decision:", ""]
                lines += self.graph_diff.rstrip("\n").splitlines()
        return "\n".join(lines) + "\n"


def applied_decisions(analysis: Analysis) -> list[Decision]:
    """Applied decisions in fuel order: graph by graph, pass by pass, as each pass decided."""
    return [d for g in analysis.graphs for e in g.ledger for d in e.decisions if d.applied]


def bisect(
    fn: Callable,
    *example_inputs: object,
    training: bool = False,
    dynamic: bool = False,
    progress: Callable[[str], None] | None = None,
    **options: object,
) -> BisectResult:
    """Find the first rewrite decision after which `fn` compiled by memopt differs from eager.

    options: memopt's options (passes, disable, backend, pass_options, ...); `fuel` and
    `check` are set by the search. Runs the program once eagerly, once per probe compiled.
    """
    say = progress or (lambda message: None)
    base = {k: v for k, v in options.items() if k not in ("fuel", "check")}
    Config.from_options(base)  # a bad option fails before the slow part

    captures = Captures(fn, example_inputs, training=training, dynamic=dynamic)

    def analysis_at(fuel: int | None) -> Analysis:
        # Capture-time stages take decisions too: each fuel gets the capture it makes.
        config = Config.from_options({**base, "fuel": fuel, "check": False})
        captured = captures.for_config(config)
        return analyze_captured(captured, config, target=target, eager_bytes=0, eager_ops=0)

    target = describe_target(fn)
    say("capturing and counting decisions ...")
    total = len(applied_decisions(analysis_at(None)))
    say("running eagerly ...")
    expected, _ = run_step(fn, fn, example_inputs, training)
    probes: list[Probe] = []

    def probe(fuel: int) -> Probe:
        say(f"fuel={fuel} ...")
        program = compile_program(fn, {**base, "fuel": fuel, "check": False}, dynamic=dynamic)
        result = Probe(fuel, run_and_check(program, fn, example_inputs, training, expected))
        say(f"fuel={fuel}: {'matches eager' if result.matches else 'differs'}")
        probes.append(result)
        return result

    def result(**fields: object) -> BisectResult:
        return BisectResult(
            target=target, decisions=total, probes=tuple(probes), options=base, **fields
        )

    full = probe(total)
    if full.matches:
        return result(first_bad=None, decision=None, mismatch=None)
    if total == 0 or not (none := probe(0)).matches:
        mismatch = full.mismatch if total == 0 else none.mismatch
        return result(first_bad=None, decision=None, mismatch=mismatch)
    good, bad, bad_probe = 0, total, full
    while bad - good > 1:
        middle = (good + bad) // 2
        attempt = probe(middle)
        if attempt.matches:
            good = middle
        else:
            bad, bad_probe = middle, attempt
    before, after = analysis_at(bad - 1), analysis_at(bad)
    decision = applied_decisions(after)[bad - 1]
    diff = analysis_diff(before, after, f"fuel={bad - 1}", f"fuel={bad}")
    return result(first_bad=bad, decision=decision, mismatch=bad_probe.mismatch, graph_diff=diff)
