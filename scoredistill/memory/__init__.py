"""Plan a step's memory and time before renting a GPU: peak by category and module, FLOPs, and
compute floors, traced on fake tensors at real backbone sizes (no GPU, no memory)."""

from .backbones import SPECS, BackboneSpec, read_spec
from .gpus import GPU, GPUS, floor_seconds
from .steps import SRRun, TrainOptions, measure_sr, measure_train, plan_sr, plan_train
from .trace import Allocated, Plan, allocated_peak, trace

__all__ = [
           "GPU",
           "GPUS",
           "SPECS",
           "Allocated",
           "BackboneSpec",
           "Plan",
           "SRRun",
           "TrainOptions",
           "allocated_peak",
           "floor_seconds",
           "measure_sr",
           "measure_train",
           "plan_sr",
           "plan_train",
           "read_spec",
           "trace",
]
