"""Weight quantization at load time. ``quantize_model(model, "int8")`` swaps every projection
(``models.layers.Linear``, and the tied or untied LM head) for a quantized module in place.

Modes: ``None`` (keep float weights) and ``"int8"`` (per-output-channel int8 weights, fbgemm's
dynamic int8 GEMM on CPU: see ``int8.py``). Each mode is one small module so a kernel can be
swapped (e.g. for torchao) without touching the model.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidParamsError

QUANTIZATIONS = ("int8",)


def check_quantization(mode: str | None, device: torch.device | str | None = None) -> str | None:
    """Validate a quantization name early (before a slow load); returns it normalized."""
    if mode in (None, "", "none", "fp32", "float"):
        return None
    if mode not in QUANTIZATIONS:
        raise InvalidParamsError(f"unknown quantization {mode!r}; choose one of: none, {', '.join(QUANTIZATIONS)}")
    if device is not None and torch.device(device).type != "cpu":
        raise InvalidParamsError(f"quantization {mode!r} runs on CPU only (fbgemm); use dtype=bfloat16 on {device}")
    if mode == "int8" and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise InvalidParamsError("quantization 'int8' needs torch's fbgemm backend, which this torch build lacks")
    return mode


def quantize_model(model: nn.Module, mode: str | None) -> nn.Module:
    """Replace the projections of a loaded ``Transformer`` by quantized ones (in place)."""
    mode = check_quantization(mode, model.device)
    if mode is None:
        return model
    from ..models.layers import Linear
    from .int8 import Int8Linear

    if model.dtype != torch.float32:
        raise InvalidParamsError(f"quantization {mode!r} needs the model loaded in float32, not {model.dtype}")
    for module in list(model.modules()):  # every projection, an untied LM head included
        for name, child in list(module.named_children()):
            if isinstance(child, Linear):
                setattr(module, name, Int8Linear.from_weight(child.weight, child.bias))
    if model.lm_head is None:  # tied: the embedding table stays float for the lookup
        model.lm_head = Int8Linear.from_weight(model.embed, None)
    model.quantization = mode
    # int8 projections are row-invariant; with per-query attention the whole decode step is, so
    # speculation reproduces this model's own greedy decoding bit for bit (see models/transformer._Step)
    model.exact = True
    return model


__all__ = ["QUANTIZATIONS", "check_quantization", "quantize_model"]
