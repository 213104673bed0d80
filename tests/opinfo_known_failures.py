"""OpInfos the sweep (bench/opinfo_sweep.py, tests/compiler/test_opinfo.py) does not compare, each with
the reason. A reason starts with its category, then a colon; the sweep groups by category.

Only two kinds of reason belong here:
- the op's values are not a function of its inputs, so no compiler can reproduce eager's
  bits (random sampling, uninitialized memory); memopt keeps their semantics, not their bits;
- a bug outside memopt's own code that memopt cannot work around (torch's), named precisely.

A memopt mismatch never belongs here: it is fixed, or memopt falls back for that case.
"""

from __future__ import annotations

_RANDOM = "random: samples a distribution, so values differ from eager's by design"
_UNINITIALIZED = "uninitialized: returns memory it never writes, so there is nothing to compare"

KNOWN_FAILURES: dict[str, str] = {
    # Random sampling: compiled code draws from the same distribution, from a different
    # stream of random bits (decomposed samplers consume the generator differently).
    "bernoulli": _RANDOM,
    "cauchy": _RANDOM,
    "exponential": _RANDOM,
    "geometric": _RANDOM,
    "log_normal": _RANDOM,
    "multinomial": _RANDOM,
    "normal": _RANDOM,
    "normal.in_place": _RANDOM,
    "normal.number_mean": _RANDOM,
    "uniform": _RANDOM,
    "rand_like": _RANDOM,
    "randint": _RANDOM,
    "randint_like": _RANDOM,
    "randn": _RANDOM,
    "randn_like": _RANDOM,
    "nn.functional.alpha_dropout": _RANDOM,
    "nn.functional.dropout": _RANDOM,
    "nn.functional.dropout2d": _RANDOM,
    "nn.functional.dropout3d": _RANDOM,
    "nn.functional.feature_alpha_dropout.with_train": _RANDOM,
    "nn.functional.rrelu": _RANDOM,
    # Uninitialized memory.
    "empty": _UNINITIALIZED,
    "empty_like": _UNINITIALIZED,
    "empty_permuted": _UNINITIALIZED,
    "empty_strided": _UNINITIALIZED,
    "new_empty": _UNINITIALIZED,
    "new_empty_strided": _UNINITIALIZED,
}


def known_reason(label: str) -> str | None:
    """The reason an OpInfo (named `op` or `op.variant`) is not compared, or None."""
    return KNOWN_FAILURES.get(label)
