"""The pass registry: every pass by name, registered by a decorator beside its class.

    @register_pass("fusion", codes=("vertical", "horizontal", ...))
    @dataclass(frozen=True)
    class Fusion(Pass):
        max_nodes: int = field(default=64, metadata={"min": 1})
        matmul_templates: Literal["auto", "on", "off"] = "auto"

The dataclass fields are the pass's options, typed: `make_pass` checks a value against
its field's annotation (bool, int, float, str, a Literal of choices, `tuple[str, ...]`,
any of those `| None`) and the field's `min`, and raises OptionError naming the pass, the
option and what it takes. The Config builds every pass this way, so a bad option fails
before anything compiles. Writing a pass is one file in this package with one decorated
class: passes/__init__.py imports every module of the package.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from memopt.errors import OptionError, unknown
from memopt.passes.base import STAGE_METHODS, Pass, Stage

PASSES: dict[str, type[Pass]] = {}


@dataclass(frozen=True)
class OptionSpec:
    """One option of a pass: its name, what it takes (in words), its default, its check."""

    name: str
    takes: str
    default: object
    check: Callable[[object], object]  # the value as the pass stores it; ValueError if bad


def register_pass(
    name: str, *, stages: Iterable[Stage] = (Stage.ATEN,), codes: Iterable[str] = ()
) -> Callable[[type[Pass]], type[Pass]]:
    """Register a pass class under `name`, acting at `stages`, deciding with `codes`."""

    def register(cls: type[Pass]) -> type[Pass]:
        params = cls.__dict__.get("__dataclass_params__")  # its own, not a base's
        if params is None or not params.frozen or not issubclass(cls, Pass):
            raise TypeError(f"pass {name!r}: {cls.__name__} must be a frozen dataclass Pass")
        if name in PASSES:
            raise ValueError(f"pass {name!r} is registered twice")
        stage_set = frozenset(stages)
        for stage in stage_set:
            method = STAGE_METHODS[stage]
            if getattr(cls, method, None) is getattr(Pass, method, None):
                raise TypeError(f"pass {name!r} acts at {stage.value} but defines no {method}()")
        cls.name = name
        cls.stages = stage_set
        cls.codes = frozenset(codes)
        cls.options = _option_specs(cls)  # type: ignore[attr-defined]
        PASSES[name] = cls
        return cls

    return register


def make_pass(name: str, values: Mapping[str, object] | None = None) -> Pass:
    """The pass `name` with option `values` (checked; the rest default)."""
    if name not in PASSES:
        raise unknown("pass", name, tuple(PASSES))
    cls = PASSES[name]
    specs: dict[str, OptionSpec] = cls.options  # type: ignore[attr-defined]
    checked = {}
    for key, value in (values or {}).items():
        if key not in specs:
            valid = ", ".join(sorted(specs)) or "none"
            raise OptionError(f"unknown option {key!r} of pass {name!r}; valid options: {valid}")
        try:
            checked[key] = specs[key].check(value)
        except ValueError:
            raise OptionError(
                f"option {key!r} of pass {name!r} takes {specs[key].takes}, got {value!r}"
            ) from None
    return cls(**checked)


def option_specs(name: str) -> dict[str, OptionSpec]:
    """The options of pass `name`, for help texts and documentation."""
    return dict(PASSES[name].options)  # type: ignore[attr-defined]


# -- option types ------------------------------------------------------------------------


def _option_specs(cls: type[Pass]) -> dict[str, OptionSpec]:
    hints = typing.get_type_hints(cls)
    specs = {}
    for f in dataclasses.fields(cls):
        takes, check = _checker(hints[f.name], f.metadata.get("min"))
        specs[f.name] = OptionSpec(f.name, takes, f.default, check)
    return specs


def _checker(annotation: object, minimum: float | None) -> tuple[str, Callable[[object], object]]:
    """(what the type takes, in words; a check that returns the value to store)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        takes, check = _checker(inner, minimum)
        return f"{takes} or None", lambda value: None if value is None else check(value)
    if origin is typing.Literal:
        choices = ", ".join(repr(a) for a in args)
        return f"one of {choices}", lambda value: _member(value, args)
    if origin is tuple and args[1:] == (Ellipsis,) and args[0] is str:
        return "a list of names (or a comma-separated string)", _names
    if annotation is bool:
        return "True or False", lambda value: _typed(value, bool)
    if annotation in (int, float):
        floor = "" if minimum is None else f" >= {minimum}"
        what = f"{'an integer' if annotation is int else 'a number'}{floor}"
        return what, lambda value: _bounded(_typed(value, annotation), minimum)
    if annotation is str:
        return "a string", lambda value: _typed(value, str)
    raise TypeError(f"option type {annotation!r} is not one the registry checks")


def _typed(value: object, kind: type) -> object:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ValueError
    return value


def _bounded(value: object, minimum: float | None) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError  # NaN passes every comparison; an infinite bound is no bound
    if minimum is not None and value < minimum:  # type: ignore[operator]
        raise ValueError
    return value


def _member(value: object, choices: tuple[object, ...]) -> object:
    if value not in choices or isinstance(value, bool):
        raise ValueError
    return value


def _names(value: object) -> tuple[str, ...]:
    if isinstance(value, str):  # "mul_3,aten.sin": a comma list, as the command line gives it
        return tuple(name.strip() for name in value.split(",") if name.strip())
    if not isinstance(value, (list, tuple)):
        raise ValueError
    if not all(isinstance(v, str) for v in value):
        raise ValueError
    return tuple(value)
