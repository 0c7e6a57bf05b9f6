"""Timestep samplers and the DASM trajectory."""
