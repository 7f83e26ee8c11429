"""crossdistill: one-step Students from Teachers in another latent space (Cross-Space Distillation)."""

__version__ = "0.1.0"
