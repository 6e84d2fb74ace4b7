"""Tests of leaplm.tokenizer: GGUF/HF loading, the disk cache, BOS/EOS, chat templates, streaming detokenization."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

import leaplm.tokenizer as tokmod
from leaplm.errors import CorruptModelError, InvalidParamsError, ModelNotFoundError, UnsupportedModelError
from leaplm.tokenizer import Tokenizer


def _models_dir() -> Path:
    for base in (os.environ.get("LEAPLM_CACHE"), "~/.cache/leaplm"):
        if base and (Path(base).expanduser() / "models").is_dir():
            return Path(base).expanduser() / "models"
    return Path("~/.cache/leaplm/models").expanduser()


MODELS = _models_dir()
SMOL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN = MODELS / "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf"
GEMMA = MODELS / "gemma-3-270m.Q4_K_M.gguf"

TEXTS = {
    "unicode": "héllo 世界 🚀🎉 naïve",
    "code": "def f(x):\n    if x > 1:\n\treturn [x  *  2]\n\n\n    # done  \n  }\n",
}


def _need(path: Path) -> None:
    if not path.is_file():
        pytest.skip(f"{path} not present")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("leaplm-cache")


@pytest.fixture(autouse=True)
def _tmp_cache(monkeypatch, shared_cache):
    """Never write to the user's cache."""
    monkeypatch.setenv("LEAPLM_CACHE", str(shared_cache))


def _build(path: Path, cache: Path) -> Tokenizer:
    _need(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEAPLM_CACHE", str(cache))
        return Tokenizer.from_path(path)  # the first build in this session: converted by transformers


@pytest.fixture(scope="session")
def smol(shared_cache) -> Tokenizer:
    return _build(SMOL, shared_cache)


@pytest.fixture(scope="session")
def gemma(shared_cache) -> Tokenizer:
    return _build(GEMMA, shared_cache)


def _stream(tok: Tokenizer, ids, skip=True, chunks=None, prompt_ids=()):
    det = tok.detokenizer(prompt_ids, skip_special_tokens=skip)
    pieces, i, rng = [], 0, random.Random(len(ids))
    while i < len(ids):
        k = rng.choice(chunks) if chunks else 1
        pieces.append(det.add(ids[i:i + k]))
        i += k
    tail = det.flush()
    assert det.text == "".join(pieces) + tail
    return pieces, tail


# ---------------------------------------------------------------------- no model files needed
def test_empty_folder_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="tokenizer.json"):
        Tokenizer.from_path(tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "nope")


def test_corrupt_gguf_names_the_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(random.Random(0).randbytes(100))
    with pytest.raises(CorruptModelError, match="broken.gguf"):
        Tokenizer.from_path(bad)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CorruptModelError, match="empty.gguf"):
        Tokenizer.from_path(empty)


@pytest.mark.real
def test_truncated_gguf_header_is_corrupt(tmp_path):
    _need(SMOL)
    cut = tmp_path / "cut.gguf"
    with open(SMOL, "rb") as f:
        cut.write_bytes(f.read(4096))  # ends inside the token list
    with pytest.raises(CorruptModelError, match=r"cut\.gguf is truncated or not a GGUF file: its header runs past"):
        Tokenizer.from_path(cut)


@pytest.mark.real
def test_gguf_cut_in_its_tensor_data_is_reported_truncated_not_as_a_tokenizer_failure(tmp_path, shared_cache):
    """A partial download keeps the whole header (the vocabulary converts fine): the tokenizer checks the
    tensor extents first and names the truncation, and caches nothing for the broken file."""
    _need(SMOL)
    cut = tmp_path / "partial.gguf"
    with open(SMOL, "rb") as f:
        cut.write_bytes(f.read(SMOL.stat().st_size - 1000))
    with pytest.raises(CorruptModelError, match=r"partial\.gguf is truncated or not a GGUF file: tensor '[\w.]+' "
                                                rf"ends at byte {SMOL.stat().st_size} but the file has"):
        Tokenizer.from_path(cut)
    assert not any(str(cut) in p.read_text() for p in (shared_cache / "tokenizers").glob("*/leaplm_tokenizer.json"))


