"""Peer engines: the same weights and the same prompt token ids, run by another implementation.

``load_peers(names, target, threads) -> list[PeerEntry]``: one entry per requested name, in order,
never silently dropped. ``entry.status`` is ``"ok"`` (``entry.peer`` ready), ``"skipped: not installed"``,
``"skipped: needs a GGUF file"``, ``"skipped: needs --draft-model"`` or ``"failed: <error>"`` (loading
raised; ``entry.peer`` is None).

A peer has ``generate(prompt_ids, params) -> Generation`` (token ids only: no detokenization, the same
as leaplm's methods are timed) and ``info`` (version, settings). Both stop at the leaplm tokenizer's
EOS ids (plus ``params.stop_token_ids``) and at ``max_tokens`` clipped to the target's context window,
so their outputs are comparable token by token with ``vanilla``.

* ``hf`` - transformers ``AutoModelForCausalLM`` on the same checkpoint: a ``.gguf`` file is loaded
  dequantized (``GgufConfig(dequantize=True)``, needs ``accelerate``), an HF folder as is; the target's
  dtype and device. ``generate(..., do_sample=False)`` under greedy. TTFT from a streamer's first token.
* ``hf_pld`` - the same, with transformers' prompt lookup decoding: ``generate(...,
  prompt_lookup_num_tokens=10, max_matching_ngram_size=2)`` (drafts copied from the first earlier match
  of the last 2-/1-gram; greedy verification keeps the output equal to ``hf``'s).
* ``hf_assisted`` - the same, with transformers' assisted generation: ``generate(..., assistant_model=D)``,
  the draft ``D`` loaded from ``target.draft_model_path`` (``--draft-model``) the way the target is.
  ``"skipped: needs --draft-model"`` without one; ``"failed: ..."`` when its vocabulary size differs
  from the target's (transformers would then need both tokenizers: universal assisted decoding, not run).
  The draft length comes from the draft's own ``generation_config`` (transformers reads
  ``num_assistant_tokens``, ``num_assistant_tokens_schedule`` and ``assistant_confidence_threshold``
  there, not from ``generate``'s arguments; defaults 20, ``"constant"``, 0.4): ``info`` reports them.
  ``hf``, ``hf_pld`` and ``hf_assisted`` share one loaded model per checkpoint (``load_peers`` keeps a
  small cache), so asking for several does not load the weights twice; ``info["shared_weights"]`` says so.
  Assisted generation is batch 1 and needs the KV cache (``use_cache=True`` is passed); no tokenizer is
  needed for same-vocabulary drafts. It accepts the list of EOS ids (a candidate run is cut at the first).
  TTFT of ``hf_pld``/``hf_assisted`` is the first *accepted run* (the streamer gets tokens per round), so
  for ``hf_assisted`` it includes the first draft round (up to ``num_assistant_tokens`` draft passes).
  Under sampling both draw with other random numbers than ``hf``: only greedy output is comparable.
* ``llamacpp`` - llama-cpp-python on the GGUF file (``n_ctx=4096``, ``n_threads=threads``), fed the
  token ids (its KV cache is reset before each prompt: no prefix reuse across samples), greedy as
  ``temp=0, top_k=1``.
* ``llamacpp_pld`` - the same with llama-cpp-python's prompt lookup drafter,
  ``Llama(..., draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))`` (``max_ngram_size=2``).
  Both llama.cpp peers report ``"skipped: not installed"`` without ``llama_cpp``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import time
from dataclasses import dataclass, field
from typing import Any

from . import BenchError
from .methods import Generation, Target

KNOWN_PEERS = ("hf", "llamacpp", "hf_pld", "hf_assisted", "llamacpp_pld")
LLAMACPP_N_CTX = 4096
PLD_NUM_TOKENS = 10          # prompt lookup: tokens drafted per match (transformers and llama-cpp-python)
PLD_MAX_NGRAM = 2            # prompt lookup: longest n-gram matched (both libraries' default)


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


def _load_hf_model(path, dtype, device):
    """``AutoModelForCausalLM`` from a ``.gguf`` file (dequantized) or an HF folder, eval mode."""
    from transformers import AutoModelForCausalLM

    if path.is_file():
        from transformers import GgufConfig

        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                     quantization_config=GgufConfig(dequantize=True))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def _hf_model(path, target: Target, models: dict | None) -> tuple[Any, bool]:
    """The transformers model for ``path`` (target's dtype/device), from ``models`` when already loaded.

    Returns ``(model, shared)``; ``shared`` is True when another peer loaded it.
    """
    key = (str(path.resolve()), str(target.dtype), str(target.device))
    if models is not None and key in models:
        return models[key], True
    model = _load_hf_model(path, target.dtype, target.device)
    if models is not None:
        models[key] = model
    return model, False


class HFPeer:
    name = "hf"

    def __init__(self, target: Target, models: dict | None = None) -> None:
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.target = target
        self._models = models
        path = target.model_path
        self.model, shared = _hf_model(path, target, models)
        self.torch = torch
        self.info = {"engine": "transformers", "version": transformers.__version__, "dtype": str(target.dtype),
                     "device": str(target.device), "gguf_dequantized": path.is_file()}
        if shared:
            self.info["shared_weights"] = True

    def _generate_kwargs(self) -> dict:
        """What this peer adds to ``generate``'s arguments (subclasses: the decoding strategy)."""
        return {}

    def generate(self, prompt_ids: list[int], params) -> Generation:
        torch = self.torch
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):  # put() gets the prompt first, then each new token (or accepted run)
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
        kwargs.update(self._generate_kwargs())
        clock = Clock()
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, streamer=clock, **kwargs)
        tokens = out[0, len(prompt_ids):].tolist()
        reason = "stop" if tokens and tokens[-1] in stop else "length"
        return Generation(tokens, (clock.first - started) if clock.first else None, None, reason)

    def close(self) -> None:
        self.model = None
        if self._models is not None:
            self._models.clear()


