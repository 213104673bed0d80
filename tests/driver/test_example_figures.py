"""Every built-in example's figures, inference and training, on the default backend (and on
Triton where its kernels differ): eager bytes (counted), bytes moved and the lower bound
(modelled), and every kernel's kind and bytes. A change that moves any of them shows here, by how much.

The expected figures are in tests/golden/example_figures.json. After a change that is meant
to move them, regenerate the file and review its diff:

    python tests/driver/test_example_figures.py --write
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import memopt
from memopt.driver.targets import load_target
from memopt.examples import EXAMPLES

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "example_figures.json"
# Triton where it makes other kernels (matmul templates, attention): the transformer block
# and the MLP; the conv net and the layer norm get the same kernels on both backends.
TRITON_EXAMPLES = ("gpt2_block", "mlp")
CASES = [
    (name, mode, backend)
    for name in EXAMPLES
    for mode in ("inference", "training")
    for backend in ("auto", "triton")
    if backend == "auto" or name in TRITON_EXAMPLES
]


def figures(name: str, mode: str, backend: str) -> dict[str, object]:
    target = load_target(name)
    if mode == "training":
        target = target.for_training()
    torch.manual_seed(0)
    analysis = memopt.analyze(
        target.fn, *target.inputs, training=mode == "training", backend=backend
    )
    return {
        "eager_bytes": analysis.eager_bytes,
        "bytes_moved": analysis.bytes_moved,
        "lower_bound_bytes": analysis.lower_bound_bytes,
        "kernels": len(analysis.kernels),
        "kinds": sorted({k.kind for k in analysis.kernels}),
        "per_kernel": [[k.name, k.kind, k.read_bytes, k.write_bytes] for k in analysis.kernels],
    }


@pytest.mark.slow
@pytest.mark.parametrize(("name", "mode", "backend"), CASES, ids=["/".join(c) for c in CASES])
def test_figures_are_unchanged(name: str, mode: str, backend: str) -> None:
    expected = json.loads(GOLDEN.read_text())[f"{name}/{mode}/{backend}"]
    actual = json.loads(json.dumps(figures(name, mode, backend)))
    assert actual == expected


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python tests/driver/test_example_figures.py --write")
    table = {}
    for case in CASES:
        table["/".join(case)] = figures(*case)
        print("/".join(case), table["/".join(case)]["bytes_moved"], file=sys.stderr)
    GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
