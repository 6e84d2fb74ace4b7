"""Stop strings cut the ids where they cut the text, with and without speculation.

A speculative step can accept several tokens at once; the output must still end at the token after which
one-token-a-step decoding finds the stop string: the same ``token_ids``, ``text``, ``output_tokens`` and
finish reason as plain decoding, whether the stop string arrives inside one multi-token step or straddles
two steps.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from leaplm.llm import TextTracker
from leaplm.sampling import SamplingParams


class _PieceDetok:
    """Detokenizer of a fake vocabulary: token id i is the text ``PIECES[i]``."""

    def __init__(self, pieces):
        self.pieces = pieces

    def add(self, ids):
        return "".join(self.pieces[i] for i in ids)

    def flush(self):
        return ""


class _PieceTokenizer:
    PIECES = ["ab", "c", "d", "ef", "\n", "\n\n", "x", "c-ef"]

    def detokenizer(self, prompt_ids=(), skip_special_tokens=True):
        return _PieceDetok(self.PIECES)


def _track(steps, stop, include=False):
    t = TextTracker(_PieceTokenizer(), SamplingParams(stop=stop, include_stop_str_in_output=include))
    for n, step in enumerate(steps):
        t.add(step, finished=n == len(steps) - 1)
        if t.stopped:
            break
    return t


def test_stop_inside_a_multi_token_step_keeps_ids_up_to_its_token():
    t = _track([[0, 1, 2, 3]], ["c"])           # "ab" "c" "d" "ef" in one step
    assert (t.text, t.kept_tokens, t.stopped) == ("ab", 2, True)
    t = _track([[0, 1, 2, 3]], ["c"], include=True)
    assert (t.text, t.kept_tokens) == ("abc", 2)


def test_stop_straddling_two_steps():
    t = _track([[0, 1], [2, 3]], ["cd"])         # "c" ends step 1, "d" starts step 2
    assert (t.text, t.kept_tokens) == ("ab", 3)
    t = _track([[0], [1], [2, 3]], ["bcd"])      # three steps
    assert (t.text, t.kept_tokens) == ("a", 3)


def test_first_completed_stop_wins_as_in_plain_decoding():
    # one token a step: after "c" the text "abc" holds "c" -> stop there, although "abcd" starts earlier
    plain = _track([[0], [1], [2], [3]], ["abcd", "c"])
    spec = _track([[0, 1, 2, 3]], ["abcd", "c"])
    assert (spec.text, spec.kept_tokens) == (plain.text, plain.kept_tokens) == ("ab", 2)


def test_earliest_stop_in_the_text_wins_not_the_first_listed():
    t = _track([[0, 7]], ["ef", "c"])            # "ab" + "c-ef": both stops arrive with one token
    assert (t.text, t.kept_tokens) == ("ab", 2)
    t = _track([[0, 7]], ["c", "ef"])
    assert (t.text, t.kept_tokens) == ("ab", 2)


def test_no_stop_keeps_every_token():
    t = _track([[0, 1], [2]], ["zz"])
    assert (t.text, t.kept_tokens, t.stopped) == ("abcd", 3, False)
    t = _track([[0, 1], [2]], [])
    assert (t.text, t.kept_tokens, t.stopped) == ("abcd", 3, False)


# ---------------------------------------------------------------------------------------------- real model
_MESSAGE = [{"role": "user", "content": "Repeat exactly: The quick brown fox jumps over the lazy dog while the "
                                        "cat sleeps on the warm mat by the door."}]
MAX_TOKENS = 40


_DOCS = Path(__file__).resolve().parents[1] / "docs"
# CI runs the training-free drafters (chains and trees); those that load a draft model or index a corpus
# are marked slow. Trees at full size (node_cost=0): a cost measured on a busy machine may size them to nothing.
METHODS = [pytest.param(m, marks=() if fast else pytest.mark.slow, id=i) for i, m, fast in [
    ("prompt_lookup", "prompt_lookup", True), ("recycling", {"method": "recycling", "node_cost": 0.0}, True),
    ("copyspec", "copyspec", True), ("aded", {"method": "aded", "node_cost": 0.0}, True),
    ("lookahead", "lookahead", True),
    ("draft_model", {"method": "draft_model", "model": "SMOLLM", "num_draft": 4}, False),
    ("retrieval", {"method": "retrieval", "corpus": str(_DOCS)}, False),
    ("rasd", {"method": "rasd", "model": "SMOLLM", "corpus": str(_DOCS)}, False)]]


@pytest.fixture(scope="module")
def smollm(smollm_gguf):
    from leaplm import LLM

    return LLM(str(smollm_gguf))


def _steps(llm, ids, method):
    """The tokens each speculative step delivered (no stop strings)."""
    batch = llm.engine.start([ids], [SamplingParams(temperature=0, max_tokens=MAX_TOKENS)], llm.drafter_for(method))
    steps = []
    while not batch.done:
        steps += [o.new_token_ids for o in batch.step() if o.new_token_ids]
    return steps


def _boundary_stops(tok, steps):
    """Stop strings that straddle two steps, and ones that end inside a multi-token step."""
    flat, ends = [], []
    for s in steps:
        flat += s
        ends.append(len(flat))
    text = lambda n: tok.decode(flat[:n])   # noqa: E731
    straddles, inners = [], []
    for j in range(len(ends) - 1):
        end = ends[j]
        piece = text(end + 1)[len(text(end - 1)):]   # last token of step j + first of step j+1
        if piece.strip():
            straddles.append(piece)
        if len(steps[j]) >= 3:                        # a token in the middle of an accepted draft
            inner = text(end - 1)[len(text(end - 2)):]
            if inner.strip():
                inners.append(inner)
    return straddles[:1] + inners[:1]


_PLAIN: dict = {}


@pytest.mark.real
@pytest.mark.parametrize("method", METHODS)
def test_every_drafter_stops_where_plain_decoding_stops(smollm, smollm_gguf, method):
    llm = smollm
    if isinstance(method, dict) and method.get("model") == "SMOLLM":   # the model drafting for itself
        method = {**method, "model": str(smollm_gguf)}
    ids = llm.chat_prompt(_MESSAGE)
    steps = _steps(llm, ids, method)
    assert any(len(s) > 1 for s in steps), method   # the drafter really accepted drafts here
    fixed = [" the", "mat", "door"]   # the greedy answer is "The cat sleeps on the warm mat by the door."
    fired = 0
    for stop in fixed + _boundary_stops(llm.tokenizer, steps):
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[stop])
        if stop not in _PLAIN:
            _PLAIN[stop] = llm.generate([ids], params, use_tqdm=False, speculative="none")[0]
        plain = _PLAIN[stop]
        spec = llm.generate([ids], params, use_tqdm=False, speculative=method)[0]
        got = (spec.token_ids, spec.text, spec.metrics["output_tokens"], spec.finish_reason)
        assert got == (plain.token_ids, plain.text, plain.metrics["output_tokens"], plain.finish_reason), stop
        assert spec.metrics["output_tokens"] == len(spec.token_ids)
        fired += plain.finish_reason == "stop" and len(plain.token_ids) < MAX_TOKENS
    assert fired >= 4     # the stop strings really fired (not a test of max_tokens)
