"""The array operations the sampler spells differently in numpy and torch, one namespace each.

A language samples with numpy (the canonical stream, on the host) or with torch on a device
(``data.sampler: device``). Primitives and the mixture are written once: indexing, masks,
comparisons, ``.any(axis=)``, ``.sum(axis=)`` and ``.clip`` mean the same on both, and what
differs (creating arrays, ``where`` with scalars, a copy, the first true entry of a row) goes
through the namespace of the arrays at hand, ``arrays_of(tokens)``. Integers are int64 and
reals float64 on both, so log p is exact on the device too.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported only when a device sampler is made: the CLI's light
    import torch  # commands (help, language) load the language without it

Array = Any  # np.ndarray | torch.Tensor


class NumpyArrays:
    """numpy, on the host: the canonical sampler."""

    on_device = False
    int64, bool, float64 = np.int64, np.bool_, np.float64

    def arange(self, n: int) -> np.ndarray:
        return np.arange(n)

    def full(self, shape: Any, value: Any, dtype: Any = np.int64) -> np.ndarray:
        return np.full(shape, value, dtype=dtype)

    def zeros(self, shape: Any, dtype: Any = np.float64) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def where(self, condition: np.ndarray, a: Any, b: Any) -> np.ndarray:
        return np.where(condition, a, b)

    def copy(self, x: np.ndarray) -> np.ndarray:
        return x.copy()

    def first_true(self, holds: np.ndarray) -> np.ndarray:
        """(n, k) bool -> (n,) the first true column of each row (0 where none is)."""
        return holds.argmax(axis=1)

    def as_float(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64)

    def cumsum(self, x: np.ndarray, axis: int) -> np.ndarray:
        return np.cumsum(x, axis=axis)

    def log(self, x: np.ndarray) -> np.ndarray:
        return np.log(x)

    def softmax_rows(self, x: np.ndarray) -> np.ndarray:
        """(n, m) -> each row's softmax, stable for rows of large negative numbers."""
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


class TorchArrays:
    """torch on one device: the device sampler."""

    on_device = True

    def __init__(self, device: torch.device):
        import torch

        self.torch, self.device = torch, device
        self.int64, self.bool, self.float64 = torch.int64, torch.bool, torch.float64

    def arange(self, n: int) -> torch.Tensor:
        return self.torch.arange(n, device=self.device)

    def full(self, shape: Any, value: Any, dtype: Any = None) -> torch.Tensor:
        shape = shape if isinstance(shape, tuple) else (shape,)
        return self.torch.full(shape, value, dtype=dtype or self.int64, device=self.device)

    def zeros(self, shape: Any, dtype: Any = None) -> torch.Tensor:
        return self.torch.zeros(shape, dtype=dtype or self.float64, device=self.device)

    def where(self, condition: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
        tensor = self.torch.Tensor
        if not isinstance(a, tensor) and not isinstance(b, tensor):  # two scalars: numpy's dtypes
            dtype = self.torch.float64 if isinstance(a, float) or isinstance(b, float) else self.torch.int64
            a = self.torch.full((), a, dtype=dtype, device=self.device)  # a fill: no copy from the host
        return self.torch.where(condition, a, b)

    def copy(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def first_true(self, holds: torch.Tensor) -> torch.Tensor:
        """(n, k) bool -> (n,) the first true column of each row (0 where none is)."""
        return holds.to(self.torch.uint8).argmax(dim=1)  # argmax returns the first maximum

    def as_float(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.torch.float64)

    def cumsum(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return self.torch.cumsum(x, dim=axis)

    def log(self, x: torch.Tensor) -> torch.Tensor:
        return self.torch.log(x)

    def softmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        return self.torch.softmax(x, dim=1)

    def convert(self, x: np.ndarray) -> torch.Tensor:
        """A primitive's table on this device (float64 and int64 kept)."""
        return self.torch.as_tensor(np.ascontiguousarray(x), device=self.device)


NUMPY = NumpyArrays()


@cache
def torch_arrays(device: torch.device) -> TorchArrays:
    return TorchArrays(device)


def arrays_of(x: Array) -> NumpyArrays | TorchArrays:
    """The namespace of ``x``: numpy for an ndarray, torch on x's device for a tensor (torch
    is loaded by then)."""
    return NUMPY if isinstance(x, np.ndarray) else torch_arrays(x.device)
