"""Published dense BF16 tensor throughput and memory bandwidth of named GPUs: the compute floor.

The floor of a step is ``max(FLOPs / peak FLOP/s, bytes / bandwidth)``: no kernel runs faster
than the chip's datasheet peak, so real steps take longer. It is a LOWER BOUND, never an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    """One card: dense (no 2:4 sparsity) BF16 tensor TFLOP/s, memory in GB and TB/s, a source."""

    name: str
    bf16_tflops: float
    memory_gb: float
    bandwidth_tbs: float
    source: str


GPUS: dict[str, GPU] = {g.name: g for g in (
    # Datasheets quote BF16 "with sparsity" (2x); the dense figure is half of it.
    GPU("H100 SXM", 989.4, 80, 3.35,
        "NVIDIA H100 Tensor Core GPU datasheet (SXM5: 1,979 TFLOPS BF16 with sparsity, 3.35 TB/s)"),
    GPU("H200", 989.4, 141, 4.8,
        "NVIDIA H200 Tensor Core GPU datasheet (SXM: 1,979 TFLOPS BF16 with sparsity, 4.8 TB/s)"),
    GPU("A100-80GB", 312.0, 80, 2.039,
        "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM: 312 TFLOPS BF16 dense, 2,039 GB/s)"),
    GPU("L40S", 362.05, 48, 0.864,
        "NVIDIA L40S datasheet (733 TFLOPS BF16 with sparsity, 864 GB/s)"),
    GPU("RTX 4090", 165.2, 24, 1.008,
        "NVIDIA Ada Lovelace architecture whitepaper v2.1, Appendix A Table 2 (BF16 tensor "
        "with FP32 accumulate 165.2 TFLOPS dense; 1,008 GB/s)"),
)}


def floor_seconds(flops: float, min_bytes: float, gpu: GPU) -> float:
    """Lower bound on seconds: ``max(flops / peak, min_bytes / bandwidth)`` on ``gpu``."""
    return max(flops / (gpu.bf16_tflops * 1e12), min_bytes / (gpu.bandwidth_tbs * 1e12))
