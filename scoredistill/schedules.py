"""Stateless noise schedules: rectified flow with SD3's shift, and variance-preserving DDPM."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def check_shift(shift: object, what: str = "shift") -> float:
    """``shift`` as a float if it is a finite number > 0, else a ``ValueError`` naming ``what``.

    SD3's ``sigma = shift s / (1 + (shift - 1) s)`` is a schedule only for ``shift > 0``: at
    ``shift = -1`` sigma is 1.5 at a quarter of the table and -inf at its middle.
    """
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not (
            math.isfinite(shift) and shift > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {shift!r} (SD3's "
                         "sigma = shift s / (1 + (shift - 1) s) leaves [0, 1] otherwise)")
    return float(shift)


def _check_index(index: Tensor, num_steps: int) -> Tensor:
    if index.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"schedule indices must be integers, got dtype {index.dtype}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_steps):
        raise ValueError(f"schedule index out of range [0, {num_steps - 1}]: "
                         f"min {int(index.min())}, max {int(index.max())}")
    return index


@dataclass(frozen=True)
class RectifiedFlow:
    """Rectified flow ``x_t = (1 - sigma) x0 + sigma eps`` with SD3's timestep shift.

    The discrete table equals diffusers' ``FlowMatchEulerDiscreteScheduler(shift)``:
    ``s_i = (N - i) / N``, ``sigma_i = shift s_i / (1 + (shift - 1) s_i)``, ``t_i = N sigma_i``
    (Esser et al. 2024, SD3, Eq. 23). Index 0 is ``t = N`` (pure noise).

    Attributes:
        shift: SD3's timestep shift, a finite number > 0 (a ``ValueError`` otherwise: at
            ``shift = -1`` sigma would be 1.5 at index N/4 and -inf at N/2).
        num_steps: ``N``, the table's length, an integer >= 1.
    """

    shift: float = 3.0
    num_steps: int = 1000

    def __post_init__(self) -> None:
        check_shift(self.shift, "RectifiedFlow shift")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, numbers.Integral) or (
                self.num_steps < 1):
            raise ValueError(f"RectifiedFlow num_steps must be an integer >= 1, got "
                             f"{self.num_steps!r}")

    def sigmas(self, index: Tensor) -> Tensor:
        """Shifted sigma at schedule indices (float32, shape of ``index``)."""
        s = (self.num_steps - _check_index(index, self.num_steps).double()) / self.num_steps
        return (self.shift * s / (1 + (self.shift - 1) * s)).float()

    def timesteps(self, index: Tensor) -> Tensor:
        """Network timestep ``t = N * sigma`` at schedule indices."""
        return self.sigmas(index) * self.num_steps

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(1 - sigma, sigma)`` with ``sigma = t / N``."""
        sigma = t.float() / self.num_steps
        return 1.0 - sigma, sigma


