"""Text <-> token ids: the only place in leaplm that knows about text.

``Tokenizer.from_path(path)`` takes an HF tokenizer folder (``tokenizer.json`` / ``tokenizer_config.json`` /
``tokenizer.model`` ...; ``AutoTokenizer``, local files only) or a ``.gguf`` file, whose tokenizer is built ONCE
with transformers' GGUF support and saved to ``$LEAPLM_CACHE/tokenizers/<sha1(realpath, size, mtime_ns)>``
(``LEAPLM_CACHE`` read at call time, default ``~/.cache/leaplm``); later loads read only the cache. The cache
is written to a temp dir and renamed into place: a killed process leaves no half cache.

* ``hf`` - the transformers tokenizer; ``vocab_size == len(hf)``; ``bos_token_id``.
* ``eos_token_ids`` - every id that ends generation: the tokenizer's eos; for GGUF also the metadata
  ``tokenizer.ggml.{eos,eot,eom}_token_id`` and, as llama.cpp does, the special tokens named like an
  end-of-generation token (``<|im_end|>``, ``<|endoftext|>``, ``<end_of_turn>``, ``<|eot_id|>`` ...); for HF
  folders also ``generation_config.json`` ``eos_token_id`` (int or list).
* ``encode`` adds BOS/EOS as the model expects (GGUF ``tokenizer.ggml.add_{bos,eos}_token``, else the HF
  tokenizer's own post-processor); ``decode`` never "cleans up" spaces.
* ``apply_chat_template`` renders with transformers' sandboxed jinja and tokenizes the text without adding
  special tokens (templates carry their own BOS); ``render_chat`` returns the text. No template ->
  ``UnsupportedModelError``.
* ``detokenizer(prompt_ids)`` -> ``IncrementalDetokenizer`` (streaming text; see its docstring).

Errors: ``ModelNotFoundError`` (nothing there / no tokenizer files), ``CorruptModelError`` (unreadable
tokenizer files; a GGUF file that is truncated or malformed — its header and tensor extents are checked
before the conversion, ``leaplm.models.gguf_file``), ``UnsupportedModelError`` (no chat template, GGUF
tokenizer transformers cannot convert), ``InvalidParamsError`` (a chat template rejected the messages).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from leaplm.errors import CorruptModelError, InvalidParamsError, ModelNotFoundError, UnsupportedModelError

_CACHE_VERSION = 1
_META = "leaplm_tokenizer.json"  # written last inside the cache dir: its presence marks a complete cache
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
# llama.cpp (llama-vocab.cpp) treats special tokens with these texts as end-of-generation.
_EOG_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
              "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>")


def _cache_root() -> Path:
    return Path(os.environ.get("LEAPLM_CACHE") or "~/.cache/leaplm").expanduser() / "tokenizers"


class Tokenizer:
    def __init__(self, hf: Any, eos_token_ids: Sequence[int] = (), add_bos: bool | None = None,
                 add_eos: bool | None = None, source: str | None = None):
        self.hf = hf
        self.vocab_size: int = len(hf)
        self.bos_token_id: int | None = hf.bos_token_id
        self.eos_token_ids: set[int] = {int(i) for i in eos_token_ids}
        if hf.eos_token_id is not None:
            self.eos_token_ids.add(int(hf.eos_token_id))
        self._add_bos, self._add_eos = add_bos, add_eos  # None: the HF tokenizer decides
        self.source = source
        self._backend = getattr(hf, "backend_tokenizer", None)  # Rust decode, no space clean-up

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_path(cls, path: str | Path) -> "Tokenizer":
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelNotFoundError(f"tokenizer path {str(p)!r} does not exist")
        if p.is_file():
            with open(p, "rb") as f:
                magic = f.read(4)
            if p.suffix.lower() == ".gguf" or magic == b"GGUF":
                return cls._from_gguf(p)
            raise ModelNotFoundError(f"{str(p)!r} is neither a tokenizer folder nor a .gguf file")
        if not any((p / name).is_file() for name in _TOKENIZER_FILES):
            raise ModelNotFoundError(f"no tokenizer files in {str(p)!r} (looked for {', '.join(_TOKENIZER_FILES)})")
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many types on bad files
            raise CorruptModelError(f"cannot load the tokenizer in {str(p)!r}: {type(e).__name__}: {e}") from None
        eos: list[int] = []
        gen = p / "generation_config.json"
        if gen.is_file():
            try:
                val = json.loads(gen.read_text()).get("eos_token_id")
            except (OSError, ValueError) as e:
                raise CorruptModelError(f"cannot read {str(gen)!r}: {e}") from None
            eos = [val] if isinstance(val, int) else [int(v) for v in val or ()]
        return cls(hf, eos, source=str(p))

    @classmethod
    def _from_gguf(cls, p: Path) -> "Tokenizer":
        st, real, root = p.stat(), os.path.realpath(p), _cache_root()
        final = root / hashlib.sha1(repr((real, st.st_size, st.st_mtime_ns, _CACHE_VERSION)).encode()).hexdigest()
        if (final / _META).is_file():
            try:
                return cls._load_cached(final, real)
            except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
                shutil.rmtree(final, ignore_errors=True)
        hf = _convert_gguf(p, meta := gguf_tokenizer_metadata(p))
        tok = cls(hf, _gguf_eos_ids(hf, meta), meta.get("tokenizer.ggml.add_bos_token"),
                  meta.get("tokenizer.ggml.add_eos_token"), source=real)
        try:
            _write_cache(tok, root, final)
        except OSError:  # read-only or full disk: still usable, just not cached
            pass
        return tok

    @classmethod
    def _load_cached(cls, d: Path, source: str) -> "Tokenizer":
        from transformers import AutoTokenizer

        info = json.loads((d / _META).read_text())
        hf = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        return cls(hf, info["eos_token_ids"], info["add_bos"], info["add_eos"], source=source)

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._add_bos is None and self._add_eos is None:
            return list(self.hf.encode(text, add_special_tokens=add_special_tokens))
        ids = list(self.hf.encode(text, add_special_tokens=False))
        if add_special_tokens:
            if self._add_bos and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self._add_eos and self.hf.eos_token_id is not None:
                ids.append(self.hf.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        if not getattr(self.hf, "chat_template", None):
            raise UnsupportedModelError(
                f"the tokenizer of {self.source or 'this model'} has no chat template (base model?); "
                "use plain completion (encode the prompt text) instead of chat messages")
        from jinja2 import TemplateError

        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                               **template_kwargs)
        except TemplateError as e:
            raise InvalidParamsError(f"the chat template rejected the messages: {e}") from None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> list[int]:
        return list(self.hf.encode(self.render_chat(messages, add_generation_prompt, **template_kwargs),
                                   add_special_tokens=False))

    def detokenizer(self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    @cached_property
    def _byte_ids(self) -> frozenset[int]:
        """Ids of sentencepiece byte-fallback tokens ``<0xXX>`` (empty for byte-level BPE)."""
        conv, unk = self.hf.convert_tokens_to_ids, self.hf.unk_token_id
        ids = {conv(f"<0x{b:02X}>") for b in range(256)} if conv("<0x00>") not in (None, unk) else set()
        return frozenset(i for i in ids if i not in (None, unk))

    @cached_property
    def _special_ids(self) -> frozenset[int]:  # what decode(skip_special_tokens=True) drops
        return frozenset(i for i, t in self.hf.added_tokens_decoder.items() if t.special)


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text increments.

    The prefix_offset/read_offset scheme of vLLM/TGI: the new text is ``decode(ids[prefix:])`` minus
    ``decode(ids[prefix:read])``, so leading spaces come out right and a step costs O(window), not O(length).
    Text is held back while it ends in U+FFFD (a multi-byte char split across tokens) or while a run of
    sentencepiece byte-fallback tokens ``<0xXX>`` may continue (the run decodes as a whole); ``flush``
    emits whatever is held. ``"".join(add(...)) + flush() == tokenizer.decode(ids)`` for the generated ids.
    ``prompt_ids`` (its last few ids) only give context for the first generated token's leading space.
    """

    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._ids = [int(i) for i in prompt_ids[-self.CONTEXT:]] if len(prompt_ids) else []
        self._prefix, self._read, self._prefix_text, self._text = 0, 0, "", ""
        self._parts: list[str] = []
        if self._ids:  # drop a context that could merge with the output (split char, open byte run)
            self._prefix_text, self._read = self._decode(self._ids), len(self._ids)
            if self._prefix_text.endswith("\ufffd") or self._open_byte_run(0):
                self._ids, self._read, self._prefix_text = [], 0, ""

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()
        return self._text

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _open_byte_run(self, start: int) -> bool:
        """Whether the last decoded token since ``start`` is a byte-fallback token (its run may go on)."""
        if not (byte_ids := self._tok._byte_ids):
            return False
        special = self._tok._special_ids if self._skip else frozenset()
        for t in reversed(self._ids[start:]):
            if t in byte_ids:
                return True
            if t not in special:
                return False
        return False

    def _emit(self, new_text: str) -> str:
        delta = new_text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix:self._read])
        if delta:
            self._parts.append(delta)
        return delta

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed newly generated ids (one or several); return the new text (may be "")."""
        self._ids.extend(int(i) for i in token_ids)
        if len(self._ids) == self._read or self._open_byte_run(self._read):
            return ""
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith("\ufffd"):
            return ""
        return self._emit(new_text)

    def flush(self) -> str:
        """At the end: emit whatever is held back (even an incomplete char)."""
        if len(self._ids) == self._read:
            return ""
        return self._emit(self._decode(self._ids[self._prefix:]))


# ---------------------------------------------------------------------- GGUF
def _convert_gguf(path: Path, meta: dict) -> Any:
    """Build the transformers tokenizer from a GGUF file (slow: seconds); the chat template is kept."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError/KeyError/... for unknown vocabs
        raise UnsupportedModelError(
            f"transformers cannot build the tokenizer of {str(path)!r} (tokenizer.ggml.model="
            f"{meta.get('tokenizer.ggml.model')!r}): {type(e).__name__}: {e}") from None
    if not getattr(hf, "chat_template", None) and meta.get("tokenizer.chat_template"):
        hf.chat_template = meta["tokenizer.chat_template"]
    return hf


