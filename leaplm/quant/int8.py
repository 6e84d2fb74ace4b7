"""Int8 weight projections on CPU: leaplm's own VNNI int8 GEMM (``leaplm_native::int8_linear``, C++),
with fbgemm's dynamic int8 GEMM (``quantized::linear_dynamic``) as the fallback where the native ops
cannot be built.

Why our own kernel: fbgemm was the fastest library path measured (../shared/notes/cpu-kernels.md: 7-9x
fp32 at batch 1), but on this AVX-512 VNNI CPU leaplm's kernel runs SmolLM2's projections 3-5x faster
than fbgemm at 1 row and ~1.8x at 16 rows (``docs/benchmarks.md``, session 7): one VNNI step advances
16 outputs by 4 inputs from a block-packed weight, with no per-call packing of the activations.

Weights: symmetric per-output-channel int8, ``scale[o] = max|W[o, :]| / 127``. Native layout
(``pack_int8``): ``qweight [out_p / 16, in_p / 4, 64]`` int8 (``[output 0..15][t 0..3]`` per quad of
inputs; ``in_p`` rounded up to 64, ``out_p`` to 16), ``wscale [out_p]`` float32 and
``comp [out_p] = 128 * sum_k q[o, k]`` int32. 16 quads of one block are exactly an AMX weight tile
(16 x 64 bytes), so on CPUs with AMX the kernel multiplies passes of 2+ rows in tiles (1.1x the VNNI
loop at 2 rows, 1.7x at 16 on SmolLM2's projections streamed from memory, 2x at 256) — the same
integer sums, the same bits.

Activations: quantized per row, ``xq = round(x / xs)``, ``xs = max|x| / 127`` (native), so a row's result
never depends on the other rows: a verification pass of 6 tokens reproduces single-token decoding bit for
bit and speculation stays exact. fbgemm instead quantizes with ONE asymmetric range over the whole
``[M, K]`` input; the fallback makes it per row too: each row is divided by its own ``max|x|`` and two
sentinel columns ``+1, -1`` are appended (zero weight columns), so every call sees the range exactly
``[-1, 1]``; the output is multiplied back by ``max|x|``.

Shapes: ``x [..., in] -> y [..., out]`` float32.
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from .linear import QuantizedLinear

BLOCK = 16   # outputs per packed block (native layout)

# Full 8-bit activations: on SmolLM2 7-bit (fbgemm's x86 default, against int16 saturation) raised
# perplexity 35.1 -> 40.8, 8-bit only to 36.9 (fp32 35.1), measured on Spec-Bench prompts.
REDUCE_RANGE = False


# ``leaplm::int8_linear``: how a compiled decode step (models/compiled.py) calls the fbgemm fallback — a packed
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
    w = weight.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], _ROWS):   # in row chunks: float temporaries of a chunk, not of a whole LM head
        rows = w[r: r + _ROWS].float()
        s = (rows.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        q[r: r + _ROWS] = torch.round(rows / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[r: r + _ROWS] = s
    return q, scale


_ROWS = 4096   # quantize_weight's chunk


def pack_int8(q: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The native kernel's layout (native/decode_ops.cpp): ``q [out, in]`` int8, ``scale [out]`` ->
    ``qweight [out_p / 16, in_p / 4, 64]``, ``wscale [out_p]``, ``comp [out_p]`` (zero padding)."""
    out_f, in_f = q.shape
    q = F.pad(q, (0, -in_f % 64, 0, -out_f % BLOCK))   # inputs to whole AMX tiles (64), outputs to blocks
    B, K4 = q.shape[0] // BLOCK, q.shape[1] // 4
    qweight = q.view(B, BLOCK, K4, 4).permute(0, 2, 1, 3).reshape(B, K4, BLOCK * 4).contiguous()
    comp = 128 * q.sum(1, dtype=torch.int32)
    return qweight, F.pad(scale.float(), (0, -out_f % BLOCK)).contiguous(), comp


def unpack_int8(qweight: Tensor, out_features: int, in_features: int) -> Tensor:
    """``pack_int8``'s ``qweight`` -> ``q [out, in]`` int8."""
    B, K4, _ = qweight.shape
    return qweight.view(B, K4, BLOCK, 4).permute(0, 2, 1, 3).reshape(B * BLOCK, K4 * 4)[:out_features, :in_features]


class Int8Linear(QuantizedLinear):
    """``y = x @ W.T (+ b)`` with int8 ``W``; built by ``from_weight``. Batch-invariant per row.

    ``native``: the weight is in ``pack_int8``'s layout for ``leaplm_native::int8_linear``; otherwise
    (no C++ compiler) it is an fbgemm packed weight with the sentinel columns."""

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None, *, native: tuple | None = None,
                 packed=None) -> None:
        super().__init__(in_features, out_features, bias)
        self.native = native is not None
        if self.native:
            qweight, wscale, comp = native
            self.register_buffer("qweight", qweight)
            self.register_buffer("wscale", wscale)
            self.register_buffer("comp", comp)
        else:
            self.packed = packed
            self._buffers_by_rows: dict[int, Tensor] = {}
            self.handle = _register(self)   # how the compiled step's ``leaplm::int8_linear`` finds ``packed``

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None) -> "Int8Linear":
        from .. import native

        out_f, in_f = weight.shape
        q, scale = quantize_weight(weight)
        b = None if bias is None else bias.detach().float().clone()
        if native.fast_int8():
            return cls(in_f, out_f, b, native=pack_int8(q, scale))
        q = torch.cat([q, torch.zeros(out_f, 2, dtype=torch.int8)], dim=1)  # sentinel columns
        with warnings.catch_warnings():  # torch deprecates quantized tensors; fbgemm's packing still needs one
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(out_f, dtype=torch.long), 0)
            packed = torch.ops.quantized.linear_prepack(qw, None)
        return cls(in_f, out_f, b, packed=packed)

    def dequantized_weight(self) -> Tensor:
        """The float ``[out, in]`` weight this module multiplies by (for tests and references)."""
        if self.native:
            q = unpack_int8(self.qweight, self.out_features, self.in_features)
            return q.float() * self.wscale[: self.out_features, None]
        w, _ = torch.ops.quantized.linear_unpack(self.packed)
        return w.dequantize()[:, : self.in_features]

    def _weight_bytes(self) -> int:
        if self.native:
            return sum(t.numel() * t.element_size() for t in (self.qweight, self.wscale, self.comp))
        return self.out_features * (self.in_features + 2) + 4 * self.out_features

    def _matmul(self, x: Tensor) -> Tensor:
        if self.native:
            return torch.ops.leaplm_native.int8_linear(x, self.qweight, self.wscale, self.comp, self.out_features)
        if torch.compiler.is_compiling():   # the same arithmetic as a graph: fused, no buffers
            amax = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
            sentinels = torch.tensor([[1.0, -1.0]], device=x.device).expand(x.shape[0], 2)
            scaled = torch.cat([x / amax, sentinels], dim=1)
            return torch.ops.leaplm.int8_linear(scaled, self.handle, self.out_features) * amax
        amax = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)  # (vector_norm(inf) is 7x slower here)
        buf = self._input_buffer(x.shape[0])
        torch.div(x, amax, out=buf[:, : self.in_features])
        return torch.ops.quantized.linear_dynamic(buf, self.packed, REDUCE_RANGE).mul_(amax)

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
        kernel = "leaplm VNNI" if self.native else "fbgemm"
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel ({kernel}), bias={self.bias is not None}"