# ---------------------------------------------------------------------- SmolLM2 (byte-level BPE)
@pytest.mark.real
def test_smol_roundtrip_and_bos_like_transformers(smol):
    for text in (*TEXTS.values(), "Hello world", " leading space"):
        ids = smol.encode(text)
        assert smol.decode(ids) == text
        assert ids == smol.hf.encode(text)  # smol.hf is transformers' own GGUF tokenizer (fresh build)
    assert smol._add_bos is False and smol.encode("Hi")[0] != smol.bos_token_id
    assert smol.vocab_size == len(smol.hf) == 49152


@pytest.mark.real
def test_smol_eos_ids(smol):
    im_end = smol.hf.convert_tokens_to_ids("<|im_end|>")
    assert im_end in smol.eos_token_ids
    assert smol.hf.convert_tokens_to_ids("<|endoftext|>") in smol.eos_token_ids


@pytest.mark.real
def test_smol_chat_template(smol):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    text = smol.render_chat(msgs)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert not smol.render_chat(msgs, add_generation_prompt=False).endswith("<|im_start|>assistant\n")
    ids = smol.apply_chat_template(msgs)
    assert ids == smol.hf.encode(text, add_special_tokens=False)
    assert smol.decode(ids, skip_special_tokens=False) == text
    assert ids[-4:] == smol.hf.encode("<|im_start|>assistant\n", add_special_tokens=False)


@pytest.mark.real
def test_chat_template_errors(monkeypatch, smol):
    monkeypatch.setattr(smol.hf, "chat_template", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidParamsError, match="roles must alternate"):
        smol.apply_chat_template([{"role": "user", "content": "hi"}])
    monkeypatch.setattr(smol.hf, "chat_template", None)
    with pytest.raises(UnsupportedModelError, match="no chat template"):
        smol.render_chat([{"role": "user", "content": "hi"}])


@pytest.mark.real
def test_gguf_cache_skips_conversion_and_is_atomic(monkeypatch, tmp_path, smol):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LEAPLM_CACHE", str(cache))  # read at call time
    real, calls = tokmod._convert_gguf, []

    def failing_save(path, meta):  # conversion whose save dies half way: no cache may be left behind
        hf = real(path, meta)
        save = hf.save_pretrained

        def dying_save(d, **kw):
            save(d, **kw)
            raise OSError("disk full")

        hf.save_pretrained = dying_save
        return hf

    monkeypatch.setattr(tokmod, "_convert_gguf", failing_save)
    first = Tokenizer.from_path(SMOL)
    assert first.encode(TEXTS["unicode"]) == smol.encode(TEXTS["unicode"])
    assert list((cache / "tokenizers").iterdir()) == []

    monkeypatch.setattr(tokmod, "_convert_gguf", lambda p, m: calls.append(p) or real(p, m))
    Tokenizer.from_path(SMOL)
    assert len(calls) == 1
    (entry,) = (cache / "tokenizers").iterdir()
    assert not entry.name.startswith(".tmp")
    again = Tokenizer.from_path(str(SMOL))
    assert len(calls) == 1  # second load: from the cache, no GGUF conversion
    for text in (*TEXTS.values(), "<|im_start|>user\nhi<|im_end|>"):
        assert again.encode(text) == smol.encode(text)
        assert again.encode(text, add_special_tokens=False) == smol.encode(text, add_special_tokens=False)
    assert again.eos_token_ids == smol.eos_token_ids and again.bos_token_id == smol.bos_token_id
    assert again.hf.chat_template == smol.hf.chat_template
    assert again.apply_chat_template([{"role": "user", "content": "hi"}]) == smol.apply_chat_template(
        [{"role": "user", "content": "hi"}])


@pytest.mark.real
def test_hf_folder_and_generation_config(tmp_path, smol):
    smol.hf.save_pretrained(str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 7]}))
    tok = Tokenizer.from_path(tmp_path)
    assert {2, 0, 7} <= tok.eos_token_ids
    assert tok.encode(TEXTS["code"]) == smol.encode(TEXTS["code"])
    assert tok.render_chat([{"role": "user", "content": "x"}]) == smol.render_chat([{"role": "user", "content": "x"}])


# ---------------------------------------------------------------------- incremental detokenization
def _check_text_stream(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    for chunks in (None, [1, 2, 3]):
        pieces, tail = _stream(tok, ids, chunks=chunks)
        assert "".join(pieces) + tail == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in [*pieces, tail]), pieces


