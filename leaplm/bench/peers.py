"""Peer engines: the same weights and the same prompt token ids, run by another implementation.

``load_peers(names, target, threads) -> list[PeerEntry]``: one entry per requested name, in order,
never silently dropped. ``entry.status`` is ``"ok"`` (``entry.peer`` ready), ``"skipped: not installed"``,
``"skipped: needs a GGUF file"`` or ``"failed: <error>"`` (loading raised; ``entry.peer`` is None).

A peer has ``generate(prompt_ids, params) -> Generation`` (token ids only: no detokenization, the same
as leaplm's methods are timed) and ``info`` (version, settings). Both stop at the leaplm tokenizer's
EOS ids (plus ``params.stop_token_ids``) and at ``max_tokens`` clipped to the target's context window,
so their outputs are comparable token by token with ``vanilla``.

* ``hf`` - transformers ``AutoModelForCausalLM`` on the same checkpoint: a ``.gguf`` file is loaded
  dequantized (``GgufConfig(dequantize=True)``, needs ``accelerate``), an HF folder as is; the target's
  dtype and device. ``generate(..., do_sample=False)`` under greedy. TTFT from a streamer's first token.
* ``llamacpp`` - llama-cpp-python on the GGUF file (``n_ctx=4096``, ``n_threads=threads``), fed the
  token ids (its KV cache is reset before each prompt: no prefix reuse across samples), greedy as
  ``temp=0, top_k=1``.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from typing import Any

from . import BenchError
from .methods import Generation, Target

KNOWN_PEERS = ("hf", "llamacpp")
LLAMACPP_N_CTX = 4096


@dataclass
class PeerEntry:
    name: str
    status: str                       # "ok" | "skipped: ..." | "failed: ..."
    peer: Any | None = None
    info: dict = field(default_factory=dict)


def parse_peers(text: str | None) -> list[str]:
    names = list(dict.fromkeys(t.strip() for t in (text or "").split(",") if t.strip()))
    bad = [n for n in names if n not in KNOWN_PEERS]
    if bad:
        raise BenchError(f"unknown peer {bad[0]!r}; known peers: {', '.join(KNOWN_PEERS)}")
    return names


def _max_new(params, prompt_len: int, context: int) -> int:
    return max(0, min(params.max_tokens, context - prompt_len))


def _stop_ids(target: Target, params) -> set[int]:
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(target.eos_token_ids))


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:300]


# --------------------------------------------------------------------------- transformers


class HFPeer:
    name = "hf"

    def __init__(self, target: Target) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.target = target
        path = target.model_path
        if path.is_file():
            from transformers import GgufConfig

            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=target.dtype,
                                                         quantization_config=GgufConfig(dequantize=True))
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=target.dtype)
        self.model = model.to(target.device).eval()
        self.torch = torch
        self.info = {"engine": "transformers", "version": transformers.__version__, "dtype": str(target.dtype),
                     "device": str(target.device), "gguf_dequantized": path.is_file()}

    def generate(self, prompt_ids: list[int], params) -> Generation:
        torch = self.torch
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):  # put() gets the prompt first, then each new token
            def __init__(self) -> None:
                self.calls, self.first = 0, None

            def put(self, value) -> None:
                self.calls += 1
                if self.calls == 2:
                    self.first = time.perf_counter()

            def end(self) -> None:
                pass

        stop = sorted(_stop_ids(self.target, params))
        max_new = _max_new(params, len(prompt_ids), self.target.engine.max_model_len)
        ids = torch.tensor([prompt_ids], device=self.target.device)
        kwargs: dict = dict(max_new_tokens=max_new, eos_token_id=stop or None, pad_token_id=self.target.pad_token_id,
                            attention_mask=torch.ones_like(ids), repetition_penalty=params.repetition_penalty)
        if params.greedy:
            kwargs.update(do_sample=False)
        else:
            if params.seed is not None:
                torch.manual_seed(params.seed)
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k if params.top_k > 0 else 0, min_p=params.min_p or None)
        clock = Clock()
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, streamer=clock, **kwargs)
        tokens = out[0, len(prompt_ids):].tolist()
        reason = "stop" if tokens and tokens[-1] in stop else "length"
        return Generation(tokens, (clock.first - started) if clock.first else None, None, reason)

    def close(self) -> None:
        self.model = None


# --------------------------------------------------------------------------- llama.cpp


class LlamaCppPeer:
    name = "llamacpp"

    def __init__(self, target: Target, threads: int) -> None:
        import llama_cpp
        from llama_cpp import Llama

        self.target = target
        self.llm = Llama(model_path=str(target.model_path), n_ctx=LLAMACPP_N_CTX, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.context = min(LLAMACPP_N_CTX, target.engine.max_model_len)
        self.info = {"engine": "llama.cpp (llama-cpp-python)", "version": getattr(llama_cpp, "__version__", "?"),
                     "n_ctx": LLAMACPP_N_CTX, "n_threads": threads}

    def generate(self, prompt_ids: list[int], params) -> Generation:
        if len(prompt_ids) >= self.context:
            raise BenchError(f"prompt of {len(prompt_ids)} tokens does not fit llama.cpp's n_ctx={self.context}")
        stop = _stop_ids(self.target, params)
        max_new = _max_new(params, len(prompt_ids), self.context)
        if params.greedy:
            sampling = dict(temp=0.0, top_k=1, top_p=1.0, min_p=0.0)
        else:
            if params.seed is not None:
                self.llm.set_seed(params.seed)
            sampling = dict(temp=params.temperature, top_k=params.top_k if params.top_k > 0 else 0,
                            top_p=params.top_p, min_p=params.min_p)
        self.llm.reset()  # no KV prefix reuse from the previous prompt
        tokens: list[int] = []
        first = None
        reason = "length"
        started = time.perf_counter()
        if max_new > 0:
            for tok in self.llm.generate(list(prompt_ids), reset=True, repeat_penalty=params.repetition_penalty,
                                         **sampling):
                if first is None:
                    first = time.perf_counter()
                tokens.append(int(tok))
                if tokens[-1] in stop:
                    reason = "stop"
                    break
                if len(tokens) >= max_new:
                    break
        return Generation(tokens, (first - started) if first else None, None, reason)

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()


# --------------------------------------------------------------------------- loading


def load_peers(names: list[str], target: Target, threads: int) -> list[PeerEntry]:
    entries = []
    for name in names:
        if name == "hf":
            try:
                peer = HFPeer(target)
                entries.append(PeerEntry(name, "ok", peer, peer.info))
            except Exception as e:  # noqa: BLE001 - any load failure is reported, not fatal
                entries.append(PeerEntry(name, f"failed: {_error(e)}"))
        elif name == "llamacpp":
            if importlib.util.find_spec("llama_cpp") is None:
                entries.append(PeerEntry(name, "skipped: not installed",
                                         info={"hint": "pip install llama-cpp-python (the leaplm[llamacpp] extra)"}))
            elif not (target.model_path.is_file() and target.model_path.suffix == ".gguf"):
                entries.append(PeerEntry(name, "skipped: needs a GGUF file"))
            else:
                try:
                    peer = LlamaCppPeer(target, threads)
                    entries.append(PeerEntry(name, "ok", peer, peer.info))
                except Exception as e:  # noqa: BLE001
                    entries.append(PeerEntry(name, f"failed: {_error(e)}"))
    return entries
