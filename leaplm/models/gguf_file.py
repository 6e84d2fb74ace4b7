"""A GGUF file's header read in one fast pass: its metadata, its tensor table, and whether every tensor's
bytes lie inside the file.

``gguf.GGUFReader`` builds a numpy view for every element of every metadata array (a 49k-token
vocabulary with its merges: ~300k arrays, 5-10 s per parse); leaplm needs only the scalar metadata and
the tensor table, so ``read_header`` walks the header with ``struct``, skipping the vocabulary arrays.
Results are cached per (real path, size, mtime): a model load (integrity check, tokenizer, quantization
choice, weights) parses the header once. The cache holds no file data, only the parsed header.

``read_header(path) -> GGUFHeader`` raises ``CorruptModelError`` naming the file and the first problem
("... is truncated or not a GGUF file: tensor 'output.weight' ends at byte 98362432 but the file has
5000000 bytes") for a short file, a wrong magic, an unknown version, a header running past the end of
the file, a tensor whose data runs past it (a partial download), duplicate names, or a misaligned or
malformed tensor entry; ``UnsupportedModelError`` for a big-endian file or a tensor type the installed
``gguf`` package does not know.

GGUF layout (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic ``GGUF``,
uint32 version, uint64 tensor count, uint64 key/value count, the key/values, the tensor infos (name,
uint32 n_dims, uint64 dims[n_dims], uint32 ggml type, uint64 offset), padding to ``general.alignment``
(default 32), then the tensor data (each offset relative to its start, aligned).
"""
from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from ..errors import CorruptModelError, UnsupportedModelError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                  # GGML_MAX_DIMS
KEPT_ARRAY_LEN = 1024         # metadata arrays up to this length are kept (as lists); longer ones skipped
# the vocabulary arrays, always skipped: the tokenizer is built by transformers from the file itself
SKIPPED_KEYS = frozenset(f"tokenizer.ggml.{k}" for k in ("tokens", "scores", "token_type", "merges"))

_STRING, _ARRAY = 8, 9
_SCALAR = {t: struct.Struct("<" + c) for t, c in zip((0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12), "BbHhIif?Qqd")}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table. ``shape``: ggml order (``ne0`` = the contiguous row length first), as
    ``gguf.GGUFReader``'s; ``offset``: absolute byte offset of its data in the file."""

    name: str
    tensor_type: Any          # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    offset: int


