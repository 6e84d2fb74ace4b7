"""Checkpoint loading: a Hugging Face folder (config.json + safetensors) or one GGUF file.

``load_checkpoint(path) -> (ModelConfig, tensors, rope_freq_factors)`` where ``tensors`` maps
Hugging Face names to float tensors, each read from its file when asked for (``LazyTensors``).
``build_model(path, dtype, device) -> Transformer``: the model takes (pops) each tensor as it assigns it
and, when quantizing, quantizes each block as soon as it is loaded, so loading a GGUF file into int8 holds
one block in float32 at a time, not the whole model.

``check_checkpoint(path)``: the cheap file-level checks (GGUF header and tensor extents, ``config.json``, the
shard index) that ``LLM`` runs before its tokenizer reads anything, so errors name the real cause.

Only safetensors and GGUF are read — never pickle (``*.bin``/``*.pt`` checkpoints are refused).
A GGUF header is parsed once per file version by ``gguf_file.read_header`` (fast, cached; its tensors are
views of a read-only memory map). GGUF specifics undone here so every source reaches the model in one convention:
- tensors are dequantized with the ``gguf`` package (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q2_K..Q6_K/F16/BF16),
- llama.cpp permutes the Q/K rows of llama-arch models for its interleaved RoPE: un-permuted,
- gemma norm weights are stored as ``1 + w``: the 1 is taken off (the model adds it back).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError
from ..quant import check_quantization, quantize_model, resolve_quantization
from .gguf_file import read_header

GGUF_MAGIC = b"GGUF"


def load_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, Mapping[str, Tensor], Tensor | None]:
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix == ".gguf" or _has_magic(path):
            return load_gguf(path)
        raise UnsupportedModelError(
            f"{str(path)!r} is not a GGUF file; give a .gguf file or a Hugging Face folder with safetensors"
        )
    return load_hf_folder(path)


def _has_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


# ---------------------------------------------------------------------- Hugging Face folders
def check_checkpoint(path: str | os.PathLike) -> None:
    """Cheap file-level checks of a checkpoint, before anything else reads it (``LLM`` calls this before
    loading the tokenizer, whose errors would otherwise hide the real cause): a GGUF file's header and tensor
    extents (``gguf_file.read_header``, cached for the load that follows); a Hugging Face folder's
    ``config.json`` (present, valid JSON, a supported model) and shard index. Raises what ``load_checkpoint``
    would (``ModelNotFoundError``, ``CorruptModelError``, ``UnsupportedModelError``); weights are not read."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix == ".gguf" or _has_magic(path):
            read_header(path)
            return
        raise UnsupportedModelError(
            f"{str(path)!r} is not a GGUF file; give a .gguf file or a Hugging Face folder with safetensors")
    _hf_config(path)
    _hf_weight_files(path)