class HFPromptLookupPeer(HFPeer):
    name = "hf_pld"

    def __init__(self, target: Target, models: dict | None = None) -> None:
        super().__init__(target, models)
        self.info.update(strategy="prompt lookup decoding", prompt_lookup_num_tokens=PLD_NUM_TOKENS,
                         max_matching_ngram_size=PLD_MAX_NGRAM)

    def _generate_kwargs(self) -> dict:
        return dict(prompt_lookup_num_tokens=PLD_NUM_TOKENS, max_matching_ngram_size=PLD_MAX_NGRAM, use_cache=True)


ASSISTANT_SETTINGS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


def _assistant_settings(draft) -> dict:
    """What ``AssistedCandidateGenerator`` will use: the draft's generation_config, unset fields -> defaults."""
    gc = draft.generation_config
    try:
        defaults = gc._get_default_generation_params()  # the defaults transformers fills in (private API)
    except Exception:  # noqa: BLE001 - older/newer transformers: report what is set
        defaults = {}
    out = {}
    for key in ASSISTANT_SETTINGS:
        value = getattr(gc, key, None)
        out[key] = value if value is not None else defaults.get(key)
    return out


class HFAssistedPeer(HFPeer):
    name = "hf_assisted"

    def __init__(self, target: Target, models: dict | None = None) -> None:
        super().__init__(target, models)
        path = target.draft_model_path
        self.draft, draft_shared = _hf_model(path, target, models)
        tv = self.model.config.get_text_config().vocab_size
        dv = self.draft.config.get_text_config().vocab_size
        if tv != dv:
            raise BenchError(f"draft vocab_size {dv} != target's {tv}: transformers would need both tokenizers "
                             f"(universal assisted decoding), which this peer does not run")
        self.info.update(strategy="assisted generation", draft_model=str(path), draft_gguf_dequantized=path.is_file(),
                         **_assistant_settings(self.draft))
        if draft_shared:
            self.info["draft_shared_weights"] = True
        sklearn = importlib.util.find_spec("sklearn") is not None
        # with scikit-learn installed, transformers re-tunes the confidence threshold within each call (ROC)
        self.info["assistant_confidence_threshold_adaptive"] = bool(
            sklearn and self.info["assistant_confidence_threshold"])

    def _generate_kwargs(self) -> dict:
        return dict(assistant_model=self.draft, use_cache=True)

    def close(self) -> None:
        self.draft = None
        super().close()


# --------------------------------------------------------------------------- llama.cpp


class LlamaCppPeer:
    name = "llamacpp"

    def __init__(self, target: Target, threads: int) -> None:
        import llama_cpp
        from llama_cpp import Llama

        self.target = target
        extra_bufts = llamacpp_extra_buffers_work(target.model_path)
        with contextlib.nullcontext() if extra_bufts else _model_params(use_extra_bufts=False):
            self.llm = Llama(model_path=str(target.model_path), n_ctx=LLAMACPP_N_CTX, n_threads=threads,
                             n_threads_batch=threads, verbose=False, **self._llama_kwargs())
        self.context = min(LLAMACPP_N_CTX, target.engine.max_model_len)
        self.info = {"engine": "llama.cpp (llama-cpp-python)", "version": getattr(llama_cpp, "__version__", "?"),
                     "n_ctx": LLAMACPP_N_CTX, "n_threads": threads, "extra_buffer_types": extra_bufts}
        if not extra_bufts:
            self.info["note"] = ("llama.cpp's extra buffer types (AMX / weight repacking) crashed a probe "
                                 "generation on this CPU, so they are off (use_extra_bufts=False)")

    def _llama_kwargs(self) -> dict:
        """Extra ``Llama(...)`` arguments (subclasses: a drafter)."""
        return {}

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


