"""Perplexity of one long token stream under KV policies (``leaplm eval longppl``): how StreamingLLM-style policies
hold up far past the trained context, teacher-forced.

The text (Spec-Bench's questions, HumanEval's programs, or a file, joined into one stream) is fed as one prompt with
``prompt_logprobs`` (every token's log-probability as the model computed it while prefilling, under the policy).
A policy that cannot hold the whole stream (``none``: the full cache, limited to the model's context) scores it in
consecutive windows of the context, each from an empty cache: the in-context figure. Results per policy: the
perplexity over all scored tokens and per ``segment`` of the stream (flat = no blow-up), and the KV held.
"""
from __future__ import annotations

import math


def stream_ids(tokenizer, spec: str, tokens: int) -> list[int]:
    """The first ``tokens`` ids of ``spec``'s texts (``evals.perplexity.load_texts``) joined into one stream (a BOS
    the tokenizer adds to each text is kept only at the start)."""
    from ..errors import InvalidParamsError
    from .perplexity import load_texts

    texts = load_texts(tokenizer, spec, None)
    bos = texts.ids[0][0] if texts.ids and texts.ids[0] else None
    first_is_bos = bos is not None and all(s and s[0] == bos for s in texts.ids)
    ids: list[int] = []
    for s in texts.ids:
        ids += s[1:] if (first_is_bos and ids) else s
        if len(ids) >= tokens:
            break
    if len(ids) < tokens:
        raise InvalidParamsError(f"--text {spec!r} holds {len(ids)} tokens, fewer than --tokens {tokens}")
    return ids[:tokens]


def score(llm, ids: list[int], policy: str | None, bar=None) -> tuple[list[float], int]:
    """Log-probabilities of ``ids[1:]`` under ``policy`` and the most KV bytes a request held. A policy that cannot
    hold the stream scores it in consecutive windows of the context, each from an empty cache: the first token of
    every window after the first is then not scored (its tokens count is reported)."""
    from ..cache.policies import parse_kv_policy
    from ..sampling import SamplingParams

    engine = llm.engine
    parsed = parse_kv_policy(policy)
    window = len(ids) if parsed is not None and parsed.bounded else engine.max_model_len - 1
    logprobs: list[float] = []
    peak = 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start: start + window]
        if len(chunk) < 2:
            break
        rid = engine.add_request(chunk, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0,
                                                       kv_policy=policy or "none"))
        r = engine.get_request(rid)
        done = 0
        while engine.has_unfinished():
            engine.step()
            now = min(r.num_computed, len(chunk))
            if bar is not None and now > done:
                bar.advance(n=now - done)
            done = now
        logprobs += [x.logprob for x in r.prompt_logprobs[1:]]
        peak = max(peak, r.peak_kv_blocks * r.kv_block_bytes)
        engine.release(rid)
    return logprobs, peak


def summarize(logprobs: list[float], segment: int) -> dict:
    nll = -sum(logprobs) / len(logprobs)
    segs = [logprobs[i: i + segment] for i in range(0, len(logprobs), segment)]
    return {"tokens": len(logprobs), "nll_per_token": nll, "perplexity": math.exp(nll),
            "by_segment": [math.exp(-sum(s) / len(s)) for s in segs if s]}
