"""Weight quantization at load time. ``quantize_model(model, "int8")`` swaps every projection
(``models.layers.Linear``, and the tied or untied LM head) for a quantized module in place.

Modes: ``None`` (keep float weights), ``"int8"`` (per-output-channel int8 weights, leaplm's
VNNI int8 GEMM on CPU, fbgemm's dynamic int8 GEMM where it cannot run: see ``int8.py``), ``"int4"`` (4-bit groups of 32 as GGUF's Q4_1 in the
blocks, leaplm's own C++ GEMM: ``int4.py``; the LM head stays int8) and ``"auto"`` (what ``LLM`` does by default:
``resolve_quantization`` picks int8 for a GGUF file whose weights are low-bit blocks when it runs
on CPU in float32, and float weights otherwise — a 4-bit file is not inflated to 32 bits). Each mode is one small module so a kernel can be
swapped (e.g. for torchao) without touching the model.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidParamsError
from ..models.gguf_file import read_header   # the file layer below models.load (which imports this package)

QUANTIZATIONS = ("int8", "int4")
FLOAT_BLOCK_TYPES = ("F32", "F16", "BF16", "F64")


def check_quantization(mode: str | None, device: torch.device | str | None = None) -> str | None:
    """Validate a quantization name early (before a slow load); returns it normalized (``"auto"``
    is kept: ``resolve_quantization`` decides it once the model file is known)."""
    if mode in (None, "", "none", "fp32", "float"):
        return None
    if mode == "auto":
        return mode
    if mode not in QUANTIZATIONS:
        raise InvalidParamsError(f"unknown quantization {mode!r}; choose one of: auto, none, {', '.join(QUANTIZATIONS)}")
    if device is not None and torch.device(device).type != "cpu":
        raise InvalidParamsError(f"quantization {mode!r} runs on CPU only (fbgemm); use dtype=bfloat16 on {device}")
    if mode in ("int8", "int4") and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise InvalidParamsError(f"quantization {mode!r} needs torch's fbgemm backend, which this torch build lacks")
    return mode


def gguf_is_low_bit(path) -> bool:
    """Whether most weight bytes of a GGUF file are quantized blocks (Q4_K, Q8_0, ...), not floats."""
    header = read_header(path)   # the tensor table only (cached per file version); names a truncated file
    low = sum(t.n_bytes for t in header.tensors if t.tensor_type.name not in FLOAT_BLOCK_TYPES)
    return 2 * low > sum(t.n_bytes for t in header.tensors)


def resolve_quantization(mode: str | None, path, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Turn ``"auto"`` into a concrete mode for this checkpoint, device and dtype (others pass through).

    auto = ``"int8"`` for a low-bit GGUF file on CPU in float32 when torch has fbgemm (4-8x fewer weight
    bytes per token than float32, a small quality cost: docs/benchmarks.md); float weights otherwise
    (safetensors checkpoints keep what they store; on CUDA the float dtype is used)."""
    from pathlib import Path

    mode = check_quantization(mode, device)
    if mode != "auto":
        return mode
    p = Path(path)
    if (torch.device(device).type != "cpu" or dtype != torch.float32 or not p.is_file() or p.suffix != ".gguf"
            or "fbgemm" not in torch.backends.quantized.supported_engines):
        return None
    return "int8" if gguf_is_low_bit(p) else None


def quantize_model(model: nn.Module, mode: str | None, whole: bool = True) -> nn.Module:
    """Replace the projections of a loaded ``Transformer`` by quantized ones (in place). Projections already
    quantized are left alone, so ``whole=False`` on each block as it loads (``models.load.build_model``:
    a block's float weights are freed before the next is read), then once on the model, give the same model.
    ``whole=False``: ``model`` is one block; its projections only."""
    probe = model if whole else next(model.parameters())   # a Transformer or a block's first parameter
    mode = check_quantization(mode, probe.device)
    if mode is None:
        return model
    from ..models.layers import Linear
    from .int4 import Int4Linear
    from .int8 import Int8Linear

    if probe.dtype != torch.float32:
        raise InvalidParamsError(f"quantization {mode!r} needs the model loaded in float32, not {probe.dtype}")
    # int4: the blocks' projections at 4 bits; the LM head at int8 (llama.cpp's files keep the output
    # matrix at 6-8 bits too: 4-bit logits cost more quality than they save time)
    projection = Int4Linear if mode == "int4" else Int8Linear
    for module in list(model.modules()):  # every projection of the blocks
        for name, child in list(module.named_children()):
            if isinstance(child, Linear):
                cls = Int8Linear if whole and module is model else projection   # model.lm_head: int8
                setattr(module, name, cls.from_weight(child.weight, child.bias))
    if not whole:
        return model
    if model.lm_head is None:  # tied: the embedding table stays float for the lookup
        model.lm_head = Int8Linear.from_weight(model.embed, None)
    model.quantization = mode
    # int8 projections are row-invariant; with per-query attention the whole decode step is, so
    # speculation reproduces this model's own greedy decoding bit for bit (see models/transformer._Step)
    model.exact = True
    return model


__all__ = ["QUANTIZATIONS", "check_quantization", "gguf_is_low_bit", "quantize_model", "resolve_quantization"]