@dataclass(frozen=True)
class GGUFHeader:
    """``metadata``: key -> value (read-only) for scalars, strings and arrays of up to ``KEPT_ARRAY_LEN``
    elements (lists); longer arrays and the vocabulary (``SKIPPED_KEYS``) are left out."""

    path: str
    version: int
    metadata: Mapping[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    file_size: int


class _Truncated(Exception):
    """A read past the end of the file (turned into CorruptModelError with the file's name)."""


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """The parsed header of the GGUF file at ``path`` (cached while the file's size and mtime stay the same),
    checked for integrity as the module docstring says."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError as e:
        raise CorruptModelError(f"cannot read GGUF file {str(p)!r}: {e.strerror or e}") from None
    return _read_header(os.path.realpath(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_header(real: str, size: int, mtime_ns: int) -> GGUFHeader:
    def corrupt(what: str) -> CorruptModelError:
        return CorruptModelError(f"{real} is truncated or not a GGUF file: {what}. If it was downloaded, "
                                 "download it again (leaplm models fetch NAME for a known model)")

    if size < 24:
        raise corrupt(f"it has {size} bytes, fewer than a GGUF header's 24")
    try:
        with open(real, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as b:
            return _parse(b, real, size, corrupt)
    except _Truncated as e:
        raise corrupt(f"its header runs past the end of the file ({size} bytes) while reading {e}") from None
    except OSError as e:
        raise CorruptModelError(f"cannot read GGUF file {real!r}: {e.strerror or e}") from None


def _parse(b: Any, real: str, size: int, corrupt) -> GGUFHeader:
    import gguf

    if b[:4] != MAGIC:
        raise corrupt(f"it starts with {bytes(b[:4])!r}, not the GGUF magic {MAGIC!r}")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", b, 4)
    if version not in VERSIONS and struct.unpack_from(">I", b, 4)[0] in VERSIONS:
        raise UnsupportedModelError(f"{real} is a big-endian GGUF file; leaplm reads little-endian GGUF only")
    if version not in VERSIONS:
        raise corrupt(f"unknown GGUF version {version} (leaplm reads versions 2 and 3)")

    def unpack(s: struct.Struct, pos: int, what: str):
        if pos + s.size > size:
            raise _Truncated(what)
        return s.unpack_from(b, pos)[0], pos + s.size

    def string(pos: int, what: str) -> tuple[str, int]:
        n, pos = unpack(_U64, pos, what)
        if pos + n > size:
            raise _Truncated(what)
        return bytes(b[pos:pos + n]).decode("utf-8", "replace"), pos + n

    def value(t: int, pos: int, what: str, keep: bool) -> tuple[Any, int]:
        if t in _SCALAR:
            return unpack(_SCALAR[t], pos, what)
        if t == _STRING:
            return string(pos, what)
        if t != _ARRAY:
            raise corrupt(f"{what} has unknown value type {t}")
        et, pos = unpack(_U32, pos, what)
        n, pos = unpack(_U64, pos, what)
        keep = keep and n <= KEPT_ARRAY_LEN
        if et in _SCALAR and not keep:       # skipped in one step
            end = pos + n * _SCALAR[et].size
            if end > size:
                raise _Truncated(what)
            return None, end
        if et == _STRING and not keep:       # skipped string by string (their lengths vary): the hot loop
            length_at = _U64.unpack_from
            try:
                for _ in range(n):
                    pos += 8 + length_at(b, pos)[0]
            except struct.error:             # a length field past the end of the file
                raise _Truncated(what) from None
            if pos > size:
                raise _Truncated(what)
            return None, pos
        items = []
        for _ in range(n):                   # kept, or arrays of arrays (skipped element by element)
            item, pos = value(et, pos, what, keep)
            if keep:
                items.append(item)
        return (items if keep else None), pos

    meta: dict[str, Any] = {}
    pos = 24
    for i in range(n_kv):
        key, pos = string(pos, f"metadata key {i}")
        if key in meta:
            raise corrupt(f"metadata key {key!r} appears twice")
        t, pos = unpack(_U32, pos, f"metadata {key!r}")
        val, pos = value(t, pos, f"metadata {key!r}", key not in SKIPPED_KEYS)
        if val is not None:
            meta[key] = val

    infos = []
    for i in range(n_tensors):
        name, pos = string(pos, f"tensor info {i}")
        n_dims, pos = unpack(_U32, pos, f"tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise corrupt(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        if pos + 8 * n_dims + 12 > size:
            raise _Truncated(f"tensor {name!r}")
        shape = struct.unpack_from(f"<{n_dims}Q", b, pos)
        raw_type, offset = struct.unpack_from("<IQ", b, pos + 8 * n_dims)
        pos += 8 * n_dims + 12
        infos.append((name, shape, raw_type, offset))

    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise corrupt(f"general.alignment is {alignment!r}, not a power of two")
    data_offset = -(-pos // alignment) * alignment

    tensors, names = [], set()
    for name, shape, raw_type, offset in infos:
        if name in names:
            raise corrupt(f"tensor {name!r} appears twice")
        names.add(name)
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise UnsupportedModelError(f"tensor {name!r} of {real} has ggml type {raw_type}, which the installed "
                                        "gguf package does not know (a newer format: upgrade gguf)") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if shape[0] % block:
            raise corrupt(f"tensor {name!r} has rows of {shape[0]} values, not a multiple of {qtype.name}'s "
                          f"block of {block}")
        n_elements = 1
        for d in shape:
            n_elements *= d
        n_bytes = n_elements // block * type_size
        start = data_offset + offset
        if offset % alignment:
            raise corrupt(f"tensor {name!r} starts at data offset {offset}, not a multiple of the alignment "
                          f"{alignment}")
        if start + n_bytes > size:
            raise corrupt(f"tensor {name!r} ends at byte {start + n_bytes} but the file has {size} bytes")
        tensors.append(TensorInfo(name, qtype, tuple(shape), n_elements, n_bytes, start))
    return GGUFHeader(real, version, MappingProxyType(meta), tuple(tensors), data_offset, size)
