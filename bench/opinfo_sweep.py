"""OpInfo sweep: every op's float32 CPU samples through memopt, against eager.

    python bench/opinfo_sweep.py                          # every OpInfo, every sample
    python bench/opinfo_sweep.py --max-samples 2          # the first 2 samples of each op
    python bench/opinfo_sweep.py --ops softmax,var_mean --verbose
    python bench/opinfo_sweep.py --backend reference --json sweep.json
    python bench/opinfo_sweep.py --shard 1/2 --json a.jsonl &   # one process per core
    python bench/opinfo_sweep.py --shard 2/2 --json b.jsonl
    python bench/opinfo_sweep.py --summarize a.jsonl b.jsonl    # one summary of both
    python bench/opinfo_sweep.py --shard 1/2 --skip-done a.jsonl --json a2.jsonl  # finish a

Each sample becomes a function of its tensors (the op's other arguments are constants),
compiled with `torch.compile(fn, backend="memopt")` after a Dynamo reset, and called on
copies of the tensors; the eager call on other copies is the reference. A sample ends as:

- pass: the outputs match eager (values within float32 tolerance, shapes, dtypes), and
  memopt warned of no fallback;
- fallback: the outputs match, but memopt ran some graph or kernel unoptimized (ATen)
  and said so in a warning (a missed optimization, never a wrong answer);
- mismatch: the outputs differ from eager (a bug);
- error: memopt raised where `torch.compile(backend="aot_eager")` does not (a bug);
- known: the op is listed in tests/opinfo_known_failures.py, with its reason;
- skipped: eager itself raises, or torch.compile fails on it without memopt (Dynamo or
  AOTAutograd cannot trace it: nothing memopt can be asked to do).

Mismatches and errors are re-run with `passes=[]` (capture only, no optimization), which
says whether the capture (decompositions) or the optimizer is to blame.
The exit status is 1 if any sample mismatched or errored.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from opinfo_known_failures import KNOWN_FAILURES, known_reason  # noqa: E402

# float32 tolerances: memopt's decompositions reassociate sums (var as two sums, softmax
# with its max subtracted), so results may differ from eager's kernels in the last bits.
RTOL = 1e-4
ATOL = 1e-5

OUTCOMES = ("pass", "fallback", "mismatch", "error", "known", "skipped")


@dataclass
class SampleResult:
    op: str
    sample: int
    outcome: str
    detail: str = ""
    seconds: float = 0.0


def op_label(op: object) -> str:
    variant = getattr(op, "variant_test_name", "")
    return f"{op.name}.{variant}" if variant else op.name


def float32_ops(names: Iterable[str] | None = None) -> list[object]:
    """The OpInfos with float32 CPU support (all of them, or those named op or op.variant)."""
    from torch.testing._internal.common_methods_invocations import op_db

    wanted = set(names) if names is not None else None
    ops = []
    for op in op_db:
        if torch.float32 not in op.supported_dtypes("cpu"):
            continue
        if wanted is None or op.name in wanted or op_label(op) in wanted:
            ops.append(op)
    return ops


def samples(op: object, limit: int | None = None) -> list[object]:
    found = []
    for sample in op.sample_inputs("cpu", torch.float32, requires_grad=False):
        found.append(sample)
        if limit is not None and len(found) >= limit:
            break
    return found


def _split(sample: object) -> tuple[list[torch.Tensor], Callable[[Sequence[torch.Tensor]], tuple]]:
    """The sample's tensors, and how to rebuild (input, args, kwargs) from new ones."""
    leaves, spec = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def rebuild(tensors: Sequence[torch.Tensor]) -> tuple:
        new = list(leaves)
        for position, tensor in zip(positions, tensors):
            new[position] = tensor
        return pytree.tree_unflatten(new, spec)

    return [leaves[i] for i in positions], rebuild


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    out = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype)
    return out.copy_(tensor)


def _program(op: object, rebuild: Callable) -> Callable:
    def program(*tensors: torch.Tensor) -> object:
        value, args, kwargs = rebuild(tensors)
        return op(value, *args, **kwargs)

    return program