class LlamaCppPromptLookupPeer(LlamaCppPeer):
    name = "llamacpp_pld"

    def __init__(self, target: Target, threads: int) -> None:
        super().__init__(target, threads)
        self.info.update(strategy="prompt lookup decoding", draft_model="LlamaPromptLookupDecoding",
                         num_pred_tokens=PLD_NUM_TOKENS, max_ngram_size=PLD_MAX_NGRAM)

    def _llama_kwargs(self) -> dict:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        # logits_all=True: with a draft model llama-cpp-python 0.3.x keeps every position's logits but sizes
        # its score buffer by this argument (n_batch rows when False), so a sample passing 512 tokens
        # failed ("could not broadcast input array from shape (540672,) into shape (491520,)")
        return dict(draft_model=LlamaPromptLookupDecoding(max_ngram_size=PLD_MAX_NGRAM,
                                                          num_pred_tokens=PLD_NUM_TOKENS), logits_all=True)


_PROBE = """
import sys, llama_cpp
m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, verbose=False)
for i, _ in enumerate(m.generate([1, 2, 3], temp=0.0, top_k=1)):
    if i >= 1:
        break
"""
_probed: dict[str, bool] = {}


def llamacpp_extra_buffers_work(model_path) -> bool:
    """Whether llama.cpp generates with its default extra buffer types (AMX tiles, repacked weights).
    A llama.cpp built with ``-march=native`` on a CPU that reports AMX segfaulted on the first decode in
    a VM here, and a crash cannot be caught in-process: a child process tries it first (once per file)."""
    import subprocess
    import sys

    key = str(model_path)
    if key not in _probed:
        try:
            run = subprocess.run([sys.executable, "-c", _PROBE, key], capture_output=True, timeout=300)
            _probed[key] = run.returncode == 0
        except subprocess.TimeoutExpired:
            _probed[key] = False
    return _probed[key]


class _model_params:
    """Context manager: ``Llama(...)`` built inside uses model params with the given overrides
    (llama-cpp-python exposes no argument for ``use_extra_bufts``)."""

    def __init__(self, **overrides) -> None:
        self.overrides = overrides

    def __enter__(self):
        import llama_cpp.llama as L

        self.module, self.orig = L.llama_cpp, L.llama_cpp.llama_model_default_params

        def params():
            p = self.orig()
            for k, v in self.overrides.items():
                if hasattr(p, k):
                    setattr(p, k, v)
            return p

        self.module.llama_model_default_params = params
        return self

    def __exit__(self, *exc) -> None:
        self.module.llama_model_default_params = self.orig


# --------------------------------------------------------------------------- loading

HF_PEERS = {"hf": HFPeer, "hf_pld": HFPromptLookupPeer, "hf_assisted": HFAssistedPeer}
LLAMACPP_PEERS = {"llamacpp": LlamaCppPeer, "llamacpp_pld": LlamaCppPromptLookupPeer}


def _entry(name: str, make) -> PeerEntry:
    try:
        peer = make()
    except Exception as e:  # noqa: BLE001 - any load failure is reported, not fatal
        return PeerEntry(name, f"failed: {_error(e)}")
    return PeerEntry(name, "ok", peer, peer.info)


def load_peers(names: list[str], target: Target, threads: int) -> list[PeerEntry]:
    entries = []
    hf_models: dict = {}   # one transformers model per checkpoint, shared by the hf* peers
    for name in names:
        if name in HF_PEERS:
            if name == "hf_assisted" and getattr(target, "draft_model_path", None) is None:
                entries.append(PeerEntry(name, "skipped: needs --draft-model",
                                         info={"hint": "give a draft with the target's vocabulary: --draft-model D"}))
            else:
                entries.append(_entry(name, lambda cls=HF_PEERS[name]: cls(target, hf_models)))
        elif name in LLAMACPP_PEERS:
            if importlib.util.find_spec("llama_cpp") is None:
                entries.append(PeerEntry(name, "skipped: not installed",
                                         info={"hint": "pip install llama-cpp-python (the leaplm[llamacpp] extra)"}))
            elif not (target.model_path.is_file() and target.model_path.suffix == ".gguf"):
                entries.append(PeerEntry(name, "skipped: needs a GGUF file"))
            else:
                entries.append(_entry(name, lambda cls=LLAMACPP_PEERS[name]: cls(target, threads)))
    return entries
