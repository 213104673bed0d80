"""One typed configuration: the options dict, MEMOPT_* environment variables, defaults.

The same keys are accepted by `torch.compile(..., options=...)`, `memopt.analyze(**options)`
and the environment (`MEMOPT_DISABLE=cleanup`). Explicit options win over the environment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from memopt.backends.registry import backend_names
from memopt.backends.runtime.decode_attention import CHOICES as ATTENTION_CHOICES
from memopt.backends.runtime.gemm import CHOICES as GEMM_CHOICES
from memopt.backends.runtime.gemv import CHOICES as GEMV_CHOICES
from memopt.compiler.devices import get_device
from memopt.errors import OptionError, unknown
from memopt.passes import DEFAULT_PIPELINE, OPT_IN_PASSES, PASSES, Pipeline, Stage, make_pass


@dataclass(frozen=True)
class Config:
    # Ordered pass names to run; None means the default pipeline (memopt.passes.DEFAULT_PIPELINE).
    passes: tuple[str, ...] | None = None
    # Pass names to skip.
    disable: tuple[str, ...] = ()
    # Maximum number of rewrite decisions across all passes; None means unlimited.
    # Used to bisect a miscompile down to one decision.
    fuel: int | None = None
    backend: str = "auto"
    # Device model used for roofline predictions (memopt.compiler.devices).
    device: str = "h100"
    # Which library runs float32 GEMMs on the CPU: "auto" (the faster on this machine,
    # measured once and cached: backends/runtime/gemm.py), "aten" (MKL) or "onednn".
    cpu_gemm: str = "auto"
    # Where float32 CPU products of a few rows (a decode step's GEMVs) run: "auto" (the
    # faster on this machine, measured once and cached: backends/runtime/gemv.py), "aten"
    # or "memopt" (its streaming kernels).
    cpu_gemv: str = "auto"
    # Where float32 CPU attention of one query position over a cache (a decode step's) and
    # causal attention of many (a prefill's) run: "auto" (the faster on this machine, each
    # measured once and cached: backends/runtime/decode_attention.py, causal_attention.py),
    # "aten" or "memopt" (its decode and causal kernels).
    cpu_attention: str = "auto"
    # Where the backend writes its per-graph analysis JSON; None writes nothing.
    report_dir: str | None = None
    # Compare every optimized graph against the unoptimized one on real inputs.
    check: bool = False
    # Report what the backend does (graphs, bytes, fallbacks) on stderr.
    verbose: bool = False
    # Typed options of individual passes: {"fusion": {"max_nodes": 16}}.
    pass_options: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    # Set by from_options: which keys came from where, for error messages and reports.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "sources")

    @classmethod
    def from_options(
        cls, options: Mapping[str, object] | None = None, env: Mapping[str, str] | None = None
    ) -> Config:
        """Validate and merge options over MEMOPT_* environment variables over defaults."""
        env = os.environ if env is None else env
        valid = cls.keys()
        values: dict[str, object] = {}
        sources: dict[str, str] = {}
        for key in valid:
            raw = env.get(f"MEMOPT_{key.upper()}")
            if raw is not None and raw != "":
                values[key] = parse_env_value(key, raw)
                sources[key] = f"MEMOPT_{key.upper()}"
        for key, value in (options or {}).items():
            if key not in valid:
                raise unknown("option", key, valid)
            values[key] = value
            sources[key] = "options"
        config = cls(**{k: _coerce(k, v) for k, v in values.items()}, sources=sources)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise OptionError for anything a compilation would trip on later: an unknown
        pass, backend or device, a pass option of the wrong name, type or range."""
        for name in (*(self.passes or ()), *self.disable, *self.pass_options):
            if name not in PASSES:
                raise unknown("pass", name, tuple(PASSES))
        if self.backend not in backend_names():
            raise unknown("backend", self.backend, backend_names())
        if self.cpu_gemm not in GEMM_CHOICES:
            raise unknown("cpu_gemm", self.cpu_gemm, GEMM_CHOICES)
        if self.cpu_gemv not in GEMV_CHOICES:
            raise unknown("cpu_gemv", self.cpu_gemv, GEMV_CHOICES)
        if self.cpu_attention not in ATTENTION_CHOICES:
            raise unknown("cpu_attention", self.cpu_attention, ATTENTION_CHOICES)
        if self.fuel is not None and self.fuel < 0:
            raise OptionError(f"fuel must be a non-negative integer, got {self.fuel}")
        get_device(self.device)
        self.pipeline()  # every pass built with its options, each checked by its type

    def pass_names(self) -> tuple[str, ...]:
        """The passes to run, in order: the pipeline minus the disabled ones. An opt-in
        pass (OPT_IN_PASSES) joins the default pipeline, at its place, when its options
        are given."""
        order = self.passes if self.passes is not None else DEFAULT_PIPELINE
        if self.passes is None:
            for name, after in OPT_IN_PASSES.items():
                if name in self.pass_options and name not in order:
                    at = order.index(after) + 1 if after in order else 0
                    order = (*order[:at], name, *order[at:])
        return tuple(name for name in order if name not in self.disable)

    def pipeline(self) -> Pipeline:
        """What the passes layer runs: each pass built with its options, in order."""
        configured = {name: make_pass(name, self.pass_options.get(name)) for name in PASSES}
        pipeline = Pipeline(
            passes=tuple(configured[name] for name in self.pass_names()),
            configured=configured,
            backend=self.backend,
            check=self.check,
            cpu_attention=self.cpu_attention,
        )
        partitioners = [p.name for p in pipeline.at(Stage.PARTITION)]
        if len(partitioners) > 1:
            raise OptionError(
                f"passes {', '.join(partitioners)} both partition the joint graph; run one"
            )
        return pipeline

    def replace(self, **changes: object) -> Config:
        config = dataclasses.replace(self, **{k: _coerce(k, v) for k, v in changes.items()})
        config.validate()
        return config

    def as_dict(self) -> dict[str, object]:
        return {key: getattr(self, key) for key in self.keys()}


def _names(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise OptionError(f"option {key!r} takes a list of pass names, got {value!r}")


def _coerce(key: str, value: object) -> object:
    if key in ("passes", "disable"):
        return None if value is None and key == "passes" else _names(key, value)
    if key == "fuel":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(f"option 'fuel' takes an integer, got {value!r}")
        return value
    if key == "pass_options":
        if not isinstance(value, Mapping) or not all(
            isinstance(v, Mapping) for v in value.values()
        ):
            raise OptionError(
                f"option 'pass_options' takes {{pass: {{option: value}}}}, got {value!r}"
            )
        return {name: dict(v) for name, v in value.items()}
    if key in ("check", "verbose"):
        if not isinstance(value, bool):
            raise OptionError(f"option {key!r} takes True or False, got {value!r}")
        return value
    if key == "report_dir":
        return None if value is None else os.fspath(value)  # type: ignore[arg-type]
    if not isinstance(value, str):
        raise OptionError(f"option {key!r} takes a string, got {value!r}")
    return value


def parse_env_value(key: str, raw: str) -> object:
    if key == "pass_options":
        import json

        try:
            return json.loads(raw)
        except json.JSONDecodeError as error:
            raise OptionError(f"MEMOPT_PASS_OPTIONS must be JSON: {error}") from None
    if key == "fuel":
        try:
            return int(raw)
        except ValueError:
            raise OptionError(f"MEMOPT_FUEL must be an integer, got {raw!r}") from None
    if key in ("check", "verbose"):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise OptionError(f"MEMOPT_{key.upper()} must be 0 or 1, got {raw!r}")
    return raw
