"""LLM decoding on this CPU: eager vs TorchInductor vs memopt, token by token.

    python bench/decode.py                               # every model, cache and context
    python bench/decode.py --write BENCHMARKS.md         # and replaces its section
    python bench/decode.py --models llama --caches static --contexts 128 --rounds 3

Models: Hugging Face decoders built from configs (random weights, float32, no download):
"llama" (4 layers, 512 wide, grouped-query attention with 8 query and 2 key/value heads,
vocabulary 8000: 19.3 M parameters, 77 MB), "llama-large" (8 layers, 1024 wide, 16 and 4
heads, vocabulary 32000: 155 M parameters, 620 MB, past this machine's L3) and "gpt2" (4
layers, 512 wide, 8 heads, vocabulary 8000, tied output embedding).

Each runs `generate()` with batch 1, greedy decoding, a prompt of `context` tokens and
`--new-tokens` new ones, with the static KV cache (`cache_implementation="static"`) and the
default dynamic one, with `model.forward` compiled by each backend the way a user compiles
it. The three run in interleaved rounds (one `generate()` of each per round, the order
rotating). Reported, medians over rounds:

- prefill: the first forward of a `generate()` (the prompt), ms;
- step: the median decode forward (one token), ms, timed around the compiled forward;
- tokens/s: new tokens / the whole `generate()`, as a user meets it (Hugging Face's own
  work between steps included);
- MBU (model bandwidth utilization): (weight bytes + KV bytes read + KV bytes written) of
  one step / step time / this machine's memory read bandwidth (`torch.sum` over 256 MiB,
  past any last-level cache, best of 5), each backend's steps in a round against the
  bandwidth measured just before its `generate()` (the machine is shared: its bandwidth
  moves with the other tenants' load, by 2x within a run), the median over the rounds.
  Weight bytes count every parameter once, and an embedding table not shared with the
  output layer as the one row a token reads; KV bytes read count the valid
  positions at the middle step (context + new tokens / 2), not a static cache's unused
  tail. "MBU at size" divides by the bandwidth measured the same way on a buffer of the
  step's size instead (the traffic table prints it): where a step's bytes fit in a cache,
  that is the bandwidth it could have had;
- bytes: memopt's modelled `bytes_moved` of its decode graph over the step's weight and KV
  bytes (its report directory's record of that graph);
- graphs: graphs memopt compiled in the run (a prefill graph and a decode graph are two; a
  dynamic cache's first decode compiles for its sizes and the second recompiles with
  dynamic sizes, Dynamo's default).

Every float32 backend's tokens are checked against eager's: the script stops if any
differs (with `--precision`, the narrowed backends' tokens are compared and reported, not
required to match). A separate check counts memopt's compiled graphs over `--long-tokens`
new tokens (512) for both caches: no graph may be compiled after the second decode step.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu import _load_average, machine, table_header, write_results  # noqa: E402

BACKENDS = ("eager", "inductor", "memopt")
CACHES = ("static", "dynamic")
MARK_START = "<!-- bench/decode.py: start -->"
MARK_END = "<!-- bench/decode.py: end -->"
# A run with --precision writes its own section (the narrowed weights' figures).
PRECISION_START = "<!-- bench/decode.py --precision: start -->"
PRECISION_END = "<!-- bench/decode.py --precision: end -->"
# The buffer memory's read bandwidth is measured on: past any last-level cache here.
MEMORY_NBYTES = 256 * 2**20


# --- models -------------------------------------------------------------------------------


def build(name: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=8000, n_embd=512, n_layer=4, n_head=8, n_positions=2048
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        large = name == "llama-large"
        config = transformers.LlamaConfig(
            vocab_size=32000 if large else 8000,
            hidden_size=1024 if large else 512,
            intermediate_size=2816 if large else 1376,
            num_hidden_layers=8 if large else 4,
            num_attention_heads=16 if large else 8,
            num_key_value_heads=4 if large else 2,
            max_position_embeddings=4096,
        )
        model = transformers.LlamaForCausalLM(config)
    return model.eval()


@dataclass(frozen=True)
class Traffic:
    """Compulsory bytes of one decode step (module doc)."""

    weight_nbytes: int
    kv_read_nbytes: int
    kv_write_nbytes: int

    @property
    def nbytes(self) -> int:
        return self.weight_nbytes + self.kv_read_nbytes + self.kv_write_nbytes


def weights_read(model: torch.nn.Module, nbytes_of) -> int:
    """Bytes a decode step reads of the weights, each parameter stored as `nbytes_of(param)`
    says: every parameter once (shared ones once), an embedding table not shared with the
    output layer only at its row."""
    output = model.get_output_embeddings().weight
    total = 0
    seen = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.data_ptr() in seen:
                continue
            seen.add(param.data_ptr())
            rows_read = (
                isinstance(module, torch.nn.Embedding) and param.data_ptr() != output.data_ptr()
            )
            nbytes = nbytes_of(param)
            total += nbytes // param.shape[0] if rows_read else nbytes
    return total


def narrow_weight_nbytes(model: torch.nn.Module, weights: str, group: int = 128) -> int:
    """Compulsory weight bytes of a step with the precision pass's `weights` format: every
    2-D weight narrowed, the rest float32."""
    from memopt.backends.narrow import quantize

    return weights_read(
        model, lambda p: quantize(p, weights, group).nbytes if p.dim() == 2 else p.nbytes
    )


def step_traffic(model: torch.nn.Module, context: int) -> Traffic:
    weights = weights_read(model, lambda p: p.nbytes)
    output = model.get_output_embeddings().weight
    config = model.config
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = config.hidden_size // heads
    per_position = 2 * layers * kv_heads * head_dim * output.element_size()  # keys and values
    return Traffic(weights, context * per_position, per_position)


def read_bandwidth_gbps(nbytes: int) -> float:
    """`torch.sum` over a float32 buffer of `nbytes`, best of 5 repeats, in GB/s."""
    buffer = torch.ones(max(nbytes // 4, 1024))
    repeats = max(3, int(2e8 // buffer.nbytes))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            buffer.sum()
        best = min(best, (time.perf_counter() - start) / repeats)
    return buffer.nbytes / best / 1e9


# --- runs ---------------------------------------------------------------------------------


MODELS = ("llama", "llama-large", "gpt2")


def publish(text: str, write: str | None, start: str, end: str) -> None:
    """Print a benchmark's section and, with --write, put it between its markers."""
    print(text)
    if write:
        write_results(Path(write), text, start, end)


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run, as the sections quote it."""
    return f"python bench/{script} {' '.join(argv if argv is not None else sys.argv[1:])}".strip()


def own_entry(forward, name: str):
    """`forward` behind a function with a code object of its own. Dynamo keeps what it
    learns of a frame (which sizes changed between calls, so compile them dynamic) per code
    object: compiled through one shared entry, the second backend's first graph would be
    compiled dynamic because the first backend's decode steps changed the sizes."""

    def entry(*args, **kwargs):
        return forward(*args, **kwargs)

    code = entry.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, entry.__globals__, name, None, entry.__closure__)


