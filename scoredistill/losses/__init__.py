"""Score-distillation losses (SDS, VSD, TSM, TSD, DMD, CSD, SiD, SIM) and the diffusion loss."""
