"""Batch-invariant float32 projections on CPU: leaplm's own float32 GEMM (``leaplm_native::f32_linear``, C++,
``native/f32_ops.cpp``), so a row's result never depends on the batch it is computed in.

Why: ``F.linear`` picks its kernel and blocking by the number of rows (a gemv for 1 row, gemm kernels blocked by
M otherwise), which sum each dot product in another order: measured on this CPU, a row's last bits differ between
M = 1, M = 2..3 and M >= 4, and row j of a 300-row call differs from the same row alone. A continuous-batching
engine runs one request's tokens beside others', so greedy output would depend on what else is running. The native
kernel computes every output as ONE chain of fused multiply-adds over the inputs in order (then ``+ bias``),
whatever M, the row's place or the thread: bit-identical per row (``leaplm/native/f32_ops.cpp`` states the
arithmetic). The result differs from ``F.linear``'s in the last bits (another summation order), not in accuracy.

Layout (``pack_weight``): ``[N_p / 16, K, 16]`` float32, blocks of 16 outputs (N zero-padded to ``N_p``), so one
512-bit load holds input k of 16 outputs; packed once at load, the float ``[N, K]`` weight is then dropped.

``make_batch_invariant(model)`` swaps every projection of a ``Transformer`` (and its LM head; a tied head gets a
packed copy of the embedding, which stays for the lookup: ``vocab * hidden * 4`` more bytes) for an
``InvariantLinear``. Only on CPU in float32, where the native ops build.

Shapes: ``x [..., K] -> y [..., N]`` float32.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .linear import QuantizedLinear

BLOCK = 16      # outputs per packed block (one 512-bit register)
_ROWS = 4096    # pack_weight's chunk of weight rows (a multiple of BLOCK): temporaries of a chunk, not of a matrix


def pack_weight(weight: Tensor) -> Tensor:
    """``weight [N, K]`` -> ``[ceil(N / 16), K, 16]`` float32 with ``out[b, k, i] = weight[16 b + i, k]`` (zero past
    N). Works in chunks of rows, so an LM head costs one packed copy, not several temporaries."""
    if weight.dim() != 2:
        raise ValueError(f"pack_weight: the weight must be [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach()
    N, K = w.shape
    blocks = -(-N // BLOCK)
    out = torch.zeros(blocks, K, BLOCK, dtype=torch.float32, device=w.device)
    for r in range(0, N, _ROWS):
        rows = w[r: r + _ROWS].float()
        full = rows.shape[0] // BLOCK
        b = r // BLOCK
        out[b: b + full] = rows[: full * BLOCK].view(full, BLOCK, K).transpose(1, 2)
        if rows.shape[0] > full * BLOCK:   # the last, partial block
            out[b + full, :, : rows.shape[0] - full * BLOCK] = rows[full * BLOCK:].T
    return out


def unpack_weight(packed: Tensor, out_features: int) -> Tensor:
    """``pack_weight``'s inverse: ``[N_p / 16, K, 16]`` -> ``[out_features, K]``."""
    B, K, _ = packed.shape
    return packed.transpose(1, 2).reshape(B * BLOCK, K)[:out_features]


class InvariantLinear(QuantizedLinear):
    """``y = x @ W.T (+ b)`` in float32, each row bit-identical whatever the batch (``leaplm_native::f32_linear``).

    Built by ``from_weight`` / ``from_linear``; needs the native ops (``leaplm.native.load()``). Holds the buffer
    ``packed [N_p / 16, K, 16]`` (``pack_weight``) and ``bias [N]`` or None (float32, added inside the kernel).
    Not a weight quantization (the weight is the float32 one; only its layout and the order of the sums change);
    a ``QuantizedLinear`` for its frame, so ``bench.roofline`` counts the bytes a pass reads."""

    def __init__(self, packed: Tensor, out_features: int, bias: Tensor | None) -> None:
        if packed.dim() != 3 or packed.shape[2] != BLOCK or packed.dtype != torch.float32:
            raise ValueError(f"InvariantLinear: packed weight must be float32 [N / {BLOCK}, K, {BLOCK}], got "
                             f"{packed.dtype} {tuple(packed.shape)}")
        if not (packed.shape[0] - 1) * BLOCK < out_features <= packed.shape[0] * BLOCK:
            raise ValueError(f"InvariantLinear: {out_features} outputs do not fit {packed.shape[0]} blocks of {BLOCK}")
        # the bias a plain attribute, as in the other QuantizedLinear modules
        super().__init__(packed.shape[1], out_features, None if bias is None else bias.detach().float().contiguous())
        self.register_buffer("packed", packed.contiguous())

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None) -> "InvariantLinear":
        """``weight [N, K]`` (any float dtype; packed as float32), ``bias [N]`` or None."""
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"InvariantLinear: bias of shape {tuple(bias.shape)} for {weight.shape[0]} outputs")
        return cls(pack_weight(weight), weight.shape[0], bias)

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "InvariantLinear":
        """From a ``models.layers.Linear`` or ``torch.nn.Linear`` (its ``weight [N, K]`` and ``bias``)."""
        return cls.from_weight(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if shape[-1] != self.in_features:
            raise ValueError(f"InvariantLinear: input has {shape[-1]} features, the weight takes {self.in_features}")
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        y = torch.ops.leaplm_native.f32_linear(x2, self.packed, self.bias, self.out_features)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> Tensor:
        """The float32 ``[N, K]`` weight this module multiplies by (exactly the one it was built from)."""
        return unpack_weight(self.packed, self.out_features)

    def _weight_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, float32 batch-invariant, bias={self.bias is not None}"


def make_batch_invariant(model: nn.Module) -> int:
    """Swap every ``models.layers.Linear`` of a ``Transformer`` (the blocks' qkv, o, gate_up, down, and
    ``lm_head``) for an ``InvariantLinear``, in place; a tied head (``model.lm_head is None``, logits from
    ``model.embed``) becomes ``model.lm_head = InvariantLinear`` of the embedding (the embedding stays for the
    lookup). Returns how many modules it swapped (0 when there is nothing left to swap).

    Only for a CPU float32 model when ``leaplm.native.load()`` succeeds; otherwise returns 0 and changes nothing.
    Works eager and inside the compiled step (the op has a fake kernel, ``leaplm.native._register_fakes``)."""
    from .. import native
    from ..models.layers import Linear

    if model.device.type != "cpu" or model.dtype != torch.float32 or not native.load():
        return 0
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Linear):
                setattr(module, name, InvariantLinear.from_linear(child))
                swapped += 1
    if model.lm_head is None:
        model.lm_head = InvariantLinear.from_weight(model.embed, None)
        swapped += 1
    return swapped


__all__ = ["BLOCK", "InvariantLinear", "make_batch_invariant", "pack_weight", "unpack_weight"]
