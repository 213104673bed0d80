"""The `memopt` command.

    memopt report [TARGET] [--device NAME] [--json PATH] [--out DIR] [--train] [--dynamic]
                  [--top N] [--passes a,b] [--disable NAME] [--fuel N] [--check]
                  [--measure [--rounds N] [--no-inductor]]
    memopt diff [TARGET] [--pass NAME | --from OPTIONS --to OPTIONS] [--graph NAME] ...
    memopt ablate [TARGET] [--device NAME] [--run] [--repeats N] [--out DIR] [--plot PNG]
                  [--precision FORMAT ...] ...
    memopt profile [TARGET] [--rounds N] [--no-inductor] [--top N] [--json PATH] ...
    memopt bisect [TARGET] [--backend NAME] ...
    memopt examples

TARGET is a built-in example name (default gpt2_block), `path.py` (its `example()`) or
`path.py:factory`. Results go to stdout, progress to stderr. A user error (bad target,
option or usage) prints one line `memopt: error: ...` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from memopt.errors import MemoptError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class _UsageError(Exception):
    """Raised instead of argparse's print-usage-and-exit, so every error is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def main(argv: list[str] | None = None) -> int:
    """Run the `memopt` command with `argv` (default: sys.argv[1:]); returns the exit status."""
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exc:  # --help and --version exit through argparse
            return exc.code if isinstance(exc.code, int) else 0
        if args.command is None:
            raise _UsageError(
                "missing command; choose one of: report, diff, ablate, profile, bisect, examples "
                "(see --help)"
            )
        return args.run(args)
    except (MemoptError, _UsageError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("memopt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    from memopt import __version__

    parser = _Parser(
        prog="memopt",
        description="Count and optimize the memory traffic of a PyTorch program.",
    )
    parser.add_argument("--version", action="version", version=f"memopt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    report = commands.add_parser(
        "report",
        help="analyze a model: eager vs optimized bytes, predicted time, pass ledger",
        description="Analyze TARGET and print eager (counted) vs optimized (modelled) bytes, "
        "the predicted time on a device, the costliest nodes and the pass ledger. With --out, "
        "also write an HTML report, analysis.json, per-pass graph diffs and kernel sources.",
    )
    _target_arguments(report)
    report.add_argument("--device", metavar="NAME", help="device model for predicted time")
    report.add_argument("--json", metavar="PATH", help="also write the analysis as JSON to PATH")
    report.add_argument(
        "--out",
        metavar="DIR",
        help="also write index.html, analysis.json, diffs/ and kernels/ into DIR",
    )
    report.add_argument(
        "--top", type=_non_negative, default=10, metavar="N", help="nodes to list (default 10)"
    )
    _pass_arguments(report)
    report.add_argument(
        "--fuel", type=_non_negative, metavar="N", help="stop after N rewrite decisions"
    )
    report.add_argument("--check", action="store_true", help="compare each graph against eager")
    report.add_argument(
        "--measure",
        action="store_true",
        help="also run the program here and time every kernel (as `memopt profile` does)",
    )
    report.add_argument(
        "--compile-for",
        metavar="GPU",
        help="compile the Triton kernels for this GPU (h100, a100, mi300x, ...) with Triton's "
        "own compiler, offline, and list registers, spills, occupancy and load widths; "
        "analyzes with the Triton backend's decisions unless --backend is given",
    )
    _backend_argument(report)
    _timing_arguments(report)
    report.set_defaults(run=_report)

    diff = commands.add_parser(
        "diff",
        help="show the printed graph before and after a pass, or between two option sets",
        description="Print a unified diff of TARGET's graphs: before and after one pass "
        "(--pass), between two option sets (--from and --to), or by default before and after "
        "the whole pipeline.",
    )
    _target_arguments(diff)
    diff.add_argument("--pass", dest="pass_name", metavar="NAME", help="the pass to show")
    diff.add_argument(
        "--from",
        dest="from_options",
        metavar="OPTIONS",
        help="options of the left side, e.g. 'disable=fusion' or 'passes=cleanup fuel=3'",
    )
    diff.add_argument(
        "--to", dest="to_options", metavar="OPTIONS", help="options of the right side"
    )
    diff.add_argument("--graph", metavar="NAME", help="only this graph (e.g. forward)")
    diff.add_argument(
        "--context", type=_non_negative, default=3, metavar="N", help="context lines (default 3)"
    )
    _pass_arguments(diff)
    diff.add_argument(
        "--fuel", type=_non_negative, metavar="N", help="stop after N rewrite decisions"
    )
    diff.set_defaults(run=_diff)

    ablate = commands.add_parser(
        "ablate",
        help="run no passes, each pass alone, all but each pass, and all passes",
        description="Ablate TARGET's passes: for no passes, each pass alone, all passes but "
        "each one, and all passes, print bytes moved, kernels, predicted time and compile "
        "time (and with --run, measured run time and a check against eager); write CSV and "
        "JSON.",
    )
    _target_arguments(ablate)
    ablate.add_argument("--device", metavar="NAME", help="device model for predicted time")
    ablate.add_argument(
        "--run",
        dest="measure",  # not `run`: that is the subcommand's handler
        action="store_true",
        help="also run each configuration: time and check it against eager",
    )
    ablate.add_argument(
        "--repeats",
        type=_positive,
        default=10,
        metavar="N",
        help="timed runs per configuration with --run (median; default 10)",
    )
    ablate.add_argument(
        "--out",
        metavar="DIR",
        default="memopt-ablation",
        help="write ablation.csv and ablation.json here (default memopt-ablation)",
    )
    ablate.add_argument(
        "--plot", metavar="PNG", help="draw bytes per configuration (needs matplotlib)"
    )
    ablate.add_argument(
        "--precision",
        nargs="+",
        default=[],
        choices=("int8", "int4", "bf16", "saved-bf16"),
        metavar="FORMAT",
        help="add a row of all passes with weights narrowed to each FORMAT (int8, int4, bf16), "
        "or with a training step's saved activations stored in bf16 (saved-bf16; with "
        "--train): the precision pass, results differ from eager's by the error it reports",
    )
    _pass_arguments(ablate)
    _backend_argument(ablate)
    ablate.set_defaults(run=_ablate)

    bisect = commands.add_parser(
        "bisect",
        help="find the first rewrite decision after which the output differs from eager",
        description="Bisect TARGET's rewrite decisions with fuel: compile and run it with the "
        "first k decisions for a binary search of k, compare with eager, and print the first "
        "decision after which the output differs.",
    )
    _target_arguments(bisect)
    _pass_arguments(bisect)
    _backend_argument(bisect)
    bisect.set_defaults(run=_bisect)

    profile = commands.add_parser(
        "profile",
        help="run the compiled program and time every kernel against its modelled bytes",
        description="Compile TARGET with memopt (and TorchInductor), run it next to eager in "
        "interleaved rounds, then time every kernel: measured time, achieved bandwidth from "
        "the modelled bytes, and the fraction of this machine's measured bandwidth and "
        "compute peak it reaches.",
    )
    _target_arguments(profile)
    _timing_arguments(profile)
    profile.add_argument(
        "--top", type=_non_negative, default=0, metavar="N", help="list the N slowest kernels"
    )
    profile.add_argument("--json", metavar="PATH", help="also write the profile as JSON")
    _pass_arguments(profile)
    _backend_argument(profile)
    profile.set_defaults(run=_profile)

    examples = commands.add_parser("examples", help="list the built-in examples")
    examples.set_defaults(run=_examples)
    return parser


def _target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        nargs="?",
        metavar="TARGET",
        help="built-in example name (default gpt2_block), path.py, or path.py:factory",
    )
    parser.add_argument(
        "--train",
        action="store_true",
        help="analyze a training step: forward + backward, modules in train mode",
    )
    parser.add_argument("--dynamic", action="store_true", help="capture with symbolic sizes")


def _pass_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--passes", metavar="A,B", help="run these passes, in this order")
    parser.add_argument(
        "--disable",
        action="append",
        metavar="NAME",
        help="skip a pass (repeatable, or a comma list)",
    )
    parser.add_argument(
        "--pass-option",
        action="append",
        type=_pass_option,
        metavar="PASS.OPTION=VALUE",
        help="a pass option (repeatable): precision.weights=int8, fusion.max_nodes=16; the "
        "value is read as JSON where it parses (numbers, true, null), else as a string",
    )


def _pass_option(text: str) -> tuple[str, str, object]:
    name, sep, raw = text.partition("=")
    pass_name, dot, option = name.partition(".")
    if not sep or not dot or not pass_name or not option:
        raise argparse.ArgumentTypeError(f"expected PASS.OPTION=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return pass_name, option, value


def _timing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rounds", type=_positive, default=10, metavar="N", help="timed rounds (default 10)"
    )
    parser.add_argument(
        "--no-inductor", action="store_true", help="do not compile and time TorchInductor"
    )


def _backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", metavar="NAME", help="kernel backend: auto, triton, cpp or reference"
    )