def _compare(got: object, want: object) -> None:
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    if got_spec != want_spec:
        raise AssertionError(f"output structure differs: {got_spec} vs {want_spec}")
    for index, (a, b) in enumerate(zip(got_leaves, want_leaves)):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(
                a,
                b,
                rtol=RTOL,
                atol=ATOL,
                equal_nan=True,
                msg=lambda m, i=index: f"output {i}: {m}",
            )
        elif isinstance(b, float) and isinstance(a, float):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, equal_nan=True)
        elif a != b:
            raise AssertionError(f"output {index}: {a!r} != {b!r}")


def _compiled_call(
    program: Callable, tensors: list[torch.Tensor], backend: object, options: dict | None
) -> tuple[object, list[str]]:
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(program, backend=backend, options=options, dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        out = compiled(*[_copy(t) for t in tensors])
    notes = [str(w.message) for w in caught if str(w.message).startswith("memopt")]
    return out, notes


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = " | ".join(lines[:3]) if lines else ""
    return f"{type(error).__name__}: {text}"[:400]


def check_sample(op: object, sample: object, backend: str = "auto") -> tuple[str, str]:
    """(outcome, detail) for one sample (see the module docstring for the outcomes)."""
    tensors, rebuild = _split(sample)
    program = _program(op, rebuild)
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            want = program(*[_copy(t) for t in tensors])
    except Exception as error:  # noqa: BLE001 - a sample eager rejects is not memopt's
        return "skipped", "eager raises: " + _first_line(error)
    options = {"backend": backend}
    try:
        with torch.no_grad():
            got, notes = _compiled_call(program, tensors, "memopt", options)
    except Exception as error:  # noqa: BLE001
        try:
            with torch.no_grad():
                _compiled_call(program, tensors, "aot_eager", None)
        except Exception as plain:  # noqa: BLE001
            return "skipped", "torch.compile fails without memopt: " + _first_line(plain)
        return "error", _first_line(error) + _blame(program, tensors, want)
    try:
        _compare(got, want)
    except AssertionError as error:
        return "mismatch", _first_line(error) + _blame(program, tensors, want)
    if notes:
        return "fallback", notes[0][:400]
    return "pass", ""


def _blame(program: Callable, tensors: list[torch.Tensor], want: object) -> str:
    """Whether capture alone (memopt's decompositions, no passes) already goes wrong."""
    try:
        with torch.no_grad():
            got, _ = _compiled_call(program, tensors, "memopt", {"passes": []})
        _compare(got, want)
    except Exception as error:  # noqa: BLE001
        return f" [capture alone, no passes, also fails: {_first_line(error)[:150]}]"
    return " [capture alone is right: the passes or lowering are at fault]"


def sweep(
    ops: Sequence[object],
    max_samples: int | None = None,
    backend: str = "auto",
    verbose: bool = False,
    include_known: bool = False,
    record: Callable[[SampleResult], None] | None = None,
) -> list[SampleResult]:
    """Every sample's result; `record` sees each one as it ends (to stream them to a file)."""
    results = []

    def add(result: SampleResult) -> None:
        results.append(result)
        if record is not None:
            record(result)

    start = time.perf_counter()
    for position, op in enumerate(ops, 1):
        label = op_label(op)
        print(
            f"[{position}/{len(ops)} ops, {time.perf_counter() - start:.0f} s] {label}",
            file=sys.stderr,
            flush=True,
        )
        reason = known_reason(label)
        if reason is not None and not include_known:
            add(SampleResult(label, -1, "known", reason))
            continue
        try:
            op_samples = samples(op, max_samples)
        except Exception as error:  # noqa: BLE001 - OpInfo's own sample generator failed
            add(SampleResult(label, -1, "skipped", "samples: " + _first_line(error)))
            continue
        for index, sample in enumerate(op_samples):
            began = time.perf_counter()
            try:
                outcome, detail = check_sample(op, sample, backend)
            except Exception as error:  # noqa: BLE001 - the harness itself must keep going
                outcome, detail = "error", "harness: " + _first_line(error)
                if verbose:
                    traceback.print_exc()
            result = SampleResult(label, index, outcome, detail, time.perf_counter() - began)
            add(result)
            if verbose or outcome in ("mismatch", "error"):
                print(f"{outcome:8s} {label}[{index}] {detail}", flush=True)
    return results


def summarize(results: Sequence[SampleResult]) -> str:
    counts = collections.Counter(r.outcome for r in results)
    ops_by_outcome: dict[str, set[str]] = collections.defaultdict(set)
    for r in results:
        ops_by_outcome[r.outcome].add(r.op)
    lines = [
        f"{len({r.op for r in results})} ops, "
        f"{sum(1 for r in results if r.sample >= 0)} samples (float32, CPU)",
    ]
    for outcome in OUTCOMES:
        unit = "ops" if outcome == "known" else "samples"
        lines.append(
            f"  {outcome:9s} {counts.get(outcome, 0):6d} {unit}"
            f" ({len(ops_by_outcome.get(outcome, ()))} ops)"
        )
    fallback_reasons = collections.Counter(
        _reason_key(r.detail) for r in results if r.outcome == "fallback"
    )
    if fallback_reasons:
        lines.append("fallback reasons (samples):")
        lines += [f"  {n:5d}  {reason}" for reason, n in fallback_reasons.most_common(15)]
    skipped_reasons = collections.Counter(
        _reason_key(r.detail) for r in results if r.outcome == "skipped"
    )
    if skipped_reasons:
        lines.append("skipped (torch.compile or eager cannot run them; samples):")
        lines += [f"  {n:5d}  {reason}" for reason, n in skipped_reasons.most_common(8)]
    known = collections.Counter(
        KNOWN_FAILURES[r.op].split(":")[0] for r in results if r.outcome == "known"
    )
    if known:
        lines.append("known failures by reason (ops):")
        lines += [f"  {n:5d}  {reason}" for reason, n in known.most_common()]
    return "\n".join(lines)


def _reason_key(detail: str) -> str:
    """A detail without its specifics (graph names, sizes), for grouping."""
    text = detail.split(";")[0]
    for marker in ("failed (", "raises: ", "memopt: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text[:110]


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N), 1 <= K <= N."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants K/N, like 1/2; got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--shard {text}: K must be between 1 and N")
    return k, n


