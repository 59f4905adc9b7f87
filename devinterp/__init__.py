"""Training dynamics of tensor-transformers on toy languages with known ground truth."""

from devinterp.threads import quiet_openmp

quiet_openmp()  # before anything imports torch: OpenMP reads its wait policy once, when it loads

__version__ = "0.1.0"
