"""``LLM``: the user-facing object (vLLM-style). Text in, text out; token ids welcome too.

    from leaplm import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")            # known name, .gguf file, HF folder or hub id
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=20))
    print(out[0].text, out[0].token_ids, out[0].finish_reason)
    for piece in llm.stream("Tell me a story", SamplingParams(max_tokens=50)): print(piece, end="")

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    out = llm.chat([{"role": "user", "content": "Where is the Eiffel tower? Answer in JSON."}],
                   SamplingParams(temperature=0, json_schema=schema))      # out[0].text parses, validates

This layer owns text: tokenization, chat templates, incremental detokenization and stop strings,
and compiling structured-output grammars (``compile_constraint``: JSON schema / regex / grammar ->
a grammar for this tokenizer and the model's vocabulary, cached). The engine below it sees token ids
only: it gets a fresh grammar cursor per constrained request through its ``constrainer``.
"""
from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch

from . import hub
from .engine import LLMEngine, Request
from .errors import InvalidParamsError
from .sampling import SamplingParams
from .tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]
Messages = list[dict]


@dataclass
class RequestOutput:
    """One finished request. ``outputs`` returns ``[self]`` so vLLM-style ``out.outputs[0].text`` works."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str            # "stop" (EOS, stop token, stop string, grammar complete) | "length"
    metrics: dict = field(default_factory=dict)   # see LLM.request_output; "forced_tokens": jump-forward tokens
    logprobs: list | None = None  # SamplingParams(logprobs=k): one leaplm.engine.TokenLogprob per token in token_ids
    prompt_logprobs: list | None = None   # SamplingParams(prompt_logprobs=k): None, then a TokenLogprob per prompt token

    @property
    def outputs(self) -> list["RequestOutput"]:
        return [self]


def _is_token_id(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU; bfloat16 on a CUDA GPU that supports it, else float16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The float dtype the weights and activations use: None/"auto" -> ``default_dtype(device)``, else a name
    of ``_DTYPES`` or one of those torch dtypes; anything else raises ``InvalidParamsError`` naming the choices."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InvalidParamsError(f"dtype {dtype} is not a float type leaplm runs; use torch.float32, "
                                     "torch.bfloat16 or torch.float16")
        return dtype
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise InvalidParamsError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    """The device a model runs on: None -> ``cuda`` when torch sees a GPU, else ``cpu``; otherwise ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"`` (or such a ``torch.device``). Raises ``InvalidParamsError`` for a name torch does
    not know (``"tpu"``), a device type leaplm does not run on (``"mps"``, ``"meta"``), CUDA on a torch build
    without it or with no GPU visible, and a GPU index the machine does not have — without touching a model."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise InvalidParamsError(f"device must be a string such as 'cpu', 'cuda' or 'cuda:0', not "
                                 f"{type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidParamsError(f"unknown device {device!r}; leaplm runs on: cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidParamsError(f"device {str(device)!r} is not supported; leaplm runs on: cpu, cuda, cuda:N")
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise InvalidParamsError(f"device {str(device)!r}: this torch build ({torch.__version__}) has no CUDA "
                                     "support; install a CUDA build of torch or use device='cpu'")
        if not torch.cuda.is_available():
            raise InvalidParamsError(f"device {str(device)!r}: torch sees no CUDA GPU (no driver, or "
                                     "CUDA_VISIBLE_DEVICES hides them); use device='cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InvalidParamsError(f"device {str(device)!r} does not exist: this machine has {count} CUDA "
                                     f"GPU{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    return dev


class LLM:
    """A model ready to generate.

    Args:
        model: a known short name (``leaplm models``), a ``.gguf`` file, a Hugging Face folder, or
            a hub id (downloaded when online). None: the embedded default, SmolLM2-135M-Instruct.
        dtype: None/"auto" = float32 on CPU, bfloat16 (or float16) on CUDA (``parse_dtype``).
        device: None = CUDA when available, else CPU; "cpu", "cuda" or "cuda:N" (``parse_device``).
        max_model_len: cap on prompt + generated tokens, >= 1 (default: the model's context window).
        max_num_seqs: most requests decoding together (continuous batching: a finished request's place is taken
            by the next waiting one at once). ``max_batch_size`` is the older name of the same setting.
        kv_cache_memory: bytes of the paged KV pool shared by all requests (default: a quarter of the free
            memory, at most what ``max_num_seqs`` full-length requests need). When it is full the newest
            request is preempted and recomputed later (its output does not change).
        reserve_kv_memory: make the whole KV pool resident now (as vLLM and llama.cpp's server do) instead of
            as blocks are first used: constant memory whatever the load, and too little memory fails here
            rather than under load. ``leaplm serve`` does this by default.
        prefix_caching: reuse the KV blocks of a shared token prefix (system prompt, earlier chat turns,
            the same prompt sampled several times) instead of recomputing them.
        max_num_batched_tokens: most tokens in one engine step (prefill chunks + decode tokens + drafts).
        goodput: with several requests decoding, size each request's draft from measured pass times and its
            acceptance rate, so that speculation never lowers throughput (``engine/goodput.py``); False: every
            request drafts its drafter's full length whatever the batch.
        speculative: a drafter for lossless speculative decoding, e.g. ``"prompt_lookup"``,
            ``{"method": "prompt_lookup", "num_draft": 8, "max_ngram": 3}`` or
            ``{"method": "draft_model", "model": "qwen2.5-coder-0.5b-instruct", "num_draft": 6}``.
            None: plain decoding. ``generate``/``stream`` take the same argument per call.
        quantization: ``"auto"`` (default) keeps a low-bit GGUF file low-bit on CPU (int8 weights) and
            float weights otherwise; None forces float weights (the exact checkpoint, e.g. to compare
            with transformers); ``"int8"`` quantizes every projection at load (per-channel int8, leaplm's
            VNNI kernel or fbgemm on CPU: several times faster decoding, small quality cost — docs/benchmarks.md); ``"int4"``
            stores the blocks' projections at 4 bits (groups of 32, leaplm's C++ kernel; LM head int8):
            half int8's weight bytes, a larger quality cost. The mode
            chosen is ``llm.quantization``. Speculation is lossless relative to the model as loaded.
        compile: run decode and verification passes through ``torch.compile`` (``models/compiled.py``):
            on CPU at batch 1 a small model's step is mostly per-operator overhead, which this removes
            (docs/benchmarks.md). Compiling takes about a minute for SmolLM2 int8 on 2 cores, at every
            load (``llm.compile_s``): int8 models compile with frozen weights, which inductor's disk cache
            does not cover (float models hit the cache on later loads). Compiled passes
            round slightly differently from eager ones; speculation stays lossless relative to the
            compiled model (tested).
        kv_policy: KV-cache compression / eviction for every request (a request's ``SamplingParams.kv_policy``
            overrides it), e.g. ``"snapkv:ratio=0.25"`` (keep a quarter of each prompt's tokens, chosen by
            attention) or ``"streaming_llm:window=1020"`` (attention sinks + a recent window: bounded memory,
            generation past the context window). Lossy; each output's ``metrics["kv_cache_bytes"]`` reports the KV
            memory it held at most. None: keep every token. See docs/long-context.md.

    Structured output is asked for per request (``SamplingParams(json_schema=...)``, ``regex``,
    ``grammar``, ``json_object``; docs/structured-output.md). ``generate`` compiles every request's
    grammar before it runs any of them, so a bad schema fails the call before generation starts.
    """

    def __init__(self, model: str | Path | None = None, dtype: str | torch.dtype | None = None,
                 device: str | None = None, max_model_len: int | None = None, max_batch_size: int | None = None,
                 download: bool = True, speculative: str | dict | None = None,
                 quantization: str | None = "auto", compile: bool = False, max_num_seqs: int | None = None,
                 kv_cache_memory: int | None = None, prefix_caching: bool = True,
                 max_num_batched_tokens: int | None = None, goodput: bool = True,
                 reserve_kv_memory: bool = False, kv_policy: str | dict | None = None) -> None:
        from .cache.policies import parse_kv_policy
        from .models.load import build_model, check_checkpoint
        from .quant import check_quantization, resolve_quantization

        self.download = download
        self._drafters: dict[str, object] = {}
        drafter = self._make_drafter(speculative)  # validate before the slow load (and before a download)
        self.device = parse_device(device)
        self.dtype = parse_dtype(dtype, self.device)
        if max_model_len is not None and (not _is_token_id(max_model_len) or max_model_len < 1):
            raise InvalidParamsError(f"max_model_len must be None (the model's context window) or an integer "
                                     f">= 1, got {max_model_len!r}")
        if max_num_seqs is not None and max_batch_size is not None and max_num_seqs != max_batch_size:
            raise InvalidParamsError("give max_num_seqs or its older name max_batch_size, not both")
        seqs = max_num_seqs if max_num_seqs is not None else max_batch_size if max_batch_size is not None else 32
        name = "max_num_seqs" if max_num_seqs is not None else "max_batch_size"
        if not _is_token_id(seqs) or seqs < 1:
            raise InvalidParamsError(f"{name} must be an integer >= 1, got {seqs!r}")
        self.max_num_seqs = self.max_batch_size = int(seqs)
        if kv_cache_memory is not None and (not _is_token_id(kv_cache_memory) or kv_cache_memory < 1):
            raise InvalidParamsError(f"kv_cache_memory must be None (automatic) or a number of bytes >= 1, got "
                                     f"{kv_cache_memory!r}")
        if max_num_batched_tokens is not None and (not _is_token_id(max_num_batched_tokens)
                                                   or max_num_batched_tokens < self.max_num_seqs):
            raise InvalidParamsError(f"max_num_batched_tokens must be None or an integer >= max_num_seqs "
                                     f"({self.max_num_seqs}), got {max_num_batched_tokens!r}")
        check_quantization(quantization, self.device)
        parse_kv_policy(kv_policy)   # a bad spec fails before the load

        self.model_path = hub.resolve(str(model) if model is not None else hub.DEFAULT_MODEL, download=download)
        check_checkpoint(self.model_path)   # a truncated file or bad config.json, named before the tokenizer reads it
        self.tokenizer = Tokenizer.from_path(self.model_path)
        self.quantization = resolve_quantization(quantization, self.model_path, self.device, self.dtype)
        self.model = build_model(self.model_path, dtype=self.dtype, device=self.device, quantization=self.quantization)
        if self.quantization is None:   # float32 on CPU: leaplm's row-invariant GEMM (batching changes no bits)
            from .quant.float32 import make_batch_invariant

            make_batch_invariant(self.model)
        self.compile_s = self.model.compile() if compile else None
        self.drafter = self._bind(drafter)
        self.engine = LLMEngine(self.model, self.tokenizer.eos_token_ids, max_model_len=max_model_len,
                                constrainer=self._new_constraint, max_num_seqs=self.max_num_seqs,
                                kv_cache_memory=None if kv_cache_memory is None else int(kv_cache_memory),
                                prefix_caching=bool(prefix_caching),
                                max_num_batched_tokens=max_num_batched_tokens, drafter_factory=self.drafter_for,
                                goodput=bool(goodput), reserve_kv_memory=bool(reserve_kv_memory),
                                kv_policy=kv_policy)

    @property
    def config(self):
        return self.model.config

    # ------------------------------------------------------------------ speculation
    def _make_drafter(self, spec):
        from .speculative.drafters import make_drafter

        if isinstance(spec, dict) and spec.get("method") in ("draft_model", "draft", "rasd"):
            spec = {"download": self.download, **spec}
        return make_drafter(spec)

    def _bind(self, drafter):
        if drafter is not None:
            drafter.bind(self.model, self.tokenizer)
        return drafter

    def drafter_for(self, speculative=None):
        """The drafter a call uses: the LLM's own when ``speculative`` is None, else one built (and
        kept for later calls) from the given method name or dict; ``"none"`` turns speculation off."""
        if speculative is None:
            return self.drafter
        if speculative == "none":
            return None
        key = repr(sorted(speculative.items())) if isinstance(speculative, dict) else repr(speculative)
        if key not in self._drafters:
            self._drafters[key] = self._bind(self._make_drafter(speculative))
        return self._drafters[key]

    # ------------------------------------------------------------------ structured output
    def compile_constraint(self, params: SamplingParams):
        """The compiled grammar (``leaplm.constrain.CompiledConstraint``) of ``params``' structured-output
        request for this model's tokenizer and vocabulary, or None when it asks for none. Cached: the same
        schema / regex / grammar compiles once. Raises ``InvalidConstraintError`` naming what is wrong or
        unsupported (compile time limit: ``leaplm.constrain.DEFAULT_TIMEOUT_S``)."""
        spec = params.constraint
        if spec is None:
            return None
        from .constrain import compile_constraint

        return compile_constraint(self.tokenizer, **spec, vocab_size=self.config.vocab_size)

    def _new_constraint(self, params: SamplingParams):
        """The engine's constrainer: a fresh per-request cursor of the (cached) compiled grammar."""
        return self.compile_constraint(params).new()

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) or hasattr(prompt, "tolist"):
            ids = list(prompt.tolist() if hasattr(prompt, "tolist") else prompt)
            if not all(_is_token_id(t) for t in ids):
                raise InvalidParamsError("a token-id prompt must be a list of integers")
            return [int(t) for t in ids]
        raise InvalidParamsError(f"a prompt is a string or a list of token ids, not {type(prompt).__name__}")

    def chat_prompt(self, messages: Messages) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, speculative: str | dict | None = None) -> list[RequestOutput]:
        """Complete each prompt; outputs in the order of ``prompts``. Every prompt is checked and every grammar
        compiled first, then all requests go to the engine at once: it runs up to ``max_num_seqs`` of them together
        and starts the next one the moment one finishes (continuous batching). ``speculative`` overrides the LLM's
        drafter for this call (``"none"``: plain decoding)."""
        drafter = self.drafter_for(speculative)
        if hasattr(prompts, "tolist"):  # a torch / numpy array of ids (1-D) or of prompts (2-D)
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and _is_token_id(prompts[0])):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        ids = [self.encode(p) for p in prompts]
        for one, p in zip(ids, params):
            policy = self.engine.policy_for(p)
            self.engine.check_prompt(one, policy is not None and policy.bounded)
        for p in {id(p): p for p in params}.values():  # every grammar compiles before anything runs
            self.compile_constraint(p)
        results: list[RequestOutput | None] = [None] * len(ids)
        with _progress(len(ids), enabled=use_tqdm and len(ids) > 1) as advance:
            def done(i: int, out: RequestOutput) -> None:
                out.prompt = prompts[i] if isinstance(prompts[i], str) else None
                results[i] = out
                advance()

            self._run(ids, params, drafter, done)
        return results  # type: ignore[return-value]

    def chat(self, messages: Messages | Sequence[Messages], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, speculative: str | dict | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (list of {role, content}) or several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        ids = [self.chat_prompt(c) for c in conversations]
        return self.generate(ids, sampling_params, use_tqdm=use_tqdm, speculative=speculative)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               speculative: str | dict | None = None) -> Iterator[str]:
        """Yield text increments as they are generated (whole UTF-8 characters only).

        After the iterator ends, ``llm.last_output`` holds the finished ``RequestOutput``.
        """
        params = self._params_list(sampling_params, 1)[0]
        prompt_ids = self.encode(prompt)
        engine = self.engine
        rid = engine.add_request(prompt_ids, params, speculative=self.drafter_for(speculative))
        tracker = TextTracker(self.tokenizer, params, prompt_ids)
        try:
            while not engine.get_request(rid).finish_emitted:
                for out in engine.step():
                    if out.request_id == rid:
                        self.take_output(out, tracker)
                piece = tracker.take_visible(final=engine.get_request(rid).finish_emitted)
                if piece:
                    yield piece
            self.last_output = self.request_output(engine.get_request(rid), tracker)
        finally:
            engine.abort(rid)
            engine.release(rid)

    def stream_chat(self, messages: Messages, sampling_params: SamplingParams | None = None,
                    speculative: str | dict | None = None) -> Iterator[str]:
        yield from self.stream(self.chat_prompt(messages), sampling_params, speculative)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _params_list(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise InvalidParamsError(f"{n} prompts but {len(params)} SamplingParams")
        return params

    def _run(self, prompts: list[list[int]], params: list[SamplingParams], drafter, done) -> None:
        """Add every prompt to the engine and step it until all of them finished; ``done(i, output)`` as each does.
        Interrupted (an exception, Ctrl-C), the requests still running are aborted: the engine stays usable."""
        engine = self.engine
        rids: list[int] = []
        try:
            for ids, p in zip(prompts, params):
                rids.append(engine.add_request(ids, p, speculative=drafter))
            index = {rid: i for i, rid in enumerate(rids)}
            texts = {rid: TextTracker(self.tokenizer, p, ids) for rid, p, ids in zip(rids, params, prompts)}
            left = len(rids)
            while left:
                for out in engine.step():
                    i = index.get(out.request_id)
                    if i is None:
                        continue
                    self.take_output(out, texts[out.request_id])
                    if out.finish_reason is not None:   # its last output (a step may hold two: see LLMEngine.step)
                        done(i, self.request_output(engine.get_request(out.request_id), texts[out.request_id]))
                        engine.release(out.request_id)
                        left -= 1
        finally:
            for rid in rids:
                engine.abort(rid)
                engine.release(rid)

    def take_output(self, out, tracker: "TextTracker") -> None:
        """Feed a step's tokens to the request's text; a stop string found ends the request there."""
        tracker.add(out.new_token_ids, finished=out.finish_reason is not None)
        if tracker.stopped:
            # the ids end where the text ends: at the token that completed the stop string, as in plain
            # decoding (a speculative step may have accepted tokens past it); a stop string completed
            # by the request's last allowed token still counts as "stop"
            self.engine.finish_request(out.request_id, tracker.kept_tokens, "stop")

    @staticmethod
    def request_output(r: Request, tracker: "TextTracker") -> RequestOutput:
        return RequestOutput(
            prompt=None, prompt_token_ids=r.prompt_ids, text=tracker.final_text(), token_ids=list(r.output_ids),
            finish_reason=r.finish_reason or "length",
            logprobs=list(r.logprobs) if r.logprobs is not None else None, metrics=request_metrics(r),
            prompt_logprobs=list(r.prompt_logprobs) if r.prompt_logprobs is not None else None)


def request_metrics(r: Request) -> dict:
    """An engine request's timings and counters (``RequestOutput.metrics``; the server's ``leaplm`` stats)."""
    end = r.finished_at or time.perf_counter()
    decode_s = end - (r.first_token_at or end)
    n = len(r.output_ids)
    return {
        "prompt_tokens": len(r.prompt_ids), "output_tokens": n, "target_passes": r.target_passes,
        "ttft_s": (r.first_token_at or end) - r.started, "total_s": end - r.started,
        "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
        "drafted": r.drafted, "accepted": r.accepted,
        "mean_accepted_tokens": n / r.target_passes if r.target_passes else None,
        "draft_s": r.draft_s, "verify_s": r.verify_s,
        "forced_tokens": r.forced_tokens, "pruned_draft_tokens": r.pruned, "constraint_s": r.constraint_s,
        "cached_prompt_tokens": r.cached_tokens, "preemptions": r.preemptions,
        # KV memory: the most this request held at once, and what it held when it finished (blocks x block bytes)
        "kv_cache_bytes": r.peak_kv_blocks * r.kv_block_bytes, "kv_final_bytes":
            (r.final_kv_blocks if r.finished else len(r.block_table)) * r.kv_block_bytes,
        "kv_policy": r.kv_policy.spec() if r.kv_policy is not None else None,
        "kv_policy_skipped": bool(r.kv_state.get("skipped")),   # the policy could not compress (pool full)
    }


class TextTracker:
    """Incremental text of one row plus stop-string handling (text is cut before the stop string).

    Tokens are detokenized and checked one at a time, whatever a step delivered at once, so a step that
    accepted several tokens stops exactly where one-token-a-step decoding stops: at the first token after
    which some stop string occurs in the text (the earliest occurrence in that text wins). ``kept_tokens``
    is then the number of output tokens up to and including that token; the ids past it are dropped.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_ids: Sequence[int] = ()) -> None:
        # the prompt's last tokens give the first generated word its leading space (sentencepiece)
        self.detok = tokenizer.detokenizer(prompt_ids, skip_special_tokens=params.skip_special_tokens)
        self.stops = params.stop or []
        self.include_stop = params.include_stop_str_in_output
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # chars that may start a stop string
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self.kept_tokens = 0      # output tokens taken in (all of them until a stop string is found)

    def add(self, token_ids: list[int], finished: bool) -> None:
        if self.stopped:
            return
        if not self.stops:   # nothing to find: detokenize the step's tokens at once
            self.kept_tokens += len(token_ids)
            self.text += self.detok.add(token_ids)
            if finished:
                self.text += self.detok.flush()
            return
        for i, token in enumerate(token_ids):
            before = len(self.text)
            self.kept_tokens += 1
            self.text += self.detok.add([token])
            if finished and i == len(token_ids) - 1:
                self.text += self.detok.flush()
            # a stop string may start in the text before this token (up to ``hold`` characters back)
            search_from = max(0, before - self.hold)
            hits = [(self.text.find(s, search_from), s) for s in self.stops]
            hits = [(at, s) for at, s in hits if at >= 0]
            if hits:
                index, stop = min(hits)
                self.text = self.text[: index + (len(stop) if self.include_stop else 0)]
                self.stopped = True
                return

    def take_visible(self, final: bool) -> str:
        """New text safe to show: holds back a tail that could still become a stop string."""
        limit = len(self.text) if (final or self.stopped or not self.stops) else max(self.emitted, len(self.text) - self.hold)
        piece = self.text[self.emitted: limit]
        self.emitted = limit
        return piece

    def final_text(self) -> str:
        return self.text


class _progress:
    """A rich progress bar with ETA on stderr (no-op when disabled)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), transient=True,
                            console=Console(stderr=True))
        self.bar.start()
        task = self.bar.add_task("generate", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()
