"""Training dynamics of tensor-transformers on toy languages with known ground truth."""

__version__ = "0.1.0"
