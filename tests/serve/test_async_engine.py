"""``AsyncLLM`` in-process on the real SmolLM2: deltas join to ``LLM.generate``'s output, aborts free the KV pool, and a
step that raises fails only the requests then in flight — the engine serves the next ones."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

from leaplm import LLM, SamplingParams  # noqa: E402
from leaplm.serve.async_engine import AsyncLLM, QueueFullError  # noqa: E402

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def llm(smollm_gguf):
    return LLM(str(smollm_gguf), max_num_seqs=4)


async def collect(group):
    texts, ids, finals = {}, {}, {}
    async for d in group:
        texts[d.index] = texts.get(d.index, "") + d.text
        ids.setdefault(d.index, []).extend(d.token_ids)
        if d.final:
            finals[d.index] = d
    return texts, ids, finals


def test_deltas_join_to_generate_and_aborts_free_blocks(llm):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(temperature=0, max_tokens=24, stop=["\n\n"])
    want = llm.generate(prompts, params, use_tqdm=False)

    async def main():
        alm = AsyncLLM(llm, max_queue=0).start()
        try:
            groups = [await alm.submit([(llm.encode(p), params)], speculative="prompt_lookup") for p in prompts]
            long = await alm.submit([(llm.encode("Tell me a long story"), SamplingParams(max_tokens=500,
                                                                                          ignore_eos=True))])
            with pytest.raises(QueueFullError):   # 4 running = max_num_seqs, no queue
                await alm.submit([(llm.encode("x"), params)])
            results = await asyncio.gather(*[collect(g) for g in groups])
            async for d in long:   # one delta, then give up on it
                break
            alm.abort(long)
            for g in [*groups, long]:
                alm.finished(g)
            for _ in range(50):
                await asyncio.sleep(0.05)
                if alm.stats["kv_blocks_used"] == 0 and alm.stats["running"] == 0:
                    break
            return results, dict(alm.stats), alm.in_flight
        finally:
            alm.shutdown()

    results, stats, in_flight = asyncio.run(main())
    for (texts, ids, finals), w in zip(results, want):
        assert texts[0] == w.text and ids[0] == w.token_ids
        assert finals[0].finish_reason == w.finish_reason and finals[0].usage["completion_tokens"] == len(w.token_ids)
        assert finals[0].stats["speculative"] is None   # method name is given by the caller (app), not guessed
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and in_flight == 0


def test_a_failing_step_fails_only_the_requests_in_flight(llm, monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=8)
    want = llm.generate(["Hello"], params, use_tqdm=False)[0]

    async def main():
        alm = AsyncLLM(llm).start()
        try:
            real_step = llm.engine.step
            calls = {"n": 0}

            def broken_step():
                calls["n"] += 1
                if calls["n"] == 2:
                    raise RuntimeError("planted failure")
                return real_step()

            monkeypatch.setattr(llm.engine, "step", broken_step)
            g = await alm.submit([(llm.encode("Hello"), params)])
            failed = [d async for d in g]
            alm.finished(g)
            g2 = await alm.submit([(llm.encode("Hello"), params)])
            texts, ids, finals = await collect(g2)
            alm.finished(g2)
            return failed, texts, ids, alm.step_errors
        finally:
            alm.shutdown()

    failed, texts, ids, errors = asyncio.run(main())
    assert failed[-1].error and "planted failure" in failed[-1].error and errors == 1
    assert texts[0] == want.text and ids[0] == want.token_ids
    assert llm.engine.stats()["kv_blocks_used"] == 0
