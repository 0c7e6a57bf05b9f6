"""Checks shared by the losses: options, inputs and finiteness, one clear error each."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..conditioning import check_cond
from ..protocols import Cond


def check_option(owner: str, name: str, check: Callable[[], object]) -> None:
    """Run ``check()`` on a loss option at construction; re-raise its ``ValueError`` prefixed
    with ``owner(name=...)``, so the message names the loss and the field."""
    try:
        check()
    except ValueError as err:
        raise ValueError(f"{owner}({name}=...): {err}") from None


def _same_as(name: str, x: Tensor, ref: Tensor, ref_name: str, check_dtype: bool = True) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has "
                         f"{tuple(ref.shape)}")
    if check_dtype and x.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def check_per_sample_int(name: str, x: Tensor, batch: int, device: torch.device) -> None:
    """Refuse ``x`` unless it is an int32/int64 tensor (batch,) on ``device``, naming ``name``."""
    if x.shape != (batch,) or x.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor of shape ({batch},), got "
                         f"{x.dtype} {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the latents are on {device}")


def check_inputs(x: Tensor, z: Tensor | None, noise: Tensor, cond: Cond, index: Tensor,
                 bias: Tensor | None, x_name: str = "z_hat") -> None:
    """Validate a loss's tensors against its samples ``x`` (B, ...), called ``x_name`` in the
    messages (the argument's name in the caller's signature). No host sync."""
    if not x.is_floating_point() or x.ndim < 2:
        raise ValueError(f"{x_name} must be a floating (B, ...) tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{x_name} is an empty batch (shape {tuple(x.shape)}): a loss needs at "
                         "least one sample")
    if z is not None:
        _same_as("z", z, x, x_name)
    _same_as("noise", noise, x, x_name, check_dtype=False)
    b = x.shape[0]
    check_cond(cond, b, x.device)
    check_per_sample_int("index", index, b, x.device)
    if bias is not None:
        check_per_sample_int("dasm_bias", bias, b, x.device)


class FiniteChecks:
    """A loss call's finiteness checks, read with one host sync at the end (`raise_first`).

    Tensors are noted in causal order (inputs, then weights, then each point's model outputs and
    the weights computed from them); the first non-finite one is the cause, and its error names
    it: a ``ValueError`` for the caller's inputs and weightings, a ``FloatingPointError`` for what
    a model (or a normaliser computed from it) returned although everything before it was finite.
    """

    def __init__(self) -> None:
        self._flags: list[Tensor] = []
        self._errors: list[tuple[type[Exception], str]] = []

    def note(self, tensors: Tensor | list[Tensor] | None, error: type[Exception],
             message: str) -> None:
        """Queue a check (no host sync) that raises ``error(message)`` if ``tensors`` is not
        all finite."""
        for x in [tensors] if isinstance(tensors, Tensor) else tensors or []:
            self._flags.append(torch.isfinite(x).all())
            self._errors.append((error, message))

    def note_input(self, name: str, tensors: Tensor | list[Tensor] | None) -> None:
        """An argument of the loss call (``z_hat``, ``noise``, the ``cond`` leaves, ...)."""
        self.note(tensors, ValueError, f"non-finite values in {name}")

    def note_model(self, role: str, pred: Tensor, where: str = "") -> None:
        """What the model in ``role`` (teacher, fake, model) returned, at ``where``."""
        self.note(pred, FloatingPointError,
                  f"non-finite values in the {role}'s prediction{where} although its inputs are "
                  f"finite: the {role} returned NaN or inf (check its weights and dtype: fp16 "
                  "overflows above 65504); pass check_finite=False to skip such steps yourself")

    def raise_first(self) -> None:
        """One host sync: raise the first queued check that failed, if any."""
        if not self._flags:
            return
        ok = torch.stack([f.to(self._flags[0].device) for f in self._flags]).tolist()
        for good, (error, message) in zip(ok, self._errors, strict=True):
            if not good:
                raise error(message)


def draw_level(x: Tensor, num_steps: int, sampler: Callable[..., Tensor], index: Tensor | None,
               noise: Tensor | None, generator: torch.Generator | None
               ) -> tuple[Tensor, Tensor]:
    """A loss call's ``index`` (B,) and ``noise`` (x's shape), each drawn with ``generator``
    (on its device, then moved to ``x``'s) where the caller gave none."""
    if index is None:
        index = sampler(x.shape[0], num_steps, generator=generator, device=x.device)
    if noise is None:
        where = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=where).to(x.device)
    return index, noise


class FakeOnlyInputs:
    """The optional keyword inputs of a loss that reads ``fake`` and neither ``z`` nor
    ``dasm_bias`` (SiD, SIM, decoupled DMD), as `ScoreDistillationLoss.uses` states them."""

    @property
    def uses(self) -> frozenset[str]:
        """The optional keyword inputs a call reads: ``fake`` only."""
        return frozenset({"fake"})

    def select_inputs(self, **inputs: object) -> dict[str, object]:
        """``inputs`` without ``z`` and ``dasm_bias``, which this loss does not use."""
        return {k: v for k, v in inputs.items() if k not in {"z", "dasm_bias"}}