def resolution_shift(image_seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift ``exp(mu)``, ``mu`` linear in the image token count.

    ``mu`` interpolates ``base_shift`` at ``base_seq_len`` tokens and ``max_shift`` at
    ``max_seq_len`` (diffusers' ``FluxPipeline``: ``calculate_shift``; the defaults are FLUX.1's
    scheduler config). The scheduler's exponential ``time_shift(mu, 1, s)`` is
    ``e^mu s / (1 + (e^mu - 1) s)``, SD3's shift formula with ``shift = e^mu``, so
    ``RectifiedFlow(shift=resolution_shift(n))`` is FLUX's table for ``n`` image tokens
    (1024 px FLUX.1: 4096 tokens, shift ``e^1.15 = 3.16``).

    Args:
        image_seq_len: The image token count ``n``, >= 1.
        base_seq_len: The token count where ``mu = base_shift``.
        max_seq_len: The token count where ``mu = max_shift``, > ``base_seq_len``.
        base_shift: ``mu`` at ``base_seq_len`` tokens.
        max_shift: ``mu`` at ``max_seq_len`` tokens.

    Returns:
        The shift ``exp(mu)`` for `RectifiedFlow`.

    Raises:
        ValueError: For a result that is not a finite number > 0 (NaN inputs, overflow), naming
            the inputs, or token counts out of range.
    """
    if image_seq_len < 1 or max_seq_len <= base_seq_len:
        raise ValueError(f"need image_seq_len >= 1 and max_seq_len > base_seq_len, got "
                         f"{image_seq_len}, {base_seq_len}, {max_seq_len}")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return _exp_shift(base_shift + slope * (image_seq_len - base_seq_len),
                      f"resolution_shift({image_seq_len}, base_shift={base_shift!r}, "
                      f"max_shift={max_shift!r})")


def _exp_shift(mu: float, what: str) -> float:
    # math.exp raises OverflowError above mu ~ 709 (and gives 0.0 below ~ -745): report inf.
    shift = mu if math.isnan(mu) else math.exp(mu) if mu < 709 else math.inf
    return check_shift(shift, f"{what}'s shift exp(mu)")


def empirical_shift(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's resolution- and step-dependent shift ``exp(mu)``, fitted by Black Forest Labs.

    ``mu`` is linear in the image token count ``n`` at 10 and at 200 sampling steps,
    ``mu_10 = 8.738e-5 n + 1.898`` and ``mu_200 = 1.6927e-4 n + 0.4567``, interpolated (and
    extrapolated) linearly in ``num_steps`` between them; above 4300 tokens ``mu = mu_200`` at
    any step count (``compute_empirical_mu`` in BFL's ``flux2/sampling.py`` and in diffusers'
    ``Flux2Pipeline``, which passes ``mu`` to ``FlowMatchEulerDiscreteScheduler.set_timesteps``).
    Like `resolution_shift` it is SD3's shift formula with ``shift = e^mu``: FLUX.2 at 1024 px
    (4096 tokens) and 50 steps has ``mu = 2.02``, shift 7.56.

    Args:
        image_seq_len: The image token count ``n``, >= 1.
        num_steps: The number of sampling steps, >= 1.

    Returns:
        The shift ``exp(mu)`` for `RectifiedFlow`.

    Raises:
        ValueError: For a shift that overflows, naming the inputs, or counts below 1.
    """
    if image_seq_len < 1 or num_steps < 1:
        raise ValueError(f"need image_seq_len >= 1 and num_steps >= 1, got {image_seq_len}, "
                         f"{num_steps}")
    mu_200 = 0.00016927 * image_seq_len + 0.45666666
    what = f"empirical_shift({image_seq_len}, {num_steps})"
    if image_seq_len > 4300:
        return _exp_shift(mu_200, what)
    mu_10 = 8.73809524e-05 * image_seq_len + 1.89833333
    return _exp_shift(mu_10 + (mu_200 - mu_10) * (num_steps - 10) / 190.0, what)


def _scaled_linear_betas(n: int) -> Tensor:
    # In float32, as diffusers computes them, so the default equals DDPMScheduler's table.
    return torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float32) ** 2


