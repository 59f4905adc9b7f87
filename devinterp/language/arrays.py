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
from typing import Any

import numpy as np
import torch

Array = np.ndarray | torch.Tensor


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

    def stack(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.stack(arrays)

    def convert(self, x: np.ndarray) -> np.ndarray:
        return x


class TorchArrays:
    """torch on one device: the device sampler."""

    on_device = True
    int64, bool, float64 = torch.int64, torch.bool, torch.float64

    def __init__(self, device: torch.device):
        self.device = device

    def arange(self, n: int) -> torch.Tensor:
        return torch.arange(n, device=self.device)

    def full(self, shape: Any, value: Any, dtype: Any = torch.int64) -> torch.Tensor:
        return torch.full(
            shape if isinstance(shape, tuple) else (shape,), value, dtype=dtype, device=self.device
        )

    def zeros(self, shape: Any, dtype: Any = torch.float64) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def where(self, condition: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):  # keep numpy's dtypes
            dtype = torch.float64 if isinstance(a, float) or isinstance(b, float) else torch.int64
            a = torch.full((), a, dtype=dtype, device=self.device)  # a fill: no copy from the host
        return torch.where(condition, a, b)

    def copy(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def first_true(self, holds: torch.Tensor) -> torch.Tensor:
        """(n, k) bool -> (n,) the first true column of each row (0 where none is)."""
        return holds.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximum

    def as_float(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float64)

    def cumsum(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return torch.cumsum(x, dim=axis)

    def log(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)

    def stack(self, arrays: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(arrays)

    def convert(self, x: np.ndarray) -> torch.Tensor:
        """A primitive's table on this device (float64 and int64 kept)."""
        return torch.as_tensor(np.ascontiguousarray(x), device=self.device)


NUMPY = NumpyArrays()


@cache
def torch_arrays(device: torch.device) -> TorchArrays:
    return TorchArrays(device)


def arrays_of(x: Array) -> NumpyArrays | TorchArrays:
    """The namespace of ``x``: numpy for an ndarray, torch on x's device for a tensor."""
    return NUMPY if isinstance(x, np.ndarray) else torch_arrays(x.device)