def _hf_config(folder: Path) -> ModelConfig:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
        raise ModelNotFoundError(f"{str(folder)!r} has no config.json{hint}")
    try:
        raw = json.loads(cfg_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptModelError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CorruptModelError(f"{cfg_file} holds a JSON {type(raw).__name__}, not an object of model settings")
    try:
        return ModelConfig.from_hf(raw)
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:   # "hidden_size": "big", heads 0 ...
        raise CorruptModelError(f"{cfg_file} has an invalid value: {type(e).__name__}: {e}") from None


def _hf_weight_files(folder: Path) -> list[Path]:
    """The safetensors files to read: the shards named by ``model.safetensors.index.json`` when there is one
    (checked: JSON, a ``weight_map`` of tensor -> shard file name, every shard present), else every
    ``*.safetensors`` file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptModelError(f"{index} is not valid JSON: {e}") from None
        except (KeyError, TypeError):
            raise CorruptModelError(f"{index} has no \"weight_map\" (tensor name -> shard file)") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptModelError(f"{index}: \"weight_map\" must be a non-empty object of tensor name -> shard "
                                    f"file, not {json.dumps(weight_map)[:80]}")
        bad = sorted({repr(n) for n in weight_map.values() if not isinstance(n, str) or Path(n).name != n or
                      not n.endswith(".safetensors")})
        if bad:
            raise CorruptModelError(f"{index} names shards that are not .safetensors file names in its folder: "
                                    f"{', '.join(bad)}")
        shard_names = sorted(set(weight_map.values()))
        missing = [n for n in shard_names if not (folder / n).is_file()]
        if missing:
            raise CorruptModelError(f"{index} lists shards that are not in {str(folder)!r}: {', '.join(missing)}")
        return [folder / n for n in shard_names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickles:
            raise UnsupportedModelError(
                f"{str(folder)!r} has only pickle weights ({', '.join(pickles)}); leaplm loads safetensors "
                "or GGUF only, because unpickling can run arbitrary code. Convert the checkpoint to safetensors."
            )
        raise ModelNotFoundError(f"{str(folder)!r} has no *.safetensors weights")
    return files


def load_hf_folder(folder: Path) -> tuple[ModelConfig, Mapping[str, Tensor], None]:
    from safetensors import SafetensorError, safe_open

    config = _hf_config(folder)
    files = _hf_weight_files(folder)
    sources: dict[str, tuple] = {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
            # some checkpoints name the language model differently (e.g. gemma3 multimodal wrappers)
            sources.update({_strip_prefix(k): (handle, k, f) for k in handle.keys()})
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptModelError(f"cannot read {f}: {e}") from None
    if config.tie_word_embeddings:
        sources.pop("lm_head.weight", None)
    return config, LazyTensors(sources, _read_safetensor), None


def _read_safetensor(source: tuple) -> Tensor:
    from safetensors import SafetensorError

    handle, key, f = source
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptModelError(f"cannot read tensor {key!r} of {f}: {e}") from None


def _strip_prefix(name: str) -> str:
    for prefix in ("language_model.", "model.language_model."):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return rest if rest.startswith(("model.", "lm_head.")) else "model." + rest
    return name


# ---------------------------------------------------------------------- GGUF
_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


class GGUFTensor(NamedTuple):
    """One tensor of an open GGUF file, as ``gguf.GGUFReader``'s: ``shape`` in ggml order (row length first);
    ``data`` a view of the read-only file mapping (numpy dtype for float/int tensors, uint8 bytes
    ``[rows, bytes per row]`` for block types), read from disk only when used."""

    name: str
    tensor_type: Any
    shape: tuple[int, ...]
    n_bytes: int
    data: np.ndarray


class GGUFFile:
    """An open GGUF file: ``header`` (``gguf_file.GGUFHeader``: metadata, tensor table), ``metadata`` and
    ``tensors`` (``GGUFTensor`` views of one ``np.memmap`` of the file: mapping costs no memory until read)."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.header = read_header(path)   # integrity checked: every tensor lies inside the file
        self.metadata = self.header.metadata
        mapped = np.memmap(path, mode="r")
        if mapped.size != self.header.file_size:
            raise CorruptModelError(f"GGUF file {str(path)!r} changed while it was being read "
                                    f"({self.header.file_size} bytes, now {mapped.size})")
        self.tensors = []
        for t in self.header.tensors:
            dims = tuple(reversed(t.shape))
            dtype = _PLAIN_TYPES.get(t.tensor_type.name)
            if dtype is None:   # block types: raw bytes, one row of blocks per row
                dtype, dims = np.uint8, gguf.quants.quant_shape_to_byte_shape(dims, t.tensor_type)
            data = mapped[t.offset: t.offset + t.n_bytes].view(dtype).reshape(dims)
            self.tensors.append(GGUFTensor(t.name, t.tensor_type, t.shape, t.n_bytes, data))


_PLAIN_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                "I32": np.int32, "I64": np.int64}


def open_gguf(path: Path) -> GGUFFile:
    """The GGUF file at ``path``, its header parsed (once per file version: ``gguf_file.read_header`` caches it)
    and checked: ``CorruptModelError`` names a truncated or malformed file."""
    return GGUFFile(Path(path))


