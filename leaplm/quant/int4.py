"""4-bit weight projections on CPU: leaplm's own int4 GEMM (``leaplm_native::int4_linear``, C++).

Why our own kernel: torch's int4 weight-only aten kernels were slower than fp32 on the CPUs we measured
(../shared/notes/cpu-kernels.md) and fbgemm has no 4-bit dynamic linear; at batch 1 a decode step reads
every weight once, so half the bytes of int8 is the point.

Format (as GGUF's Q4_1): groups of 32 input columns per output row, ``w = q * scale + minv`` with
``q`` in 0..15, ``scale = (max - min) / 15`` and ``minv = min`` of the group (round to nearest). A
Q4_1 tensor dequantized by the loader is thus re-encoded with the same grid, up to float rounding.
Storage (``pack_int4``): outputs in blocks of 16, ``qweight [out_p / 16, in_p / 32, 256]`` uint8 and
``scale, minv [out_p / 16, in_p / 32, 16]`` float16 (``in_p``, ``out_p``: rounded up to 32 and 16 with
zeros), the layout the kernel reads 16 outputs at a time from (see ``native/decode_ops.cpp``).

Activations are quantized to int8 per row and group of 32 inside the kernel (``xs = max|x| / 127``), so
a row's result never depends on the other rows: verification passes reproduce single-token decoding
bit for bit, as for int8. Without the native ops (no C++ compiler) the module multiplies by the
dequantized weight in float32 — correct, slow, and warned about once.

Shapes: ``x [..., in] -> y [..., out]`` float32.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .linear import QuantizedLinear

GROUP = 32
BLOCK = 16   # outputs per packed block
_warned: list[bool] = []


def quantize_weight_int4(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``weight [out, in]`` -> (``q [out, in_p / 32, 32]`` uint8 in 0..15, ``scale``, ``minv`` ``[out, in_p / 32]``
    float16):
    round to nearest on each group's own min..max grid (``w ~ q * scale + minv``)."""
    w = weight.detach().float()
    out_f, in_f = w.shape
    pad = -in_f % GROUP
    if pad:
        w = F.pad(w, (0, pad))
    g = w.view(out_f, -1, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15.0).half()   # float16, as GGUF's Q4_1 stores them; q is rounded on that grid
    lo = lo.half()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
    q = torch.round((g - lo.float()[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8)
    return q, scale, lo


def pack_int4(q: Tensor, scale: Tensor, minv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's layout (native/decode_ops.cpp): outputs in blocks of 16 (zero rows pad the last one).
    ``qweight [B, G, 256]`` bytes ``[i 0..3][output 0..15][t 0..3]`` = ``q[o, 4i + t] | q[o, 4(i + 4) + t] << 4``;
    ``scale, minv [B, G, 16]``."""
    out_f, G, _ = q.shape
    pad = -out_f % BLOCK
    if pad:
        q, scale, minv = F.pad(q, (0, 0, 0, 0, 0, pad)), F.pad(scale, (0, 0, 0, pad)), F.pad(minv, (0, 0, 0, pad))
    B = q.shape[0] // BLOCK
    quads = q.view(B, BLOCK, G, 8, 4)
    packed = quads[:, :, :, :4] | (quads[:, :, :, 4:] << 4)                # [B, 16, G, 4, 4]
    qweight = packed.permute(0, 2, 3, 1, 4).reshape(B, G, BLOCK * GROUP // 2).contiguous()

    def blocked(t: Tensor) -> Tensor:
        return t.view(B, BLOCK, G).transpose(1, 2).contiguous()

    return qweight, blocked(scale), blocked(minv)


def unpack_int4(qweight: Tensor, out_features: int) -> Tensor:
    """``pack_int4``'s ``qweight`` -> ``q [out, G, 32]`` uint8."""
    B, G, _ = qweight.shape
    packed = qweight.view(B, G, 4, BLOCK, 4).permute(0, 3, 1, 2, 4)          # [B, 16, G, 4, 4]
    quads = torch.cat([packed & 0x0F, packed >> 4], dim=3)                 # [B, 16, G, 8, 4]
    return quads.reshape(B * BLOCK, G, GROUP)[:out_features]


class Int4Linear(QuantizedLinear):
    """``y = x @ W.T (+ b)`` with 4-bit ``W`` (see the module docstring); built by ``from_weight``."""

    def __init__(self, qweight: Tensor, scale: Tensor, minv: Tensor, in_features: int, out_features: int,
                 bias: Tensor | None) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("minv", minv)
        from .. import native

        self.native = native.load()
        if not self.native and not _warned:
            _warned.append(True)
            warnings.warn("int4 weights run through a float fallback (leaplm's native CPU ops did not build): "
                          "correct but slower than int8", RuntimeWarning, stacklevel=3)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None) -> "Int4Linear":
        out_f, in_f = weight.shape
        qweight, scale, minv = pack_int4(*quantize_weight_int4(weight))
        b = None if bias is None else bias.detach().float().clone()
        return cls(qweight, scale, minv, in_f, out_f, b)

    def dequantized_weight(self) -> Tensor:
        """The float ``[out, in]`` weight this module multiplies by (for tests and references)."""
        q = unpack_int4(self.qweight, self.out_features).float()              # [out, G, 32]
        G = q.shape[1]

        def rows(t: Tensor) -> Tensor:
            return t.transpose(1, 2).reshape(-1, G)[: self.out_features, :, None]

        w = q * rows(self.scale.float()) + rows(self.minv.float())
        return w.reshape(self.out_features, -1)[:, : self.in_features]

    def _weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.minv))

    def _matmul(self, x: Tensor) -> Tensor:
        if not self.native:
            return x @ self.dequantized_weight().T
        pad = self.qweight.shape[1] * GROUP - self.in_features
        if pad:
            x = F.pad(x, (0, pad))
        return torch.ops.leaplm_native.int4_linear(x, self.qweight, self.scale, self.minv, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 groups of {GROUP}, bias={self.bias is not None}"
