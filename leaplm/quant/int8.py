"""Int8 weight projections on CPU via fbgemm's dynamic int8 GEMM (``quantized::linear_dynamic``).

Why this kernel: on the AVX2 CPUs we measured (../shared/notes/cpu-kernels.md) it reads 4x fewer
weight bytes than fp32 and runs a batch-1 mat-vec 7-9x faster, and 5 rows cost only 1.2-1.7x one
row, which is what makes speculative verification pay. torch's int8/int4 weight-only aten kernels
were slower than fp32 here.

Weights: symmetric per-output-channel int8, ``scale[o] = max|W[o, :]| / 127``.

Activations: fbgemm quantizes its input with ONE asymmetric range over the whole ``[M, K]`` input,
so a row's result would depend on the other rows in the call — a verification pass of 6 tokens
would not reproduce single-token decoding, and speculation would change greedy output. We make
every row independent (bit-identical whatever the batch): each row is divided by its own
``max|x|`` and two sentinel columns ``+1, -1`` are appended (their weight columns are zero), so
every call sees the range exactly ``[-1, 1]``; the output is multiplied back by ``max|x|``.
That is per-token activation quantization with a fixed grid, at the price of two columns.

Shapes: ``x [..., in] -> y [..., out]`` float32.
"""
from __future__ import annotations

import warnings
import weakref

import torch
from torch import Tensor, nn

# Full 8-bit activations: on SmolLM2 7-bit (fbgemm's x86 default, against int16 saturation) raised
# perplexity 35.1 -> 40.8, 8-bit only to 36.9 (fp32 35.1), measured on Spec-Bench prompts.
REDUCE_RANGE = False


# ``leaplm::int8_linear``: how the compiled decode step (models/compiled.py) calls fbgemm — a packed
# weight is a TorchScript object that dynamo cannot trace, so the graph passes a handle instead.
_lib = torch.library.Library("leaplm", "FRAGMENT")
_lib.define("int8_linear(Tensor x, int handle, int out_features) -> Tensor")
_modules: dict[int, weakref.ref] = {}   # handle -> Int8Linear (dropped with the module)
_next_handle = 0


def _register(module: "Int8Linear") -> int:
    global _next_handle
    handle, _next_handle = _next_handle, _next_handle + 1
    _modules[handle] = weakref.ref(module, lambda _, h=handle: _modules.pop(h, None))
    return handle


def _int8_linear(x: Tensor, handle: int, out_features: int) -> Tensor:
    """``x [M, in + 2]`` (scaled rows with the sentinel columns) -> ``[M, out]`` float32."""
    return torch.ops.quantized.linear_dynamic(x.contiguous(), _modules[handle]().packed, REDUCE_RANGE)


@torch.library.register_fake("leaplm::int8_linear", lib=_lib)
def _int8_linear_shape(x: Tensor, handle: int, out_features: int) -> Tensor:
    return x.new_empty(x.shape[0], out_features)


_lib.impl("int8_linear", _int8_linear, "CPU")


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``weight [out, in]`` float -> (int8 ``[out, in]``, float32 scales ``[out]``), symmetric per row."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """``y = x @ W.T (+ b)`` with int8 ``W``; built by ``from_weight``. Batch-invariant per row."""

    def __init__(self, packed, in_features: int, out_features: int, bias: Tensor | None) -> None:
        super().__init__()
        self.packed = packed
        self.in_features, self.out_features = in_features, out_features
        self.bias = bias
        self._buffers_by_rows: dict[int, Tensor] = {}
        self.handle = _register(self)   # how the compiled step's ``leaplm::int8_linear`` finds ``packed``
        self.native_handle: int | None = None   # the same for ``leaplm_native::int8_linear`` (bind_native)

    def bind_native(self) -> None:
        """Register ``packed`` with the native ops (``leaplm.native``, loaded); the compiled step then
        calls ``leaplm_native::int8_linear`` (C++) instead of the Python op. Released with the module."""
        if self.native_handle is None:
            self.native_handle = torch.ops.leaplm_native.int8_bind(self.packed)
            weakref.finalize(self, torch.ops.leaplm_native.int8_release, self.native_handle)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None) -> "Int8Linear":
        out_f, in_f = weight.shape
        q, scale = quantize_weight(weight)
        q = torch.cat([q, torch.zeros(out_f, 2, dtype=torch.int8)], dim=1)  # sentinel columns
        with warnings.catch_warnings():  # torch deprecates quantized tensors; fbgemm's packing still needs one
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(out_f, dtype=torch.long), 0)
            packed = torch.ops.quantized.linear_prepack(qw, None)
        b = None if bias is None else bias.detach().float().clone()
        return cls(packed, in_f, out_f, b)

    def dequantized_weight(self) -> Tensor:
        """The float ``[out, in]`` weight this module multiplies by (for tests and references)."""
        w, _ = torch.ops.quantized.linear_unpack(self.packed)
        return w.dequantize()[:, : self.in_features]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if torch.compiler.is_compiling():   # the same arithmetic as a graph: fused, no buffers
            amax = x2.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
            sentinels = torch.tensor([[1.0, -1.0]], device=x2.device).expand(x2.shape[0], 2)
            scaled = torch.cat([x2 / amax, sentinels], dim=1)
            if self.native_handle is not None:
                y = torch.ops.leaplm_native.int8_linear(scaled, self.native_handle, self.out_features) * amax
            else:
                y = torch.ops.leaplm.int8_linear(scaled, self.handle, self.out_features) * amax
            y = y if self.bias is None else y + self.bias
            return y.reshape(*shape[:-1], self.out_features)
        amax = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)  # (vector_norm(inf) is 7x slower here)
        buf = self._input_buffer(x2.shape[0])
        torch.div(x2, amax, out=buf[:, : self.in_features])
        y = torch.ops.quantized.linear_dynamic(buf, self.packed, REDUCE_RANGE).mul_(amax)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def _input_buffer(self, rows: int) -> Tensor:
        """``[rows, in + 2]`` with the sentinel columns set; kept for decode-sized inputs (eager torch
        spends ~8 us per op here, so fewer ops per call matter at batch 1)."""
        buf = self._buffers_by_rows.get(rows) if rows <= 64 else None
        if buf is None:
            buf = torch.empty(rows, self.in_features + 2)
            buf[:, -2], buf[:, -1] = 1.0, -1.0
            if rows <= 64:
                self._buffers_by_rows[rows] = buf
        return buf

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel, bias={self.bias is not None}"
