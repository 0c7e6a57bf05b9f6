"""The one-step generator: a student ScoreModel's clean-sample estimate from a single call."""

from __future__ import annotations

import torch
from torch import Tensor

from .batching import check_output
from .parametrization import check_prediction, to_x0_eps
from .protocols import Cond, ScoreModel
from .schedules import index_alpha_sigma


def one_step(student: ScoreModel, x: Tensor, cond: Cond = None, *, index: int = 0) -> Tensor:
    """One-step generator ``G(x) = x0_hat(x, t, c)``: ``x`` read as ``x_t`` at schedule ``index``.

    The student is called once at the timestep of ``index`` (0, the default, is the noisiest
    level: SD3's ``t = 1000``), and its prediction is turned into the clean sample it implies
    (TSD-SR Sec. 3.2: the LQ latent ``z_L`` stands in for pure noise):

    - ``flow`` (SD3): ``x0 = (x - sigma u) / (alpha + sigma)``; at ``t = 1000`` this is
      TSD-SR's ``z_L - v(z_L, 1000, c)``.
    - ``v``: ``x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)``; at zero terminal SNR
      (``alpha = 0``) ``x0 = -v``.
    - ``epsilon``: ``x0 = (x - sigma eps) / alpha``, a division by ``alpha``: refused where
      ``alpha = 0`` (a zero-terminal-SNR table at index 0), and amplifying the prediction's error
      ``sigma / alpha``-fold near it (SD 1.5's index 0: ``alpha = 0.068``, 14.6x).
    - ``x0``: the prediction itself.

    The schedule is read on the CPU and enters as Python scalars: no device-to-host sync, so the
    call can be captured in a CUDA graph.

    Args:
        student: The student ScoreModel.
        x: The input (B, ...) read as ``x_t``, e.g. the LQ latent ``z_L``.
        cond: The condition pytree (batch B).
        index: The schedule index ``x`` is read at (0: the noisiest level).

    Returns:
        The clean-sample estimate ``x0_hat`` (B, ...) float32.

    Raises:
        ValueError: For an ``index`` outside the schedule, an epsilon student at ``alpha = 0``,
            or a student output of another shape, or not floating (`check_output`).

    Example:
        >>> z_hat = one_step(SD3ScoreModel(transformer), z_lq, cond)  # doctest: +SKIP
    """
    kind = check_prediction(student.prediction)
    steps = student.schedule.num_steps
    if not 0 <= index < steps:
        raise ValueError(f"one_step index {index} out of range [0, {steps - 1}]")
    t, alpha, sigma = (float(v) for v in index_alpha_sigma(student.schedule,
                                                           torch.tensor([index])))
    if kind == "epsilon" and alpha == 0.0:
        raise ValueError(f"an epsilon prediction at alpha = 0 (schedule index {index}: zero "
                         "terminal SNR) determines no clean sample (x0 = (x - sigma eps) / alpha): "
                         "start at index >= 1, or use a v- or x0-prediction student")
    pred = check_output(student(x, torch.full((x.shape[0],), t, device=x.device), cond), x,
                        "student").float()
    if kind == "x0":
        return pred
    # Python floats broadcast like the (B, 1, ...) tensors the conversions usually get.
    return to_x0_eps(pred, kind, x.float(), alpha, sigma)[0]  # type: ignore[arg-type]
