"""Device models for roofline predictions: memory bandwidth and dense peak FLOP/s.

Figures are the vendors' published peaks (dense, no structured sparsity). A prediction is
`max(bytes / bandwidth, flops / peak)` per kernel, summed: a lower bound on run time that
ignores launch overhead and caches. It is labelled *modelled*.

Each GPU also has its multiprocessor count and the latency of a load that misses every cache.
By Little's law a kernel draws the full bandwidth only with bandwidth x latency bytes of loads
in flight; a compiled kernel whose programs cannot hold that many (too few resident, too few
loads each) draws that share of it (driver/gpu.py, `GpuKernel.bandwidth_share`). The
latencies are unloaded pointer-chase figures from the RRZE-HPC gpu-benches `gpu-latency`
data (github.com/RRZE-HPC/gpu-benches: cycles at the clock measured, converted to ns here);
a loaded memory system's latency is higher, so the shares are upper bounds: only kernels
that cannot cover even the unloaded latency are slowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from memopt.errors import unknown


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    bandwidth_bytes_per_s: float
    fp32_flops_per_s: float
    bf16_flops_per_s: float  # dense tensor-core peak with fp32 accumulation
    multiprocessors: int  # SMs (NVIDIA) or CUs (AMD)
    memory_latency_s: float  # a load that misses every cache, unloaded

    def seconds(
        self, nbytes: float, flops: float, low_precision: bool = False, bandwidth_share: float = 1.0
    ) -> float:
        """Roofline time of one kernel: bound by memory or by compute, whichever is slower.
        `bandwidth_share`: the part of the bandwidth the kernel can draw (at most 1)."""
        peak = self.bf16_flops_per_s if low_precision else self.fp32_flops_per_s
        return max(nbytes / (self.bandwidth_bytes_per_s * bandwidth_share), flops / peak)

    @property
    def bytes_in_flight(self) -> float:
        """Load bytes outstanding at once that the full bandwidth needs (Little's law)."""
        return self.bandwidth_bytes_per_s * self.memory_latency_s


DEVICES: dict[str, Device] = {
    "h100": Device(
        "h100",
        "NVIDIA H100 SXM5 80GB",
        bandwidth_bytes_per_s=3.35e12,  # HBM3 3.35 TB/s (NVIDIA H100 Tensor Core GPU datasheet)
        fp32_flops_per_s=67e12,  # FP32 67 TFLOPS (same datasheet)
        bf16_flops_per_s=989e12,  # BF16 Tensor Core 1,979 TFLOPS with sparsity, 989 dense
        multiprocessors=132,  # SXM5: 132 SMs (NVIDIA H100 Tensor Core GPU Architecture)
        memory_latency_s=375e-9,  # gpu-benches h100_pcie: 658 cycles at 1755 MHz
    ),
    "h200": Device(
        "h200",
        "NVIDIA H200 SXM 141GB",
        bandwidth_bytes_per_s=4.8e12,  # HBM3e 4.8 TB/s (NVIDIA H200 Tensor Core GPU datasheet)
        fp32_flops_per_s=67e12,  # FP32 67 TFLOPS (same datasheet)
        bf16_flops_per_s=989e12,  # BF16 Tensor Core 1,979 TFLOPS with sparsity, 989 dense
        multiprocessors=132,  # the H100 SXM5's SMs
        memory_latency_s=375e-9,  # the H100's (no H200 figure in gpu-benches)
    ),
    "a100": Device(
        "a100",
        "NVIDIA A100 SXM 80GB",
        bandwidth_bytes_per_s=2.039e12,  # HBM2e 2,039 GB/s (NVIDIA A100 datasheet, 80GB SXM)
        fp32_flops_per_s=19.5e12,  # FP32 19.5 TFLOPS (same datasheet)
        bf16_flops_per_s=312e12,  # BF16 Tensor Core 312 TFLOPS dense (624 with sparsity)
        multiprocessors=108,  # 108 SMs (NVIDIA A100 Tensor Core GPU Architecture)
        memory_latency_s=392e-9,  # gpu-benches a100_80: 552 cycles at 1410 MHz
    ),
    "mi300x": Device(
        "mi300x",
        "AMD Instinct MI300X",
        bandwidth_bytes_per_s=5.3e12,  # HBM3 5.3 TB/s (AMD Instinct MI300X data sheet)
        fp32_flops_per_s=163.4e12,  # FP32 vector 163.4 TFLOPS (same data sheet)
        bf16_flops_per_s=1307.4e12,  # BF16 matrix 1,307.4 TFLOPS dense (same data sheet)
        multiprocessors=304,  # 304 CUs (same data sheet)
        # gpu-benches mi300x: 886 cycles at 2092 MHz, past the 256 MB Infinity Cache (its
        # README notes TLB effects there: an upper bound on the HBM latency)
        memory_latency_s=424e-9,
    ),
    "l4": Device(
        "l4",
        "NVIDIA L4",
        bandwidth_bytes_per_s=300e9,  # GDDR6 300 GB/s (NVIDIA L4 Tensor Core GPU datasheet)
        fp32_flops_per_s=30.3e12,  # FP32 30.3 TFLOPS (same datasheet)
        bf16_flops_per_s=121e12,  # BF16 Tensor Core 242 TFLOPS with sparsity, 121 dense
        multiprocessors=58,  # 58 SMs (AD104 as configured for the L4)
        memory_latency_s=251e-9,  # Ada: gpu-benches l40 (AD102), 625 cycles at 2490 MHz
    ),
    "rtx4090": Device(
        "rtx4090",
        "NVIDIA GeForce RTX 4090",
        bandwidth_bytes_per_s=1008e9,  # GDDR6X 1,008 GB/s (NVIDIA Ada GPU architecture whitepaper)
        fp32_flops_per_s=82.6e12,  # FP32 82.6 TFLOPS (same whitepaper)
        bf16_flops_per_s=165.2e12,  # BF16 Tensor Core, FP32 accumulate, dense (same whitepaper)
        multiprocessors=128,  # 128 SMs (same whitepaper)
        memory_latency_s=251e-9,  # Ada: gpu-benches l40 (AD102), 625 cycles at 2490 MHz
    ),
}

# Other spellings people use; each maps to one canonical entry above.
ALIASES: dict[str, str] = {
    "h100-sxm": "h100",
    "h200-sxm": "h200",
    "a100-80gb": "a100",
    "4090": "rtx4090",
}


def get_device(name: str) -> Device:
    """The device model named `name` (case-insensitive); unknown names list the valid ones."""
    key = str(name).lower()
    key = ALIASES.get(key, key)
    if key not in DEVICES:
        raise unknown("device", name, tuple(DEVICES))
    return DEVICES[key]