PRECISIONS = ("int8", "int4", "bf16", "int8-a8", "int4-a8")


def precision_of(backend: str) -> str | None:
    """The weight format of a "memopt-int8"-style backend ("-a8": int8 activations in the
    dot products); None for the others."""
    return backend.split("-", 1)[1] if backend.startswith("memopt-") else None


def precision_options(precision: str) -> dict[str, object]:
    weights, _, activations = precision.partition("-")
    return {"weights": weights, **({"activations": "int8"} if activations == "a8" else {})}


class TimedForward:
    """`model.forward` as compiled by one backend, every call timed. "memopt-int8" is memopt
    with the precision pass narrowing weights to int8 (likewise int4, bf16).

    It shows `generate()` the forward's own signature, as `torch.compile(model.forward)`
    does (functools.wraps): Hugging Face passes `logits_to_keep=1` only to a forward that
    takes it, so that a prefill computes the last position's logits, not every position's
    (a quarter of a 1024-token prefill's arithmetic on the bench's Llamas)."""

    def __init__(self, forward, backend: str, report_dir: str | None = None) -> None:
        self.__signature__ = inspect.signature(forward)
        if backend == "eager":
            self.compiled = forward
        else:
            options = None
            if backend.startswith("memopt"):
                options = {"report_dir": os.path.join(report_dir, backend)}
                if precision_of(backend):
                    options["pass_options"] = {
                        "precision": precision_options(precision_of(backend))
                    }
            entry = own_entry(forward, f"decode_{backend.replace('-', '_')}")
            self.compiled = torch.compile(
                entry, backend="memopt" if options else backend, options=options
            )
        self.seconds: list[float] = []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.compiled(*args, **kwargs)
        self.seconds.append(time.perf_counter() - start)
        return out