def read_results(paths: Sequence[str]) -> list[SampleResult]:
    """Results from files written by --json (a JSON line per sample). A sample found in
    several files keeps its last result: list a re-run after the run it corrects."""
    results: dict[tuple[str, int], SampleResult] = {}
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                result = SampleResult(**json.loads(line))
            except (ValueError, TypeError) as error:
                raise SystemExit(f"{path}:{number}: not a sweep result line ({error})") from None
            results.pop((result.op, result.sample), None)
            results[(result.op, result.sample)] = result
    return list(results.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", help="comma-separated op names (op or op.variant)")
    parser.add_argument("--max-samples", type=int, default=None, help="samples per op")
    parser.add_argument(
        "--backend", default="auto", help="memopt backend option (auto: C++ kernels on CPU tensors)"
    )
    parser.add_argument("--include-known", action="store_true", help="run known failures too")
    parser.add_argument(
        "--shard", type=parse_shard, default=(1, 1), help="K/N: run every Nth op from the Kth"
    )
    parser.add_argument("--json", help="write each sample's result here as it ends (JSON lines)")
    parser.add_argument(
        "--skip-done", nargs="+", metavar="FILE", default=(),
        help="skip the ops that have results in these --json files (to finish a stopped run)",
    )  # fmt: skip
    parser.add_argument(
        "--summarize", nargs="+", metavar="FILE", help="summarize --json files; run nothing"
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.summarize:
        results = read_results(args.summarize)
        print(summarize(results))
        return 1 if any(r.outcome in ("mismatch", "error") for r in results) else 0
    warnings.filterwarnings("ignore", message="(?!memopt)")
    start = time.perf_counter()
    names = args.ops.split(",") if args.ops else None
    k, n = args.shard
    done = {r.op for r in read_results(args.skip_done)}
    ops = [op for op in float32_ops(names)[k - 1 :: n] if op_label(op) not in done]
    if names is not None and not ops:
        parser.error(f"--ops {args.ops}: no float32 OpInfo has that name")
    stream = open(args.json, "w") if args.json else None  # noqa: SIM115 - closed below

    def record(result: SampleResult) -> None:
        if stream is not None:
            stream.write(json.dumps(asdict(result)) + "\n")
            stream.flush()

    try:
        results = sweep(
            ops, args.max_samples, args.backend, args.verbose, args.include_known, record
        )
    finally:
        if stream is not None:
            stream.close()
    print(summarize(results))
    shard = f", shard {k}/{n}" if n > 1 else ""
    print(f"backend={args.backend}{shard}; {time.perf_counter() - start:.0f} s")
    return 1 if any(r.outcome in ("mismatch", "error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
