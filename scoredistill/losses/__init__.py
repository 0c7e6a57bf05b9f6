"""Score-distillation losses (SDS, VSD, TSM, TSD) and the fake-score diffusion loss."""
