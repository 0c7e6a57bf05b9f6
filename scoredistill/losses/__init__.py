"""Score-distillation losses (SDS, VSD, TSM, TSD, DMD, CSD) and the fake-score diffusion loss."""