@dataclass(frozen=True, eq=False)
class VariancePreserving:
    """DDPM's VP schedule ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020).

    ``t`` is the integer training step 0..N-1 (0 = least noise); the table index runs the other
    way, ``t = N - 1 - index``, so that index 0 is the noisiest level like every schedule here.
    A zero ``abar`` at the noisiest step (zero terminal SNR, Lin et al. 2024) is allowed: there
    ``alpha = 0`` and an epsilon prediction determines no ``x0`` (conversions refuse it).
    Build one from a diffusers scheduler with :meth:`from_diffusers`.

    Attributes:
        alphas_cumprod: The table ``abar_t`` (N,) by training step t, 1-D with values in
            [0, 1); default Stable Diffusion 1.x/2.x's scaled-linear betas (N = 1000).
    """

    alphas_cumprod: Tensor = field(
        default_factory=lambda: torch.cumprod(1 - _scaled_linear_betas(1000), 0))

    def __post_init__(self) -> None:
        a = self.alphas_cumprod
        if a.ndim != 1 or not bool(((a >= 0) & (a < 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D tensor with values in [0, 1)")

    @property
    def num_steps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def __repr__(self) -> str:
        # The table's ends, not its 1000 entries: abar at the least and the most noisy step.
        a = self.alphas_cumprod
        return (f"VariancePreserving(num_steps={self.num_steps}, alphas_cumprod "
                f"{float(a[0]):.6g}..{float(a[-1]):.6g})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VariancePreserving) and torch.equal(
            self.alphas_cumprod.cpu(), other.alphas_cumprod.cpu())

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_diffusers(cls, scheduler: Any) -> VariancePreserving:
        """The schedule of a diffusers scheduler object or config, read from its ``alphas_cumprod``.

        A config (a scheduler's ``.config``, a ``scheduler_config.json`` dict) is instantiated as
        the diffusers class it names (``DDPMScheduler`` if it names none), so every
        ``beta_schedule`` (``linear``, ``scaled_linear``, cosine ``squaredcos_cap_v2``),
        ``rescale_betas_zero_snr`` and diffusers' own float32 arithmetic come out exactly as in
        diffusers. Flow-matching schedulers are refused: use :class:`RectifiedFlow`.

        Example:
            >>> from diffusers import DDIMScheduler
            >>> vp = VariancePreserving.from_diffusers(
            ...     DDIMScheduler(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True))
            >>> float(vp.alphas_cumprod[-1])  # zero terminal SNR: alpha = 0 at index 0
            0.0
        """
        if isinstance(scheduler, Mapping):
            scheduler = _scheduler_from_config(scheduler)
        table = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(table, Tensor):
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod table: it is not "
                             f"a variance-preserving scheduler{_FLOW_HINT}")
        return cls(alphas_cumprod=table.detach().to("cpu", torch.float32).clone())

    def timesteps(self, index: Tensor) -> Tensor:
        """Integer training step ``N - 1 - index`` as float32."""
        return (self.num_steps - 1 - _check_index(index, self.num_steps)).float()

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(sqrt(abar_t), sqrt(1 - abar_t))``; ``t`` must hold integer steps."""
        step = t.round().long()
        if not torch.equal(step.to(t.dtype), t):
            raise ValueError("VariancePreserving timesteps must be integer-valued")
        abar = self.alphas_cumprod.to(t.device)[_check_index(step, self.num_steps)]
        return abar.sqrt(), (1 - abar).sqrt()


_FLOW_HINT = ("; a flow-matching scheduler (FlowMatchEulerDiscreteScheduler, SD3/FLUX) is "
              "scoredistill.RectifiedFlow(shift=...)")


def _scheduler_from_config(config: Mapping[str, Any]) -> Any:
    """The diffusers scheduler a config names (``DDPMScheduler`` if none), built from it.

    ``scheduler.config`` holds no ``_class_name`` (a ``scheduler_config.json`` does): pass the
    scheduler object itself where the class matters (Euler's zero-SNR table ends at 2**-24).
    """
    import diffusers

    name = config.get("_class_name")
    if "FlowMatch" in str(name) or ("shift" in config and "beta_schedule" not in config):
        what = f"this {name} config" if name else "this config"
        raise ValueError(f"{what} is a flow-matching schedule, not a variance-preserving "
                         f"one{_FLOW_HINT}")
    cls = getattr(diffusers, str(name or "DDPMScheduler"), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"diffusers has no scheduler class {name!r} (the config's _class_name)")
    return cls.from_config(dict(config))


def index_alpha_sigma(schedule: Any, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(t, alpha, sigma)`` at schedule indices, each float32 of ``index``'s shape."""
    t = schedule.timesteps(index)
    alpha, sigma = schedule.alpha_sigma(t)
    return t, alpha, sigma
