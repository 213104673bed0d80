"""Device models for roofline predictions: memory bandwidth and dense peak FLOP/s.

Figures are the vendors' published peaks (dense, no structured sparsity). A prediction is
`max(bytes / bandwidth, flops / peak)` per kernel, summed: a lower bound on run time that
ignores launch overhead and caches. It is labelled *modelled*.
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

    def seconds(self, nbytes: float, flops: float, low_precision: bool = False) -> float:
        """Roofline time of one kernel: bound by memory or by compute, whichever is slower."""
        peak = self.bf16_flops_per_s if low_precision else self.fp32_flops_per_s
        return max(nbytes / self.bandwidth_bytes_per_s, flops / peak)


DEVICES: dict[str, Device] = {
    "h100": Device(
        "h100",
        "NVIDIA H100 SXM5 80GB",
        bandwidth_bytes_per_s=3.35e12,  # HBM3 3.35 TB/s (NVIDIA H100 Tensor Core GPU datasheet)
        fp32_flops_per_s=67e12,  # FP32 67 TFLOPS (same datasheet)
        bf16_flops_per_s=989e12,  # BF16 Tensor Core 1,979 TFLOPS with sparsity, 989 dense
    ),
    "h200": Device(
        "h200",
        "NVIDIA H200 SXM 141GB",
        bandwidth_bytes_per_s=4.8e12,  # HBM3e 4.8 TB/s (NVIDIA H200 Tensor Core GPU datasheet)
        fp32_flops_per_s=67e12,  # FP32 67 TFLOPS (same datasheet)
        bf16_flops_per_s=989e12,  # BF16 Tensor Core 1,979 TFLOPS with sparsity, 989 dense
    ),
    "a100": Device(
        "a100",
        "NVIDIA A100 SXM 80GB",
        bandwidth_bytes_per_s=2.039e12,  # HBM2e 2,039 GB/s (NVIDIA A100 datasheet, 80GB SXM)
        fp32_flops_per_s=19.5e12,  # FP32 19.5 TFLOPS (same datasheet)
        bf16_flops_per_s=312e12,  # BF16 Tensor Core 312 TFLOPS dense (624 with sparsity)
    ),
    "mi300x": Device(
        "mi300x",
        "AMD Instinct MI300X",
        bandwidth_bytes_per_s=5.3e12,  # HBM3 5.3 TB/s (AMD Instinct MI300X data sheet)
        fp32_flops_per_s=163.4e12,  # FP32 vector 163.4 TFLOPS (same data sheet)
        bf16_flops_per_s=1307.4e12,  # BF16 matrix 1,307.4 TFLOPS dense (same data sheet)
    ),
    "l4": Device(
        "l4",
        "NVIDIA L4",
        bandwidth_bytes_per_s=300e9,  # GDDR6 300 GB/s (NVIDIA L4 Tensor Core GPU datasheet)
        fp32_flops_per_s=30.3e12,  # FP32 30.3 TFLOPS (same datasheet)
        bf16_flops_per_s=121e12,  # BF16 Tensor Core 242 TFLOPS with sparsity, 121 dense
    ),
    "rtx4090": Device(
        "rtx4090",
        "NVIDIA GeForce RTX 4090",
        bandwidth_bytes_per_s=1008e9,  # GDDR6X 1,008 GB/s (NVIDIA Ada GPU architecture whitepaper)
        fp32_flops_per_s=82.6e12,  # FP32 82.6 TFLOPS (same whitepaper)
        bf16_flops_per_s=165.2e12,  # BF16 Tensor Core, FP32 accumulate, dense (same whitepaper)
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