@dataclass
class Row:
    model: str
    cache: str
    context: int
    new_tokens: int
    traffic: Traffic
    # read bandwidth measured just before each backend's generate() in each round: at the
    # step's size, at 256 MiB
    bandwidth_gbps: dict[str, list[float]] = field(default_factory=dict)
    memory_gbps: dict[str, list[float]] = field(default_factory=dict)
    backends: tuple[str, ...] = BACKENDS
    prefill_s: dict[str, list[float]] = field(default_factory=dict)
    step_s: dict[str, list[float]] = field(default_factory=dict)
    tokens_per_s: dict[str, list[float]] = field(default_factory=dict)
    graphs: int = 0
    # memopt's modelled bytes_moved of its decode graph, per memopt backend
    modelled_nbytes: dict[str, int] = field(default_factory=dict)
    # narrowed backends: the step's compulsory bytes with their weights, and how their
    # tokens and their decode graph's outputs compare with eager's
    narrow_traffic: dict[str, Traffic] = field(default_factory=dict)
    agreement: dict[str, str] = field(default_factory=dict)
    measured_error: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def median(self, table: dict[str, list[float]], backend: str) -> float:
        return statistics.median(table[backend])

    def traffic_of(self, backend: str) -> Traffic:
        return self.narrow_traffic.get(backend, self.traffic)

    def mbu(self, backend: str, at_size: bool = False) -> float:
        """Model bandwidth utilization against memory's bandwidth, or `at_size` against
        the bandwidth at the step's size, each round's steps against the bandwidth measured
        just before them (module doc): the median over the rounds."""
        bandwidths = (self.bandwidth_gbps if at_size else self.memory_gbps)[backend]
        nbytes = self.traffic_of(backend).nbytes
        return statistics.median(
            nbytes / step / (gbps * 1e9) for step, gbps in zip(self.step_s[backend], bandwidths)
        )