def _check_random_stream(tok: Tokenizer, seed: int, ids=None) -> None:
    rng = random.Random(seed)
    ids = ids or [rng.randrange(tok.vocab_size) for _ in range(300)]
    for skip in (True, False):
        for chunks in (None, [1, 1, 2, 5]):
            pieces, tail = _stream(tok, ids, skip=skip, chunks=chunks)
            assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_detok_text_smol(smol, name):
    _check_text_stream(smol, TEXTS[name])


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_detok_text_gemma(gemma, name):
    _check_text_stream(gemma, TEXTS[name])


@pytest.mark.real
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detok_random_smol(smol, seed):
    _check_random_stream(smol, seed)


@pytest.mark.real
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detok_random_gemma(gemma, seed):
    _check_random_stream(gemma, seed)


@pytest.mark.real
def test_detok_byte_fallback_runs_gemma(gemma):
    """Runs of <0xXX> tokens decode as a whole (an invalid run becomes one U+FFFD per byte)."""
    byte = {b: gemma.hf.convert_tokens_to_ids(f"<0x{b:02X}>") for b in range(256)}
    word, special = gemma.encode("ok", add_special_tokens=False), gemma.hf.convert_tokens_to_ids("<end_of_turn>")
    shi = [byte[0xE4], byte[0xB8], byte[0x96]]  # "世" spelled in bytes
    ids = shi + word + shi + [byte[0xFF]] + word + shi[:2] + [special] + shi[2:] + shi[:1]
    _check_random_stream(gemma, 0, ids)
    rng, pool = random.Random(7), list(byte.values()) + [special] + word
    for _ in range(50):
        _check_random_stream(gemma, 0, [rng.choice(pool) if rng.random() < 0.8 else rng.randrange(gemma.vocab_size)
                                        for _ in range(40)])


@pytest.mark.real
def test_detok_split_utf8_smol(smol):
    rng = random.Random(3)
    single_bytes = [i for i in range(smol.vocab_size) if len(smol.hf.convert_ids_to_tokens(i)) == 1]
    for _ in range(50):
        _check_random_stream(smol, 0, [rng.choice(single_bytes) for _ in range(40)])


@pytest.mark.real
def test_detok_window_stays_small_and_prompt_context(smol):
    text = TEXTS["code"] * 100
    ids = smol.encode(text, add_special_tokens=False)
    det = smol.detokenizer()
    out = []
    for i in ids:
        out.append(det.add([i]))
        assert len(det._ids) - det._prefix < 16  # O(window) per token, not O(length)
    assert "".join(out) + det.flush() == text
    prompt = smol.encode("Say hi:", add_special_tokens=False)
    gen = smol.encode(" hello there", add_special_tokens=False)
    pieces, tail = _stream(smol, gen, prompt_ids=prompt)
    assert "".join(pieces) + tail == " hello there"


# ---------------------------------------------------------------------- Qwen / gemma from GGUF
@pytest.mark.real
def test_qwen_from_gguf(shared_cache):
    qwen = _build(QWEN, shared_cache)
    for text in TEXTS.values():
        assert qwen.encode(text) == qwen.hf.encode(text)  # no BOS, like transformers
        assert qwen.decode(qwen.encode(text)) == text
    ids = {qwen.hf.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert ids <= qwen.eos_token_ids
    text = qwen.render_chat([{"role": "user", "content": "hi"}])
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    _check_random_stream(qwen, 5)


@pytest.mark.real
def test_gemma_from_gguf(gemma):
    for text in TEXTS.values():
        ids = gemma.encode(text)
        assert ids == gemma.hf.encode(text)  # transformers' GGUF tokenizer adds BOS too
        assert ids[0] == gemma.bos_token_id and ids.count(gemma.bos_token_id) == 1
        assert gemma.decode(ids) == text
        assert gemma.encode(text, add_special_tokens=False) == ids[1:]
    assert gemma.hf.convert_tokens_to_ids("<eos>") in gemma.eos_token_ids
    assert gemma.hf.convert_tokens_to_ids("<end_of_turn>") in gemma.eos_token_ids  # llama.cpp EOG by name
    with pytest.raises(UnsupportedModelError, match="no chat template"):  # gemma-3-270m is a base model
        gemma.apply_chat_template([{"role": "user", "content": "hi"}])
    cached = Tokenizer.from_path(GEMMA)  # from the session cache
    for text in TEXTS.values():
        assert cached.encode(text) == gemma.encode(text)
    assert cached.eos_token_ids == gemma.eos_token_ids
