"""Correctness of the SR pipeline's fast modes: relative L2 in fp32 against fp32 eager, bit
identity of a CUDA graph with the compiled code it captured, and planted mistakes the check must
reject (:func:`fp32_check` runs them all).

The half-precision comparison of earlier versions (max |diff| <= 0.25 vs bf16 eager) could not
tell a correct LoRA merge (0.136 on SD3-medium, random weights) from a merge that dropped the
LoRA in half the blocks (0.117): 24 random blocks amplify one bf16 rounding of ``W + BA``. In
fp32 a correct merge moves the output by ~1e-6 of its norm while those mistakes move it by
orders of magnitude more, so the check compares fp32 outputs, before the decoder's clamp (a
clamp hides errors in saturated pixels).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.sr_model import MODES, build, merge_and_fuse, pipeline_forward, unclamped
from scoredistill.adapters import lora_state_dict

REL_L2_TOL = 1e-3
"""Largest relative L2 error (fp32, before the clamp) a correct variant may show."""


def relative_l2(out: Tensor, reference: Tensor) -> float:
    """``||out - reference|| / ||reference||`` over all elements, in float64."""
    out, reference = out.double(), reference.double()
    return ((out - reference).norm() / reference.norm()).item()


def bit_identical(a: Tensor, b: Tensor) -> bool:
    """Same shape, dtype and bits (NaNs compared by bits, not by value)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


def _student_lora_b(transformer: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for key, p in lora_state_dict(transformer, "student").items():
        if ".lora_B." in key:
            yield key, p


@torch.no_grad()
def drop_lora_in_half_the_blocks(transformer: nn.Module) -> None:
    """Wrong on purpose: the student LoRA of the first half of the blocks set to zero."""
    blocks = len(transformer.transformer_blocks)
    for key, p in _student_lora_b(transformer):
        if key.startswith("transformer_blocks.") and int(key.split(".")[1]) < blocks // 2:
            p.zero_()


@torch.no_grad()
def scale_lora(transformer: nn.Module, factor: float = 1.05) -> None:
    """Wrong on purpose: every student LoRA update scaled by ``factor`` (a 5% scale error)."""
    for _, p in _student_lora_b(transformer):
        p.mul_(factor)


WRONG_VARIANTS: dict[str, Callable[[nn.Module], None]] = {
    "LoRA dropped in half the blocks": drop_lora_in_half_the_blocks,
    "LoRA scaled by 1.05": scale_lora,
}
"""Planted mistakes (applied to the transformer before merging) the check must reject."""


def check_row(variant: str, out: Tensor, reference: Tensor, *, tol: float = REL_L2_TOL,
              expect_ok: bool = True) -> dict[str, object]:
    """A row of the fp32 check: relative L2, and whether the verdict is the expected one
    (``expect_ok`` False for a planted mistake, which must be rejected)."""
    err = relative_l2(out, reference)
    accepted = err <= tol
    return {"variant": variant, "rel L2 vs fp32 eager": err, "accepted": accepted,
            "expected": "accept" if expect_ok else "reject",
            "as expected": accepted == expect_ok}


def fp32_check(config: str, x: Tensor, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The correctness rows: the pipeline's modes and planted mistakes against its fp32 eager
    forward with the LoRA unmerged, relative L2 before the clamp; the CUDA-graph mode also bit
    for bit against the compiled mode it captures."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    batch = x.shape[0]
    with unclamped():
        base = build(config, torch.float32, args.device)
        reference = pipeline_forward(base, batch)(x).clone()
        rows = []
        for name, plant in (("LoRA merged + fused QKV", None), *WRONG_VARIANTS.items()):
            model = copy.deepcopy(base)
            if plant is not None:
                plant(model.student.module)
            merge_and_fuse(model)
            out = pipeline_forward(model, batch)(x)
            rows.append(check_row(name + ("" if plant is None else " (planted mistake)"), out,
                                  reference, tol=args.tol, expect_ok=plant is None))
            if plant is None:
                merged = model
            del model
        del base
        if args.compile and not args.quick:
            outs = {}
            for name, mode in MODES.items():
                if mode.get("fp8") or (mode["cuda_graphs"] and not x.is_cuda):
                    continue  # FP8 is compared with bf16 in the timing rows; graphs need CUDA
                outs[name] = pipeline_forward(merged, batch, **mode)(x).clone()
                rows.append(check_row(name, outs[name], reference, tol=args.tol))
            if "compiled + CUDA graphs" in outs:
                rows[-1]["bit-identical to eager"] = bit_identical(
                    outs["compiled + CUDA graphs"], outs["compiled"])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return rows