def _gguf_eos_ids(hf: Any, meta: dict) -> list[int]:
    ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if isinstance(meta.get(k), int)]
    special = {t.content: i for i, t in hf.added_tokens_decoder.items() if t.special}
    return ids + [special[n] for n in _EOG_NAMES if n in special]


def _write_cache(tok: Tokenizer, root: Path, final: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(".tmp-*"):  # left by killed processes
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        tok.hf.save_pretrained(str(tmp))
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        # Load back with the generic backend: the saved tokenizer.json *is* the pipeline built from the
        # GGUF, and skipping the model class's re-derivation from vocab/merges halves the load time.
        cfg["tokenizer_class"] = "TokenizersBackend"
        cfg_path.write_text(json.dumps(cfg, indent=2))
        info = {"eos_token_ids": sorted(tok.eos_token_ids), "add_bos": tok._add_bos, "add_eos": tok._add_eos,
                "source": tok.source, "version": _CACHE_VERSION}
        (tmp / _META).write_text(json.dumps(info, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race (or a stale dir is there): keep theirs
            if not (final / _META).is_file():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_tokenizer_metadata(path: str | Path) -> dict:
    """The GGUF metadata (scalars, strings, short arrays; not the vocabulary arrays) — the fast header walk of
    ``leaplm.models.gguf_file``, which also checks the whole file: a truncated or malformed GGUF raises
    ``CorruptModelError`` saying so, before transformers' tokenizer conversion would fail on it less clearly."""
    from leaplm.models.gguf_file import read_header

    return dict(read_header(path).metadata)
