"""Errors memopt raises on bad input. Each message names the problem and the valid choices."""

from __future__ import annotations


class MemoptError(Exception):
    """Base class for every error memopt raises on purpose."""


class OptionError(MemoptError, ValueError):
    """An unknown option key, pass name, backend or device, or a value of the wrong type."""


class TargetError(MemoptError, ValueError):
    """A report target (example name, file or factory) that cannot be loaded."""


class VerificationError(MemoptError):
    """A pass left the graph malformed or changed a node's shape, dtype or strides."""


class CheckError(MemoptError):
    """With check=True: an optimized graph computed something other than eager did."""


def unknown(kind: str, name: object, valid: list[str] | tuple[str, ...]) -> OptionError:
    """`unknown option 'foo'; valid options: a, b, c` and friends, from one place."""
    return OptionError(f"unknown {kind} {name!r}; valid choices: {', '.join(sorted(valid))}")
