"""The frame the quantized projections share (``Int8Linear``, ``Int4Linear``): ``x [..., in] -> y [..., out]``
float32, ``y = x @ W.T (+ b)``. A subclass gives the matmul of the flattened rows and its weight format."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class QuantizedLinear(nn.Module):
    """Subclasses implement ``_matmul(x [M, in] float32) -> [M, out]``, ``dequantized_weight()`` (the float
    ``[out, in]`` weight it multiplies by) and ``_weight_bytes()`` (bytes of weight and scales a pass reads)."""

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = bias

    def _matmul(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _weight_bytes(self) -> int:
        raise NotImplementedError

    def dequantized_weight(self) -> Tensor:
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes one pass reads: the weight in its format, its scales, and a float32 bias."""
        return self._weight_bytes() + (0 if self.bias is None else 4 * self.bias.numel())

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {shape[-1]} features, the weight takes {self.in_features}")
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        y = self._matmul(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)