_DEQUANT_ROWS = 8192   # dequantize's chunk for large matrices (an LM head: 150k rows)


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 numpy, shape in PyTorch order (rows first)."""
    import gguf

    qtype = tensor.tensor_type
    if qtype == gguf.GGMLQuantizationType.F32:
        data = np.asarray(tensor.data, dtype=np.float32)
    else:
        raw = tensor.data
        try:
            if raw.ndim == 2 and raw.shape[0] > _DEQUANT_ROWS:   # in row chunks: gguf's numpy temporaries
                data = np.empty((raw.shape[0], int(tensor.shape[0])), dtype=np.float32)   # of a chunk only
                for r in range(0, raw.shape[0], _DEQUANT_ROWS):
                    data[r: r + _DEQUANT_ROWS] = gguf.quants.dequantize(raw[r: r + _DEQUANT_ROWS], qtype)
            else:
                data = gguf.quants.dequantize(raw, qtype)
        except NotImplementedError:
            raise UnsupportedModelError(
                f"GGUF tensor {tensor.name!r} has block type {qtype.name}, which leaplm cannot dequantize"
            ) from None
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return data.reshape(shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's ``permute`` of Q/K rows (interleaved -> rotate-half RoPE layout)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: Path) -> tuple[ModelConfig, Mapping[str, Tensor], Tensor | None]:
    reader = open_gguf(path)
    meta = reader.metadata
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise CorruptModelError(f"GGUF file {str(path)!r} has no token_embd.weight tensor")
    vocab = int(by_name["token_embd.weight"].shape[-1])
    config = ModelConfig.from_gguf(meta, vocab_size=vocab, has_output="output.weight" in by_name)
    if "blk.0.attn_q.bias" in by_name:
        config = _replace(config, attention_bias=True)
    q_rows = int(by_name["blk.0.attn_q.weight"].shape[-1]) if "blk.0.attn_q.weight" in by_name else None
    if q_rows and q_rows != config.num_heads * config.head_dim and q_rows % config.num_heads == 0:
        # files without attention.key_length whose head_dim is not hidden / heads (e.g. qwen3)
        head_dim = q_rows // config.num_heads
        config = _replace(config, head_dim=head_dim,
                          attn_scale=head_dim ** -0.5 if config.attn_scale is not None else None)
    arch = meta["general.architecture"]
    permuted = arch in ("llama", "mistral")
    gemma = config.norm_offset != 0.0
    freq_factors = None
    if "rope_freqs.weight" in by_name:
        freq_factors = torch.from_numpy(_dequantize_named(by_name["rope_freqs.weight"], path).copy())
    sources = {hf: t for hf, t in ((_hf_name(name, config), t) for name, t in by_name.items()) if hf is not None}
    return config, LazyTensors(sources, _gguf_reader(path, permuted, gemma, config)), freq_factors


def _dequantize_named(t, path: Path) -> np.ndarray:
    try:
        return dequantize(t)
    except (ValueError, IndexError) as e:
        raise CorruptModelError(f"GGUF tensor {t.name!r} in {str(path)!r} is corrupt: {e}") from None


class LazyTensors(Mapping):
    """A checkpoint's tensors by Hugging Face name, each read from its (memory-mapped) file only when asked
    for: a loader that ``pop``s each tensor as it uses it holds one float tensor at a time instead of the
    whole model (a 1.5B model: ~6 GB in float32). Names and count are known up front; values are built per
    access (reading one twice reads it twice)."""

    def __init__(self, sources: dict, read) -> None:
        self._sources = dict(sources)   # Hugging Face name -> what ``read`` turns into the tensor
        self._read = read

    def __getitem__(self, hf: str) -> Tensor:
        return self._read(self._sources[hf])

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def pop(self, hf: str, *default):
        if hf not in self._sources and default:
            return default[0]
        return self._read(self._sources.pop(hf))


def _gguf_reader(path: Path, permuted: bool, gemma: bool, config: ModelConfig):
    """A GGUF tensor -> float32 in Hugging Face convention (dequantized; llama's Q/K rows un-permuted;
    gemma's norm offset taken off)."""

    def read(t) -> Tensor:
        w = _dequantize_named(t, path)
        name = t.name
        if permuted and name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute(w, config.num_heads)
        elif permuted and name.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute(w, config.num_kv_heads)
        if gemma and name.endswith("norm.weight"):
            w = w - 1.0
        w = np.ascontiguousarray(w, dtype=np.float32)
        return torch.from_numpy(w if w.flags.writeable else w.copy())

    return read


def _hf_name(name: str, config: ModelConfig) -> str | None:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if parts[0] != "blk" or len(parts) != 4:
        return None
    layer, kind, suffix = parts[1], parts[2], parts[3]
    if kind == "ffn_norm":  # the norm before the MLP
        hf = "pre_feedforward_layernorm" if config.sandwich_norm else "post_attention_layernorm"
    else:
        hf = _GGUF_NAMES.get(kind)
        if hf is None:
            return None
    return f"model.layers.{layer}.{hf}.{suffix}"


def _replace(config: ModelConfig, **changes) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def build_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                quantization: str | None = None):
    """Load a checkpoint and return the ready ``Transformer`` (eval mode, no grad), its projections
    quantized when ``quantization`` names a mode of ``leaplm.quant``."""
    from .transformer import Transformer

    check_quantization(quantization, device)   # a bad name fails before the slow load

    config, tensors, freq_factors = load_checkpoint(path)   # a corrupt file fails here, with its name
    quantization = resolve_quantization(quantization, path, device, dtype)
    with torch.device("meta"):  # no memory, no random init: weights are assigned next
        model = Transformer(config)
    model.reset_rotary(freq_factors)
    # each block quantized once loaded (its float weights freed), the LM head and the rest after
    model.load_weights(tensors, dtype, device,
                       loaded_block=(lambda block: quantize_model(block, quantization, whole=False))
                       if quantization else None)
    del tensors
    quantize_model(model, quantization)
    model.eval()
    return model
