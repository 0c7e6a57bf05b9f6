"""One-step super-resolution (TSD-SR) for use after ``pip install scoredistill[sr]``: model
loading, tiled transformer and VAE, colour fix and image I/O.

Kept out of ``import scoredistill``: these modules import diffusers, peft and Pillow.
"""