def generate_kwargs(cache: str, new_tokens: int) -> dict[str, object]:
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    return kwargs


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def run(
    name: str, cache: str, context: int, new_tokens: int, rounds: int, backends: tuple[str, ...]
) -> Row:
    model = build(name)
    traffic = step_traffic(model, context + new_tokens // 2)
    row = Row(name, cache, context, new_tokens, traffic)
    row.backends = backends
    for backend in backends:
        if precision_of(backend):
            weights = narrow_weight_nbytes(model, precision_of(backend).split("-")[0])
            row.narrow_traffic[backend] = Traffic(
                weights, traffic.kv_read_nbytes, traffic.kv_write_nbytes
            )
    prompt = torch.randint(0, model.config.vocab_size, (1, context))
    kwargs = generate_kwargs(cache, new_tokens)
    torch._dynamo.reset()
    report_dir = tempfile.mkdtemp(prefix="memopt-decode-")
    models, forwards, tokens = {}, {}, {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend in backends:  # compile (first generate), one backend at a time
            models[backend] = copy.deepcopy(model)
            forwards[backend] = TimedForward(models[backend].forward, backend, report_dir)
            models[backend].forward = forwards[backend]
            before = graphs_compiled()
            try:
                tokens[backend] = models[backend].generate(prompt, **kwargs)
            except Exception as error:  # noqa: BLE001 - reported in the table, not hidden
                row.error = f"{backend}: {type(error).__name__}: {str(error)[:120]}"
                return row
            if backend == "memopt":
                row.graphs = graphs_compiled() - before
        for r in range(rounds):
            shift = r % len(backends)
            for backend in backends[shift:] + backends[:shift]:
                # The machine is shared: its bandwidth moves with the other tenants' load
                # (by 2x within a run), so each backend's steps are weighed against the
                # bandwidth measured just before them.
                at_size = read_bandwidth_gbps(traffic.nbytes)
                row.bandwidth_gbps.setdefault(backend, []).append(at_size)
                memory = read_bandwidth_gbps(MEMORY_NBYTES)
                row.memory_gbps.setdefault(backend, []).append(memory)
                forward = forwards[backend]
                forward.seconds.clear()
                start = time.perf_counter()
                out = models[backend].generate(prompt, **kwargs)
                elapsed = time.perf_counter() - start
                tokens[backend] = out
                row.prefill_s.setdefault(backend, []).append(forward.seconds[0])
                row.step_s.setdefault(backend, []).append(statistics.median(forward.seconds[1:]))
                row.tokens_per_s.setdefault(backend, []).append(new_tokens / elapsed)
    for backend in backends[1:]:
        if precision_of(backend):
            row.agreement[backend] = agreement(tokens[backend], tokens["eager"], context)
        elif not torch.equal(tokens[backend], tokens["eager"]):
            raise SystemExit(f"{name} {cache} {context}: {backend}'s tokens differ from eager's")
    for backend in backends:
        records = [
            json.loads(p.read_text()) for p in Path(report_dir, backend).glob("inference.*.json")
        ]
        if records:  # "inference" is the prefill graph; the decode graph is the last compiled
            last = max(records, key=lambda r: int(r["graph"].rsplit(".", 1)[1]))
            row.modelled_nbytes[backend] = last["bytes_moved"]["value"]
            if precision_of(backend):
                row.measured_error[backend] = measured_error(last)
    return row


def agreement(tokens: torch.Tensor, eager: torch.Tensor, context: int) -> str:
    """New tokens equal to eager's before the first that differs, of all new tokens."""
    new, reference = tokens[0, context:], eager[0, context:]
    differs = (new != reference).nonzero()
    same = int(differs[0, 0]) if len(differs) else len(reference)
    return f"{same}/{len(reference)}"


def measured_error(record: dict) -> str:
    """The precision pass's measured error of a graph, as its ledger states it."""
    for entry in record["ledger"]:
        for decision in entry["decisions"]:
            if decision["code"].startswith("precision.") and decision["applied"]:
                return decision["reason"].split("with every narrowed weight ", 1)[-1]
    return "no weight narrowed"


def long_run_graphs(cache: str, new_tokens: int) -> int:
    """Graphs memopt compiles for `generate()` of `new_tokens` on the small Llama."""
    model = build("llama")
    prompt = torch.randint(0, model.config.vocab_size, (1, 16))
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="memopt")
    before = graphs_compiled()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.generate(prompt, **generate_kwargs(cache, new_tokens))
    return graphs_compiled() - before


# --- tables -------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    lines = table_header(
        *("model", "cache", "context", "backend", "prefill ms", "step ms", "tokens/s"),
        *("vs eager", "vs Inductor", "MBU", "MBU at size"),
    )
    for row in rows:
        head = f"| {row.model} | {row.cache} | {row.context} "
        if row.error:
            lines.append(head + f"| failed: {row.error} | | | | | | | |")
            continue
        for backend in row.backends:
            tps = row.median(row.tokens_per_s, backend)
            ratios = [
                tps / row.median(row.tokens_per_s, base) if backend != base else None
                for base in ("eager", "inductor")
            ]
            shown = [f"{r:.2f}x" if r is not None else "" for r in ratios]
            lines.append(
                head + f"| {backend} | {row.median(row.prefill_s, backend) * 1e3:.1f} "
                f"| {row.median(row.step_s, backend) * 1e3:.2f} | {tps:.0f} "
                f"| {shown[0]} | {shown[1]} | {row.mbu(backend):.2f} "
                f"| {row.mbu(backend, at_size=True):.2f} |"
            )
    return "\n".join(lines)


