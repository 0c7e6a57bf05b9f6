"""A plan as the text table ``scoredistill-plan`` prints: peak by category, top modules,
FLOPs, and the compute floor on named GPUs (printed as the lower bound it is)."""

from __future__ import annotations

from .gpus import GPUS, floor_seconds
from .trace import GIB, Plan

PCIE4_X16 = 31.5e9
"""Bytes per second one way over a PCIe 4.0 x16 link, the nominal rate (16 GT/s x 16 lanes,
128b/130b coding); real copies reach less, PCIe 5.0 twice as much."""

CATEGORIES = ("Parameter", "Buffer", "Gradient", "Optstate", "Activation", "Temp", "Other")
NOT_COUNTED = (
    "Not counted (add on a GPU): the CUDA context (about 0.3-0.6 GiB, outside PyTorch's "
    "allocator), cuBLAS/cuDNN workspaces (tens of MiB), and the caching allocator's "
    "fragmentation (reserved above allocated). Traced with CPU kernels: CUDA's flash and "
    "memory-efficient attention keep the same output and log-sum-exp as CPU's flash kernel; "
    "CUDA's AdamW (foreach) adds temporaries of up to the LoRA parameters' size.")


def render(title: str, plan: Plan) -> str:
    """The plan as lines of text."""
    lines = [title, "", f"Peak allocated: {plan.total / GIB:.2f} GiB", ""]
    if plan.host:
        lines[-1:-1] = [f"Host memory meanwhile (RAM, not the card's): {plan.host / GIB:.2f} "
                        "GiB at most"]
    lines += [f"  {name:<12}{plan.peak.get(name, 0) / GIB:>10.3f} GiB" for name in CATEGORIES]
    lines += ["", "Top modules (the most one call, forward or backward, adds over its own "
                  "start; and the peak while it ran):"]
    width = max((len(name) for name, _, _ in plan.top), default=10)
    lines += [f"  {name:<{width}}  +{added / GIB:.3f} GiB  (peak {peak / GIB:.3f} GiB)"
              for name, peak, added in plan.top]
    if plan.offloaded:
        lines += ["", f"Offloaded to host memory: {plan.offloaded / GIB:.2f} GiB per step, "
                      "copied there in the forward and back in the backward (over PCIe 4.0 x16 "
                      f"at its nominal 31.5 GB/s each way: >= "
                      f"{2 * plan.offloaded / PCIE4_X16 * 1e3:.0f} ms a step; 5.0: half)"]
    lines += ["", f"FLOPs: {plan.flops / 1e12:.3f} TFLOP per step", "",
              "Compute floor, a LOWER BOUND: max(FLOPs / datasheet dense BF16 peak, weights "
              "read once / bandwidth); real steps take longer."]
    for gpu in GPUS.values():
        seconds = floor_seconds(plan.flops, plan.min_bytes, gpu)
        fits = "fits" if plan.total <= gpu.memory_gb * 1e9 else "DOES NOT FIT"
        lines.append(f"  {gpu.name:<10} >= {seconds * 1e3:9.2f} ms   {gpu.memory_gb:>4g} GB: "
                     f"{fits} ({plan.total / (gpu.memory_gb * 1e9):.0%} of it)")
    lines += ["", NOT_COUNTED]
    return "\n".join(lines)
