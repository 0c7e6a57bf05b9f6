"""scoredistill: score-distillation losses and samplers for one-step diffusion generators."""

from .analytic import FullGaussianMixture, GaussianMixture
from .batching import Rider, predict_batched, predict_features, riding
from .features import FeatureLayer, feature_layer
from .guidance import CFG
from .heads import DiscriminatorHead
from .losses.adversarial import (
    GANHeadLoss,
    GANTerm,
    HeadOutput,
    gan_discriminator_loss,
    gan_generator_loss,
)
from .losses.decoupled import DecoupledDMDLoss
from .losses.diffusion import DiffusionLoss, DiffusionOutput
from .losses.distill import (
    DistillOutput,
    ScoreDistillationLoss,
    SDSLoss,
    TSDLoss,
    TSMLoss,
    VSDLoss,
    trajectory_directions,
)
from .losses.implicit import SiDLoss, SIMLoss
from .losses.matching import AdversarialOutput, CSDLoss, DMDLoss, FDistillLoss
from .losses.surrogate import surrogate_loss
from .losses.weighting import (
    distill_weighting,
    dmd_normalizer,
    f_distill_weight,
    sample_weighting,
    sd3_loss_weight,
)
from .one_step import one_step
from .parametrization import convert, ddim_step, from_x0_eps, to_x0_eps
from .protocols import Cond, NoiseSchedule, Prediction, ScoreModel
from .samplers.dasm import DASMSampler
from .samplers.timesteps import IndexSampler, LogitNormalIndex, ModeIndex, UniformIndex
from .schedules import (
    RectifiedFlow,
    VariancePreserving,
    empirical_shift,
    index_alpha_sigma,
    resolution_shift,
)

__all__ = [
    "CFG",
    "AdversarialOutput",
    "CSDLoss",
    "Cond",
    "DASMSampler",
    "DMDLoss",
    "DecoupledDMDLoss",
    "DiffusionLoss",
    "DiffusionOutput",
    "DiscriminatorHead",
    "DistillOutput",
    "FDistillLoss",
    "FeatureLayer",
    "FullGaussianMixture",
    "GANHeadLoss",
    "GANTerm",
    "GaussianMixture",
    "HeadOutput",
    "IndexSampler",
    "LogitNormalIndex",
    "ModeIndex",
    "NoiseSchedule",
    "Prediction",
    "RectifiedFlow",
    "Rider",
    "SDSLoss",
    "SIMLoss",
    "ScoreDistillationLoss",
    "ScoreModel",
    "SiDLoss",
    "TSDLoss",
    "TSMLoss",
    "UniformIndex",
    "VSDLoss",
    "VariancePreserving",
    "convert",
    "ddim_step",
    "distill_weighting",
    "dmd_normalizer",
    "empirical_shift",
    "f_distill_weight",
    "feature_layer",
    "from_x0_eps",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "index_alpha_sigma",
    "one_step",
    "predict_batched",
    "predict_features",
    "resolution_shift",
    "riding",
    "sample_weighting",
    "sd3_loss_weight",
    "surrogate_loss",
    "to_x0_eps",
    "trajectory_directions",
]
