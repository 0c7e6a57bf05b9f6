"""One-step super-resolution (TSD-SR) for use after ``pip install scoredistill[sr]``: the
pipeline, model loading and model folders, tiled transformer and VAE, colour fix, image
conversion and I/O, and the ``scoredistill-sr`` command.

Kept out of ``import scoredistill``: these modules use diffusers, peft and Pillow.
"""

from .loading import Backbone, SRModel, load_model, load_sd3
from .pipeline import SROptions, TSDSROutput, TSDSRPipeline
from .tiling import TileConfig
from .timing import StageTimer

__all__ = ["Backbone", "SRModel", "SROptions", "StageTimer", "TSDSROutput", "TSDSRPipeline",
           "TileConfig", "load_model", "load_sd3"]
