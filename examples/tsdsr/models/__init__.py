"""The recipe's backbones: the embedded tiny SD3-shaped models and their pre-fitting."""
