"""A natural-patch super-resolution problem with an exact teacher and an exact posterior.

A full-covariance Gaussian mixture is fitted by EM to 8x8 patches (grey, 64-D, or colour,
192-D) of the photographs bundled with scikit-image; it *is* the HQ distribution: HQ samples are
drawn from it, so the teacher (:class:`~scoredistill.analytic.FullGaussianMixture`) is exact.
LQ is a ``factor``-times average pool plus Gaussian noise, so the posterior ``p(x_HQ | y_LQ)``
is a Gaussian mixture known in closed form
(:class:`~scoredistill.posterior.LinearGaussianPosterior`).
Fitted mixtures are cached as safetensors in a temporary folder; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .analytic import FullGaussianMixture
from .atomic import save_safetensors
from .em import fit_full_mixture
from .posterior import LinearGaussianPosterior, PosteriorTeacher, lq_condition
from .protocols import Prediction

# Photographs shipped inside scikit-image's wheel (skimage/data/), read from disk, never fetched.
COLOUR_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
GREY_PHOTOS = ("camera.png", "coins.png", "moon.png")


def bundled_photos(colour: bool) -> list[Tensor]:
    """The bundled photos as float64 tensors in [0, 1]: (C, H, W), C = 3 or 1 (luminance)."""
    import skimage.data
    from skimage import color, io

    folder = Path(skimage.data.__file__).parent
    names = COLOUR_PHOTOS if colour else COLOUR_PHOTOS + GREY_PHOTOS
    photos = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not in this scikit-image install (it ships "
                                    f"{', '.join(COLOUR_PHOTOS + GREY_PHOTOS)})")
        img = torch.from_numpy(io.imread(path)).double() / 255.0
        if img.ndim == 3:
            img = img[..., :3]
            if not colour:
                img = torch.from_numpy(color.rgb2gray(img.numpy()))
        img = img if img.ndim == 3 else img[..., None]
        photos.append(img.permute(2, 0, 1).contiguous())
    return photos


def random_patches(photos: list[Tensor], n: int, size: int, seed: int) -> Tensor:
    """``n`` patches (n, C * size * size) at uniform positions, the same number per photo."""
    g = torch.Generator().manual_seed(seed)
    per = -(-n // len(photos))
    out = []
    for img in photos:
        _, h, w = img.shape
        ys = torch.randint(0, h - size + 1, (per,), generator=g)
        xs = torch.randint(0, w - size + 1, (per,), generator=g)
        idx = torch.arange(size)
        rows, cols = (ys[:, None] + idx)[:, :, None], (xs[:, None] + idx)[:, None, :]
        out.append(img[:, rows, cols].permute(1, 0, 2, 3).flatten(1))  # (per, C*size*size)
    return torch.cat(out)[torch.randperm(per * len(photos), generator=g)[:n]]


def average_pool_operator(size: int, factor: int, channels: int) -> Tensor:
    """The (C (size/f)^2, C size^2) matrix of a ``factor``-times average pool per channel."""
    if size % factor:
        raise ValueError(f"patch size {size} is not a multiple of the factor {factor}")
    pool = torch.kron(torch.eye(size // factor), torch.full((1, factor), 1.0 / factor))
    return torch.kron(torch.eye(channels), torch.kron(pool, pool)).double()


@dataclass(eq=False)
class PatchSR:
    """HQ 8x8 patches ``x ~`` a fitted mixture; LQ ``y = pool(x) + noise_std * n``.

    Patches are standardised (one scalar mean and std over all pixels). ``teacher`` is the
    exact float32 ScoreModel (flow prediction, rectified flow), ``prior`` the same mixture in
    float64 and ``posterior`` the exact ``p(x | y)``. Same interface as
    :class:`~scoredistill.toy.ToySR`: ``dim``, ``operator``, ``teacher``, ``sample``, ``cond``,
    ``conditional_teacher``.
    """

    colour: bool = False
    components: int = 32
    factor: int = 2
    noise_std: float = 0.1
    size: int = 8
    fit_patches: int = 40_000
    em_iters: int = 40
    reg: float = 1e-3
    seed: int = 0
    cache_dir: Path | None = None
    prior: FullGaussianMixture = field(init=False)
    teacher: FullGaussianMixture = field(init=False)
    operator: Tensor = field(init=False)
    posterior: LinearGaussianPosterior = field(init=False)
    pixel_mean: float = field(init=False)
    pixel_std: float = field(init=False)

    def __post_init__(self) -> None:
        tensors, self.pixel_mean, self.pixel_std = self._load_or_fit()
        self.prior = FullGaussianMixture(tensors["means"], tensors["covs"], tensors["weights"])
        self.teacher = FullGaussianMixture(*(tensors[k].float()
                                             for k in ("means", "covs", "weights")))
        channels = 3 if self.colour else 1
        self.operator = average_pool_operator(self.size, self.factor, channels).float()
        self.posterior = LinearGaussianPosterior(self.prior, self.operator.double(),
                                                 self.noise_std)

    @property
    def dim(self) -> int:
        return self.prior.dim

    @property
    def channels(self) -> int:
        return 3 if self.colour else 1

    def _fit_key(self) -> str:
        keys = ("colour", "components", "size", "fit_patches", "em_iters", "reg", "seed")
        spec = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(spec.encode()).hexdigest()[:16]

    def _load_or_fit(self) -> tuple[dict[str, Tensor], float, float]:
        from safetensors.torch import load_file

        folder = self.cache_dir or Path(tempfile.gettempdir()) / "scoredistill-patches"
        path = folder / f"gmm-{self._fit_key()}.safetensors"
        if path.is_file():
            t = load_file(path)
            return t, float(t["pixel_mean"]), float(t["pixel_std"])
        raw = random_patches(bundled_photos(self.colour), self.fit_patches, self.size, self.seed)
        mean, std = float(raw.mean()), float(raw.std())
        gm = fit_full_mixture(((raw - mean) / std).float(), self.components, iters=self.em_iters,
                              reg=self.reg, seed=self.seed)
        t = {"means": gm.means, "covs": gm.covs, "weights": gm.weights,
             "pixel_mean": torch.tensor(mean), "pixel_std": torch.tensor(std)}
        save_safetensors(t, path)  # atomic: a concurrent reader never sees half a file
        return t, mean, std

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Paired float32 ``(hq (n, D), lq (n, d))``: exact prior samples and their LQ."""
        hq = self.prior.sample(n, generator).float()
        lq = hq @ self.operator.T + self.noise_std * torch.randn(
            n, self.operator.shape[0], generator=generator)
        return hq, lq

    def cond(self, lq: Tensor) -> Tensor:
        """The condition ``(lq, 1)`` (B, d + 1) of `conditional_teacher`; the null one is zeros."""
        return lq_condition(lq)

    def conditional_teacher(self, prediction: Prediction = "flow") -> PosteriorTeacher:
        """The exact float32 teacher of ``p(x_HQ | y_LQ)`` (CSD's conditional teacher)."""
        return PosteriorTeacher(LinearGaussianPosterior(self.teacher, self.operator,
                                                        self.noise_std), prediction=prediction)

    def to_images(self, x: Tensor) -> Tensor:
        """Standardised patches (n, D) to pixel values (n, C, size, size), clipped to [0, 1]."""
        img = x.double() * self.pixel_std + self.pixel_mean
        return img.reshape(-1, self.channels, self.size, self.size).clamp(0, 1)
