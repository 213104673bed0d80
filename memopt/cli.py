"""The `memopt` command.

    memopt report [TARGET] [--device NAME] [--json PATH] [--train] [--dynamic] [--top N]
                  [--passes a,b] [--disable NAME] [--fuel N] [--check]
    memopt examples

TARGET is a built-in example name (default gpt2_block), `path.py` (its `example()`) or
`path.py:factory`. The report goes to stdout, progress to stderr. A user error (bad target,
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
            raise _UsageError("missing command; choose one of: report, examples (see --help)")
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
        "the predicted time on a device, the costliest nodes and the pass ledger.",
    )
    report.add_argument(
        "target",
        nargs="?",
        metavar="TARGET",
        help="built-in example name (default gpt2_block), path.py, or path.py:factory",
    )
    report.add_argument("--device", metavar="NAME", help="device model for predicted time")
    report.add_argument("--json", metavar="PATH", help="also write the analysis as JSON to PATH")
    report.add_argument(
        "--train",
        action="store_true",
        help="analyze a training step: forward + backward, modules in train mode",
    )
    report.add_argument("--dynamic", action="store_true", help="capture with symbolic sizes")
    report.add_argument(
        "--top", type=_non_negative, default=10, metavar="N", help="nodes to list (default 10)"
    )
    report.add_argument("--passes", metavar="A,B", help="run these passes, in this order")
    report.add_argument(
        "--disable",
        action="append",
        metavar="NAME",
        help="skip a pass (repeatable, or a comma list)",
    )
    report.add_argument(
        "--fuel", type=_non_negative, metavar="N", help="stop after N rewrite decisions"
    )
    report.add_argument("--check", action="store_true", help="compare each graph against eager")
    report.set_defaults(run=_report)

    examples = commands.add_parser("examples", help="list the built-in examples")
    examples.set_defaults(run=_examples)
    return parser


def _report(args: argparse.Namespace) -> int:
    from memopt.compiler.summary import analysis_json, format_analysis
    from memopt.compiler.targets import load_target
    from memopt.config import Config
    from memopt.examples import DEFAULT_EXAMPLE

    options = _options(args)
    # Validate options before the slow part, so a typo fails in a second, not after analysis;
    # it also resolves the device from MEMOPT_DEVICE when --device is not given.
    device = Config.from_options(options).device
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise _UsageError(f"cannot write {args.json!r}: its directory does not exist")

    _progress(f"loading {args.target or DEFAULT_EXAMPLE} ...")
    target = load_target(args.target)
    _progress("analyzing (counting eager bytes, capturing, running passes) ...")
    import torch

    import memopt  # Dynamo and the compiler load here, after the cheap checks

    if args.train and isinstance(target.fn, torch.nn.Module):
        # Examples return eval-mode models for inference; a training step means train mode
        # (batchnorm with batch statistics, dropout on).
        target.fn.train()
    analysis = memopt.analyze(
        target.fn, *target.inputs, training=args.train, dynamic=args.dynamic, **options
    )
    if analysis.target != target.name:
        analysis.target = f"{target.name} ({analysis.target})"
    report = format_analysis(analysis, device=device, top=args.top)
    if args.json:
        data = analysis_json(analysis, [device])
        try:
            with open(args.json, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=2, sort_keys=True)
                out.write("\n")
        except OSError as exc:
            raise _UsageError(f"cannot write {args.json!r}: {exc.strerror or exc}") from exc
    sys.stdout.write(report)
    sys.stdout.flush()
    if args.json:
        _progress(f"wrote {args.json}")
    return 0


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
    if args.fuel is not None:
        options["fuel"] = args.fuel
    if args.device is not None:
        options["device"] = args.device
    if args.check:
        options["check"] = True
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


def _progress(message: str) -> None:
    print(f"memopt: {message}", file=sys.stderr, flush=True)


def _error(message: str) -> None:
    # One line, whatever the message: a traceback or usage block is not for users.
    first = " ".join(message.split()) if message else "unknown error"
    print(f"memopt: error: {first}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
