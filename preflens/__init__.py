"""preflens: why preference learning behaves as it does, measured on TransformerLens models."""

__version__ = "0.1.0"
