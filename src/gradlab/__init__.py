"""gradlab: train real models with Lightning + Hydra, and see their gradients."""

__version__ = "0.1.0"
