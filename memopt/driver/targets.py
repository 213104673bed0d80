"""What `memopt report TARGET` analyzes: a built-in example, a file, or a factory in a file.

    None                  the default example (gpt2_block)
    mlp                   memopt.examples.mlp.example()
    path/to/model.py      example() defined in that file
    path/to/model.py:make make() defined in that file

A factory takes no arguments and returns `(model_or_fn, inputs)`, inputs a tuple of
example inputs (a single tensor is accepted and wrapped). Every failure is a TargetError
with a one-line message.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from memopt.errors import TargetError
from memopt.examples import DEFAULT_EXAMPLE, EXAMPLES

DEFAULT_FACTORY = "example"

# Each loaded file gets its own module name, so two files called model.py do not collide.
_module_ids = itertools.count()


@dataclass(frozen=True)
class Target:
    """A loaded target: a display name, the model or function, and its example inputs."""

    name: str
    fn: object
    inputs: tuple

    def for_training(self) -> Target:
        """This target set up for a training step, in place: a module in train mode (the
        examples return eval-mode models: batch norm then uses batch statistics, dropout is
        on); a plain function, which has no parameters, differentiated with respect to its
        floating-point inputs when none of its inputs requires grad."""
        if isinstance(self.fn, torch.nn.Module):
            self.fn.train()
            return self
        tensors = [t for t in self.inputs if isinstance(t, torch.Tensor)]
        if not any(t.requires_grad for t in tensors):
            for tensor in tensors:
                if tensor.is_floating_point():
                    tensor.requires_grad_(True)
        return self

    def differentiated_inputs(self) -> list[int]:
        """Positions of the inputs that require grad."""
        return [
            k for k, t in enumerate(self.inputs) if isinstance(t, torch.Tensor) and t.requires_grad
        ]


def load_target(spec: str | None) -> Target:
    """Load `spec` (None, an example name, `path.py` or `path.py:factory`) into a Target.

    Raises TargetError naming the problem: unknown example, missing file, a file that
    fails to import, a missing factory, a factory that raised or returned the wrong shape.
    """
    if spec is None or spec == "":
        spec = DEFAULT_EXAMPLE
    path, factory = _split(spec)
    if path is None:
        return _load_example(spec)
    return _load_file(spec, path, factory)


def _split(spec: str) -> tuple[Path | None, str]:
    """(file path, factory name), or (None, "") for a bare example name."""
    head, sep, tail = spec.rpartition(":")
    # Only `something.py:name` splits, so a Windows drive letter stays part of the path.
    if sep and head.endswith(".py") and tail.isidentifier():
        return Path(head), tail
    if sep and head.endswith(".py"):
        raise TargetError(f"{spec!r}: {tail!r} is not a valid factory name")
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        return Path(spec), DEFAULT_FACTORY
    return None, ""


def _load_example(name: str) -> Target:
    if name not in EXAMPLES:
        raise TargetError(
            f"unknown example {name!r}; built-in examples: {', '.join(EXAMPLES)} "
            "(or give a path to a .py file)"
        )
    try:
        module = importlib.import_module(f"memopt.examples.{name}")
    except ModuleNotFoundError as exc:
        # Running from a source tree without `pip install -e`: memopt.examples is
        # examples/ next to the package only once installed, so load the file directly.
        if exc.name not in (f"memopt.examples.{name}", "memopt.examples"):
            raise
        path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.py"
        module = _import_file(name, path)
    return _call_factory(name, module, DEFAULT_FACTORY, f"{name}.py")


def _load_file(spec: str, path: Path, factory: str) -> Target:
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise TargetError(f"target file {str(path)!r} {what}")
    module = _import_file(spec, path)
    return _call_factory(spec, module, factory, path.name)


def _import_file(spec: str, path: Path) -> ModuleType:
    module_name = f"memopt_target_{next(_module_ids)}_{_identifier(path.stem)}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise TargetError(f"cannot import {str(path)!r}: not a Python source file")
    module = importlib.util.module_from_spec(module_spec)
    # Registered while it runs: dataclasses and pickling look a module up by name.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a file calling sys.exit() is a bad target too
        sys.modules.pop(module_name, None)
        raise TargetError(f"cannot import {str(path)!r}: {_describe_exception(exc)}") from exc
    return module


def _call_factory(spec: str, module: ModuleType, factory: str, filename: str) -> Target:
    make = getattr(module, factory, None)
    if make is None:
        callables = _defined_callables(module)
        listed = f"callables it defines: {', '.join(callables)}" if callables else "it defines none"
        raise TargetError(f"{filename} has no factory {factory!r}; {listed}")
    if not callable(make):
        raise TargetError(f"{filename}: {factory!r} is {_short_type(make)}, not a function")
    try:
        made = make()
    except (Exception, SystemExit) as exc:
        raise TargetError(f"{factory}() in {filename} raised {_describe_exception(exc)}") from exc
    fn, inputs = _check_shape(made, f"{factory}() in {filename}")
    return Target(name=spec, fn=fn, inputs=inputs)


def _check_shape(made: object, where: str) -> tuple[object, tuple]:
    expected = "must return (model_or_fn, inputs)"
    if not isinstance(made, (tuple, list)) or len(made) != 2:
        raise TargetError(f"{where} {expected}, got {_short_type(made)}")
    fn, inputs = made
    if not callable(fn):
        raise TargetError(f"{where} {expected}; the model {_short_type(fn)} is not callable")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, list):
        inputs = tuple(inputs)
    elif not isinstance(inputs, tuple):
        raise TargetError(f"{where} {expected}; inputs must be a tuple, got {_short_type(inputs)}")
    return fn, inputs


def _defined_callables(module: ModuleType) -> list[str]:
    """Public functions and classes the file itself defines (not the ones it imports)."""
    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and callable(value)
        and getattr(value, "__module__", None) == module.__name__
    )


def _describe_exception(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _short_type(value: object) -> str:
    if value is None:
        return "None"
    name = type(value).__name__
    article = "an" if name[0].lower() in "aeiou" else "a"
    if isinstance(value, (tuple, list)):
        return f"{article} {name} of length {len(value)}"
    return f"{article} {name}"


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)
