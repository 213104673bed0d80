"""memopt.profile: measured time next to modelled bytes, kernel by kernel.

The program is compiled by memopt and, unless `compare=False`, by TorchInductor, and run
eagerly, in interleaved rounds (eager, Inductor, memopt in each round, so the machine's
drift falls on all three alike): the program totals are medians over rounds, and the
speedups medians of the per-round ratios. Then the memopt program runs again with every
kernel timed (`backends.runtime.timing`). Each kernel's row puts its measured time
(median) beside its modelled bytes and FLOPs (`memopt.analyze`) and derives:

- achieved bandwidth: modelled bytes / measured time;
- bandwidth fraction: the time this machine needs to move the kernel's bytes at its
  measured read and write rates (`driver.machine`), over the measured time;
- compute fraction: modelled FLOPs / measured time, over the measured fp32 matmul peak.

Labels: times are *measured*, bytes and FLOPs *modelled*, rates and fractions *derived*
from both. A kernel's time includes the few microseconds of running its graph node by node.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from memopt.backends.runtime.timing import KernelTimer
from memopt.compiler.capture import fresh_entry
from memopt.config import Config
from memopt.driver.analyze import analyze, describe_target
from memopt.driver.machine import Machine, measured_machine
from memopt.driver.measure import compile_program, run_step
from memopt.driver.results import Analysis, KernelRecord


@dataclass(frozen=True)
class KernelTiming:
    """One kernel: what the model says it moves and computes, and how long it took."""

    record: KernelRecord
    seconds: float  # measured: median over calls

    @property
    def achieved_bytes_per_s(self) -> float:
        return self.record.nbytes / self.seconds if self.seconds > 0 else 0.0

    def roof_seconds(self, machine: Machine) -> float:
        """The time this machine's measured read and write rates need for the bytes."""
        write_rate = machine.copy_bytes_per_s / 2  # a copy reads and writes as much
        read_time = self.record.read_bytes / machine.read_bytes_per_s
        return read_time + self.record.write_bytes / write_rate

    def bandwidth_fraction(self, machine: Machine) -> float:
        return self.roof_seconds(machine) / self.seconds if self.seconds > 0 else 0.0

    def compute_fraction(self, machine: Machine) -> float:
        if self.seconds <= 0:
            return 0.0
        return self.record.flops / self.seconds / machine.fp32_flops_per_s

    def bound(self, machine: Machine) -> str:
        """Which roof is nearer: what limits this kernel, by the model and the machine."""
        compute = self.record.flops / machine.fp32_flops_per_s
        return "compute" if compute > self.roof_seconds(machine) else "memory"


@dataclass
class Profile:
    """What `memopt.profile` measured. Times in seconds (measured)."""

    target: str
    training: bool
    machine: Machine
    rounds: int
    memopt_seconds: float
    eager_seconds: float
    inductor_seconds: float | None
    speedup_vs_eager: float  # median over rounds of eager time / memopt time
    speedup_vs_inductor: float | None
    kernels: list[KernelTiming] = field(default_factory=list)
    analysis: Analysis | None = field(default=None, repr=False)

    @property
    def kernel_seconds(self) -> float:
        return sum(k.seconds for k in self.kernels)

    def to_dict(self) -> dict[str, object]:
        m = self.machine
        return {
            "target": self.target,
            "training": self.training,
            "machine": m.to_dict(),
            "rounds": self.rounds,
            "program": {
                "label": "measured",
                "memopt_ms": self.memopt_seconds * 1e3,
                "eager_ms": self.eager_seconds * 1e3,
                "inductor_ms": None
                if self.inductor_seconds is None
                else self.inductor_seconds * 1e3,
                "speedup_vs_eager": self.speedup_vs_eager,
                "speedup_vs_inductor": self.speedup_vs_inductor,
            },
            "kernels": [
                {
                    "kernel": k.record.name,
                    "kind": k.record.kind,
                    "ops": list(k.record.ops),
                    "ms": {"value": k.seconds * 1e3, "label": "measured"},
                    "read_bytes": {"value": k.record.read_bytes, "label": "modelled"},
                    "write_bytes": {"value": k.record.write_bytes, "label": "modelled"},
                    "flops": {"value": k.record.flops, "label": "modelled"},
                    "achieved_gbps": {"value": k.achieved_bytes_per_s / 1e9, "label": "derived"},
                    "bandwidth_fraction": {"value": k.bandwidth_fraction(m), "label": "derived"},
                    "compute_fraction": {"value": k.compute_fraction(m), "label": "derived"},
                    "bound": k.bound(m),
                }
                for k in self.kernels
            ],
        }


def profile(
    fn: Callable,
    *example_inputs: object,
    training: bool = False,
    dynamic: bool = False,
    rounds: int = 10,
    compare: bool = True,
    progress: Callable[[str], None] | None = None,
    **options: object,
) -> Profile:
    """Measure `fn(*example_inputs)` compiled by memopt, kernel by kernel (module doc).

    Takes what `memopt.analyze` takes; `rounds` timed rounds of each program (after a run
    that compiles and one that warms up); `compare=False` leaves out TorchInductor.
    """
    say = progress or (lambda message: None)
    Config.from_options(options)  # a bad option fails before anything runs
    say("analyzing (modelled bytes) ...")
    analysis = analyze(fn, *example_inputs, training=training, dynamic=dynamic, **options)
    records = {k.name: k for k in analysis.kernels}
    say("compiling memopt" + (" and inductor" if compare else "") + " ...")
    programs: dict[str, Callable] = {
        "eager": fn,
        "memopt": compile_program(fn, options, dynamic=dynamic),
    }
    if compare:
        programs["inductor"] = torch.compile(fresh_entry(fn), backend="inductor", dynamic=dynamic)
    for program in programs.values():
        for _ in range(2):  # compile, then warm up
            run_step(program, fn, example_inputs, training)
    say(f"timing {rounds} interleaved rounds ...")
    seconds: dict[str, list[float]] = {name: [] for name in programs}
    for _ in range(max(rounds, 1)):
        for name, program in programs.items():
            seconds[name].append(run_step(program, fn, example_inputs, training)[1])
    say("timing every kernel ...")
    timer = KernelTimer()
    with timer.active():
        for _ in range(max(rounds, 1)):
            run_step(programs["memopt"], fn, example_inputs, training)
    kernels = [
        KernelTiming(records[name], statistics.median(times))
        for name, times in timer.seconds.items()
        if name in records
    ]
    kernels.sort(key=lambda k: _position(k.record.name))

    def speedup(other: str) -> float:
        return statistics.median(a / b for a, b in zip(seconds[other], seconds["memopt"]))

    return Profile(
        target=describe_target(fn),
        training=training,
        machine=measured_machine(),
        rounds=max(rounds, 1),
        memopt_seconds=statistics.median(seconds["memopt"]),
        eager_seconds=statistics.median(seconds["eager"]),
        inductor_seconds=statistics.median(seconds["inductor"]) if compare else None,
        speedup_vs_eager=speedup("eager"),
        speedup_vs_inductor=speedup("inductor") if compare else None,
        kernels=kernels,
        analysis=analysis,
    )


def _position(name: str) -> tuple[str, int]:
    graph, _, index = name.rpartition(".k")
    return graph, int(index)