def traffic_table(rows: list[Row]) -> str:
    lines = table_header(
        *("model", "cache", "context", "backend", "weights MB", "KV read MB"),
        *("read GB/s at this size", "bytes_moved MB (modelled)", "/ (weights + KV)"),
    )
    for row in rows:
        if row.error:
            continue
        for backend in (b for b in row.backends if b.startswith("memopt")):
            t = row.traffic_of(backend)
            modelled = row.modelled_nbytes.get(backend)
            ratio = f"{modelled / t.nbytes:.2f}x" if modelled else "n/a"
            shown = f"{modelled / 1e6:.1f}" if modelled else "n/a"
            lines.append(
                f"| {row.model} | {row.cache} | {row.context} | {backend} "
                f"| {t.weight_nbytes / 1e6:.1f} | {t.kv_read_nbytes / 1e6:.2f} "
                f"| {statistics.median(row.bandwidth_gbps[backend]):.1f} | {shown} | {ratio} |"
            )
    return "\n".join(lines)


def error_table(rows: list[Row]) -> str:
    lines = table_header(
        "model", "cache", "context", "backend", "tokens as eager's", "decode graph's error"
    )
    for row in rows:
        for backend, same in row.agreement.items():
            lines.append(
                f"| {row.model} | {row.cache} | {row.context} | {backend} | {same} "
                f"| {row.measured_error.get(backend, 'n/a')} |"
            )
    return "\n".join(lines)


def report(
    rows: list[Row], long_graphs: dict[str, int], long_tokens: int, command: str, load: str
) -> str:
    dram = read_bandwidth_gbps(MEMORY_NBYTES)
    measured = [
        gbps
        for row in rows
        if not row.error
        for values in row.memory_gbps.values()
        for gbps in values
    ]
    memory = f"{min(measured):.1f}-{max(measured):.1f} GB/s" if measured else "none"
    long = ", ".join(f"{cache} cache: {n} graphs" for cache, n in long_graphs.items())
    return "\n".join(
        [
            "### LLM decoding (bench/decode.py)",
            "",
            f"Machine: {machine()}. Read bandwidth at 256 MiB: {dram:.1f} GB/s at the end, "
            f"{memory} just before each backend's `generate()`s (the MBU column's). {load}",
            f"Command: `{command}`. Medians over rounds; the float32 backends' tokens "
            "identical to eager's in every run (checked; narrowed weights: see their table).",
            "",
            table(rows),
            "",
            "Traffic of one decode step (at the middle step's context):",
            "",
            traffic_table(rows),
            "",
            *(
                [
                    "Narrowed weights (the precision pass): new tokens equal to eager's "
                    "before the first that differs, and the error the pass measured on the "
                    "decode graph's example inputs (all narrowed weights together):",
                    "",
                    error_table(rows),
                    "",
                ]
                if any(row.agreement for row in rows)
                else []
            ),
            f"Graphs memopt compiles over {long_tokens} new tokens (small Llama): {long}.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--caches", nargs="*", default=list(CACHES), choices=CACHES)
    parser.add_argument("--contexts", nargs="*", type=int, default=[128, 1024])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--precision",
        nargs="*",
        default=[],
        choices=PRECISIONS,
        help="also run memopt with its precision pass narrowing weights to these formats",
    )
    parser.add_argument("--write", type=Path, help="write the results into this Markdown file")
    args = parser.parse_args(argv)
    torch._dynamo.config.cache_size_limit = 64  # three backends' graphs on one forward
    load = _load_average()
    rows = []
    backends = (*BACKENDS, *(f"memopt-{p}" for p in args.precision))
    for name in args.models:
        for context in args.contexts:
            for cache in args.caches:
                row = run(name, cache, context, args.new_tokens, args.rounds, backends)
                shown = table([row]).splitlines()[-len(backends) :]
                print("\n".join(shown) if not row.error else row.error, flush=True)
                rows.append(row)
    long_graphs = {cache: long_run_graphs(cache, args.long_tokens) for cache in args.caches}
    command = command_line("decode.py", argv)
    load = f"Load average (1 min) at the start and end: {load} and {_load_average()}."
    text = report(rows, long_graphs, args.long_tokens, command, load)
    print(text)
    if args.write:
        marks = (PRECISION_START, PRECISION_END) if args.precision else (MARK_START, MARK_END)
        write_results(args.write, text, *marks)


if __name__ == "__main__":
    main()