def _report(args: argparse.Namespace) -> int:
    from memopt.config import Config
    from memopt.reports.summary import analysis_json, format_analysis

    options = _options(args)
    if args.compile_for is not None:
        from memopt.backends.triton.offline import arch_for

        arch_for(args.compile_for)  # an unknown GPU fails here, in a second
        options.setdefault("backend", "triton")  # the kernels a GPU run would have
    # Validate options before the slow part, so a typo fails in a second, not after analysis;
    # it also resolves the device from MEMOPT_DEVICE when --device is not given.
    device = Config.from_options(options).device
    if args.json:
        _check_writable_file(args.json)
    if args.out:
        _check_writable_dir(args.out)

    target = _load(args)
    import memopt  # Dynamo and the compiler load here, after the cheap checks
    from memopt.reports.measured import format_profile

    measured = None
    if args.measure:
        measured = _measure(target, args, options)
        analysis = measured.analysis
    else:
        _progress("analyzing (counting eager bytes, capturing, running passes) ...")
        analysis = memopt.analyze(
            target.fn, *target.inputs, training=args.train, dynamic=args.dynamic, **options
        )
    if analysis.target != target.name:
        analysis.target = f"{target.name} ({analysis.target})"
    report = format_analysis(analysis, device=device, top=args.top)
    if measured is not None:
        report += "\n" + format_profile(measured, top=args.top or None)
    compiled = None
    if args.compile_for is not None:
        from memopt.reports.compiled import format_compiled

        _progress(f"compiling the Triton kernels for {args.compile_for} (cached by source) ...")
        compiled = memopt.compile_for_gpu(analysis, args.compile_for)
        analysis.compiled = compiled  # in analysis.json too
        report += "\n" + format_compiled(compiled)
    if args.json:
        data = analysis_json(analysis, [device])
        if measured is not None:
            data["measured"] = measured.to_dict()
        _write(args.json, json.dumps(data, indent=2, sort_keys=True) + "\n")
    if args.out:
        from memopt.reports.writer import write_report

        _progress(f"writing the report to {args.out} ...")
        try:
            written = write_report(analysis, args.out, device=device, measured=measured)
        except OSError as exc:
            raise _UsageError(f"cannot write {args.out!r}: {exc.strerror or exc}") from exc
    sys.stdout.write(report)
    sys.stdout.flush()
    if args.json:
        _progress(f"wrote {args.json}")
    if args.out:
        _progress(f"wrote {written.index}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    from memopt.config import Config
    from memopt.driver.analyze import Captures, analyze_captured
    from memopt.reports.diff import analysis_diff, pass_diffs, pipeline_diff

    if (args.from_options is None) != (args.to_options is None):
        raise _UsageError("--from and --to go together: give both, or neither")
    if args.pass_name is not None and args.from_options is not None:
        raise _UsageError("give --pass or --from/--to, not both")
    options = _options(args)
    config = Config.from_options(options)
    sides = []
    if args.from_options is not None:
        sides = [
            (text, Config.from_options({**options, **_parse_options(text)}))
            for text in (args.from_options, args.to_options)
        ]
    elif args.pass_name is not None and args.pass_name not in config.pass_names():
        from memopt.passes import PASSES

        if args.pass_name not in PASSES:
            raise _UsageError(
                f"unknown pass {args.pass_name!r}; valid choices: {', '.join(sorted(PASSES))}"
            )
        raise _UsageError(
            f"pass {args.pass_name!r} is not in the pipeline "
            f"({', '.join(config.pass_names()) or 'no passes'})"
        )

    target = _load(args)
    _progress("capturing and running passes ...")
    captures = Captures(target.fn, target.inputs, training=args.train, dynamic=args.dynamic)
    graphs = captures.for_config(config).graphs
    if args.graph is not None and args.graph not in {g.name for g in graphs}:
        names = ", ".join(g.name for g in graphs)
        raise _UsageError(f"no graph {args.graph!r}; this program has: {names}")

    def analyze(config: Config):
        analysis = analyze_captured(
            captures.for_config(config), config, target=target.name, eager_bytes=0, eager_ops=0
        )
        if args.graph is not None:
            analysis.graphs = [g for g in analysis.graphs if g.name == args.graph]
        return analysis

    if sides:
        (left_name, left), (right_name, right) = sides
        text = analysis_diff(analyze(left), analyze(right), left_name, right_name, args.context)
    elif args.pass_name is not None:
        text = pass_diffs(analyze(config), args.pass_name, args.context)
    else:
        text = pipeline_diff(analyze(config), args.context)
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from memopt.config import Config
    from memopt.tools.ablate import require_matplotlib

    options = _options(args)
    Config.from_options(options)
    _check_writable_dir(args.out)
    if args.plot:
        require_matplotlib()  # missing matplotlib fails now, not after the ablation
        _check_writable_file(args.plot)
    target = _load(args)
    import memopt

    ablation = memopt.ablate(
        target.fn,
        *target.inputs,
        training=args.train,
        dynamic=args.dynamic,
        run=args.measure,
        repeats=args.repeats,
        progress=_progress,
        precision=args.precision,
        **options,
    )
    ablation.target = target.name
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise _UsageError(f"cannot write {args.out!r}: {exc.strerror or exc}") from exc
    csv_path = os.path.join(args.out, "ablation.csv")
    json_path = os.path.join(args.out, "ablation.json")
    _write(csv_path, ablation.to_csv())
    _write(json_path, json.dumps(ablation.to_dict(), indent=2, sort_keys=True) + "\n")
    if args.plot:
        ablation.plot(args.plot)
    sys.stdout.write(ablation.format())
    sys.stdout.flush()
    for path in (csv_path, json_path, args.plot):
        if path:
            _progress(f"wrote {path}")
    return 0


def _measure(target, args: argparse.Namespace, options: dict):
    """memopt.profile of a loaded target with the command's --train, --dynamic, --rounds
    and --no-inductor (`report --measure` and `profile`), named as the user named it."""
    from memopt.driver.profile import profile

    result = profile(
        target.fn,
        *target.inputs,
        training=args.train,
        dynamic=args.dynamic,
        rounds=args.rounds,
        compare=not args.no_inductor,
        progress=_progress,
        **options,
    )
    result.target = target.name
    return result


def _profile(args: argparse.Namespace) -> int:
    from memopt.config import Config
    from memopt.reports.measured import format_profile

    options = _options(args)
    Config.from_options(options)
    if args.json:
        _check_writable_file(args.json)
    result = _measure(_load(args), args, options)
    sys.stdout.write(format_profile(result, top=args.top or None))
    sys.stdout.flush()
    if args.json:
        _write(args.json, json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")
        _progress(f"wrote {args.json}")
    return 0


def _bisect(args: argparse.Namespace) -> int:
    from memopt.config import Config
    from memopt.tools.bisect import bisect

    options = _options(args)
    Config.from_options(options)
    target = _load(args)
    result = bisect(
        target.fn,
        *target.inputs,
        training=args.train,
        dynamic=args.dynamic,
        progress=_progress,
        **options,
    )
    text = result.format().replace(
        f"memopt bisect: {result.target}", f"memopt bisect: {target.name}", 1
    )
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


def _load(args: argparse.Namespace):
    """The target, loaded; a module put in train mode for --train."""
    import torch

    from memopt.driver.targets import load_target
    from memopt.examples import DEFAULT_EXAMPLE

    _progress(f"loading {args.target or DEFAULT_EXAMPLE} ...")
    target = load_target(args.target)
    if args.train:
        plain_function = not isinstance(target.fn, torch.nn.Module)
        already = target.differentiated_inputs()
        target.for_training()
        if plain_function and not already:
            names = ", ".join(map(str, target.differentiated_inputs())) or "(none)"
            _progress(
                "--train: no input requires grad; differentiating with respect to "
                f"floating-point inputs {names}"
            )
    return target


def _parse_options(text: str) -> dict[str, object]:
    """`--from`/`--to`: space-separated key=value (passes and disable take comma lists)."""
    from memopt.config import Config, parse_env_value

    options: dict[str, object] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _UsageError(f"expected key=value in {text!r}, got {item!r}")
        if key not in Config.keys():
            raise _UsageError(
                f"unknown option {key!r} in {text!r}; valid choices: {', '.join(Config.keys())}"
            )
        # The environment's parser: the same strings MEMOPT_<KEY> takes.
        options[key] = parse_env_value(key, value)
    return options


def _check_writable_file(path: str) -> None:
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise _UsageError(f"cannot write {path!r}: its directory does not exist")


def _check_writable_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise _UsageError(f"cannot write {path!r}: it is a file, not a directory")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise _UsageError(f"cannot write {path!r}: its parent directory does not exist")


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        raise _UsageError(f"cannot write {path!r}: {exc.strerror or exc}") from exc


def _examples(args: argparse.Namespace) -> int:
    from memopt.examples import DEFAULT_EXAMPLE, EXAMPLES

    width = max(len(name) for name in EXAMPLES)
    for name, description in EXAMPLES.items():
        default = "  (default)" if name == DEFAULT_EXAMPLE else ""
        print(f"{name.ljust(width)}  {description}{default}")
    return 0


def _options(args: argparse.Namespace) -> dict[str, object]:
    """The memopt options the user gave, and only those (so MEMOPT_* still apply)."""
    options: dict[str, object] = {}
    if args.passes is not None:
        options["passes"] = _split_names(args.passes)
    if args.disable:
        options["disable"] = [name for value in args.disable for name in _split_names(value)]
    if getattr(args, "fuel", None) is not None:
        options["fuel"] = args.fuel
    if getattr(args, "device", None) is not None:
        options["device"] = args.device
    if getattr(args, "backend", None) is not None:
        options["backend"] = args.backend
    if getattr(args, "check", False):
        options["check"] = True
    if getattr(args, "pass_option", None):
        pass_options: dict[str, dict[str, object]] = {}
        for pass_name, option, value in args.pass_option:
            pass_options.setdefault(pass_name, {})[option] = value
        options["pass_options"] = pass_options
    return options


def _split_names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _progress(message: str) -> None:
    print(f"memopt: {message}", file=sys.stderr, flush=True)


def _error(message: str) -> None:
    # One line, whatever the message: a traceback or usage block is not for users.
    first = " ".join(message.split()) if message else "unknown error"
    print(f"memopt: error: {first}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
