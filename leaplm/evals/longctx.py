"""Long-context tasks generated locally from a seed (the RULER task families, Hsieh et al. 2024; nothing is
downloaded) and their evaluation under KV policies: accuracy beside the KV memory each policy held.

Tasks (``TASKS``), each a haystack of a given length in tokens of the model's own tokenizer (chat template included)
with facts hidden at a depth, then a question and an answer prefix (RULER's):

- ``passkey``: a 5-digit pass key hidden in the classic repeated filler ("The grass is green. ...", Mohtashami &
  Jaggi 2023);
- ``niah_single``: one "special magic number" for a key, in prose-like filler sentences;
- ``niah_multikey``: four keys with a number each, one asked (three distractors);
- ``niah_multivalue``: four numbers for the same key, all asked (score: the fraction recalled);
- ``vt``: variable tracking, a chain of five assignments ``VAR X = 12345``, ``VAR Y = VAR X``, ... spread through the
  filler; all five names asked.

Scoring is RULER's ``string_match_all``: the fraction of expected strings found in the answer (case-insensitive).
Depths are spread evenly over the samples (sample ``i`` of ``n`` at ``(i + 0.5) / n``), so a policy that only keeps
the start or the end of the context cannot score by luck.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt")

_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_SUBJECTS = ["The committee", "A small village", "The old lighthouse keeper", "Every traveller", "The river",
             "Our neighbour", "The orchestra", "A patient gardener", "The museum", "The morning train",
             "Most engineers", "The library", "A quiet student", "The mountain road", "The baker",
             "The harbour master", "An old map", "The city council", "A wandering poet", "The school choir"]
_VERBS = ["remembered", "described", "painted", "ignored", "celebrated", "questioned", "measured", "repaired",
          "followed", "imagined", "collected", "announced", "carried", "admired", "forgot", "studied"]
_OBJECTS = ["the long winter", "a forgotten song", "the broken bridge", "the colours of autumn", "an unusual letter",
            "the price of bread", "a distant island", "the first snowfall", "the shape of the clouds",
            "a wooden boat", "the village festival", "an old photograph", "the evening tide", "a narrow staircase",
            "the sound of bells", "a basket of apples", "the empty station", "a careful plan"]
_TAILS = ["before the rain began", "with great care", "for the third time that year", "while nobody was watching",
          "in the quiet afternoon", "after a long discussion", "without saying a word", "as the lamps were lit",
          "near the old market", "during the holidays", "under a grey sky", "to everyone's surprise",
          "at the end of the week", "in a hurry", "for reasons no one recalled", "along the northern coast"]
_ADJECTIVES = ["amber", "silent", "crimson", "hollow", "brisk", "gentle", "frozen", "golden", "hidden", "lucky",
               "noble", "rapid", "scarlet", "velvet", "wild", "cobalt", "dusty", "eager", "fragile", "lunar"]
_NOUNS = ["lantern", "harbor", "falcon", "meadow", "compass", "thimble", "orchard", "glacier", "violin", "pebble",
          "canyon", "beacon", "quartz", "saddle", "tunnel", "willow", "anchor", "comet", "ember", "ladder"]


@dataclass
class Sample:
    """One generated prompt: ``messages`` (chat) or ``text`` (plain), the ``answer_prefix`` the assistant's turn
    starts with, and the strings a correct answer contains."""
    task: str
    length: int                 # the length asked for, in tokens
    index: int
    depth: float                # where the (first) fact sits, 0 = start, 1 = end of the haystack
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    prompt_ids: list[int] = field(default_factory=list)


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


_NOISE_UNITS = [x.strip() + "." for x in _NOISE.split(".") if x.strip()]


def _filler(rng: random.Random, task: str, n: int) -> str:
    """Filler unit ``n``: the next short sentence of the repeated noise (passkey, vt), or a random prose sentence."""
    if task in ("passkey", "vt"):
        return _NOISE_UNITS[n % len(_NOISE_UNITS)]
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."


def _facts(task: str, rng: random.Random) -> tuple[list[str], str, str, list[str]]:
    """-> (needle sentences in order, question, answer prefix, expected strings)."""
    if task == "passkey":
        key = _number(rng, 5)
        return ([f"The pass key is {key}. Remember it. {key} is the pass key."],
                "What is the pass key?", "The pass key is", [key])
    if task in ("niah_single", "niah_multikey"):
        keys = []
        while len(keys) < (1 if task == "niah_single" else 4):
            k = _key(rng)
            if k not in keys:
                keys.append(k)
        values = [_number(rng) for _ in keys]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        asked = rng.randrange(len(keys))
        order = list(range(len(keys)))
        rng.shuffle(order)
        return ([needles[i] for i in order],
                f"What is the special magic number for {keys[asked]} mentioned in the provided text?",
                f"The special magic number for {keys[asked]} mentioned in the provided text is", [values[asked]])
    if task == "niah_multivalue":
        key = _key(rng)
        values = list(dict.fromkeys(_number(rng) for _ in range(4)))
        return ([f"One of the special magic numbers for {key} is: {v}." for v in values],
                f"What are all the special magic numbers for {key} mentioned in the provided text?",
                f"The special magic numbers for {key} mentioned in the provided text are", values)
    if task == "vt":
        names: list[str] = []
        while len(names) < 5:
            n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if n not in names:
                names.append(n)
        value = _number(rng, 5)
        needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return (needles, f"Find all variables that are assigned the value {value} in the text above.",
                f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
                f"assigned the value {value}, they are:", names)
    raise ValueError(f"unknown long-context task {task!r}; tasks: {', '.join(TASKS)}")


_INSTRUCTION = {
    "passkey": "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you "
               "about the pass key.",
    "niah_single": "Some special magic numbers are hidden within the following text. Make sure to memorize them. I "
                   "will quiz you about the numbers afterwards.",
    "vt": "Memorize and track the chain(s) of variable assignment hidden in the following text.",
}


def _render(tokenizer, sample_context: str, task: str, question: str, prefix: str, chat: bool) -> list[int]:
    instruction = _INSTRUCTION.get(task, _INSTRUCTION["niah_single"])
    body = f"{instruction}\n\n{sample_context}\n\n{question}"
    if chat:
        text = tokenizer.render_chat([{"role": "user", "content": body}]) + prefix
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(f"{body}\n{prefix}")


def make_sample(tokenizer, task: str, length: int, index: int, count: int, seed: int = 0,
                chat: bool | None = None) -> Sample:
    """Sample ``index`` of ``count`` of ``task`` at ``length`` tokens (a deterministic function of these and
    ``seed``). ``chat``: wrap in the tokenizer's chat template (default: when it has one)."""
    if task not in TASKS:
        raise ValueError(f"unknown long-context task {task!r}; tasks: {', '.join(TASKS)}")
    rng = random.Random(f"{seed}:{task}:{length}:{index}")
    if chat is None:
        chat = bool(getattr(tokenizer.hf, "chat_template", None))
    needles, question, prefix, answers = _facts(task, rng)
    depth = (index + 0.5) / count
    overhead = len(_render(tokenizer, " ".join(needles), task, question, prefix, chat))
    room = length - overhead
    if room < 16:
        from ..errors import InvalidParamsError

        raise InvalidParamsError(f"{task} needs more than {overhead + 16} tokens; asked for {length}")
    sentences: list[str] = []
    used = 0
    while used < room:
        s = _filler(rng, task, len(sentences))
        used += len(tokenizer.encode(" " + s, add_special_tokens=False))
        sentences.append(s)
    while True:   # trim to fit (token counts of pieces and of the whole differ by a few merges)
        context = _place(sentences, needles, depth, rng)
        ids = _render(tokenizer, context, task, question, prefix, chat)
        if len(ids) <= length or len(sentences) <= 1:
            break
        over = len(ids) - length
        del sentences[-max(1, over * len(sentences) // max(1, used) - 1):]
    return Sample(task, length, index, depth, context, question, prefix, answers, ids)


def _place(sentences: list[str], needles: list[str], depth: float, rng: random.Random) -> str:
    """The filler with the needles inserted: the first at ``depth``, the others spread after it (wrapping)."""
    n = len(sentences)
    out = list(sentences)
    spots = [int(round(depth * n))]
    for i in range(1, len(needles)):
        spots.append((spots[0] + i * max(1, n // (len(needles) + 1))) % (n + 1))
    if len(needles) > 1 and needles[0].startswith("VAR"):   # a chain must read in order
        spots.sort()
    for needle, spot in sorted(zip(needles, spots), key=lambda x: -x[1]):
        out.insert(spot, needle)
    return " ".join(out)


def score(text: str, answers: list[str]) -> float:
    """RULER's ``string_match_all``: the fraction of ``answers`` found in ``text`` (case-insensitive)."""
    low = text.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


MAX_TOKENS = {"passkey": 12, "niah_single": 20, "niah_multikey": 20, "niah_multivalue": 56, "vt": 40}


def policy_label(spec: str | None) -> str:
    return "full" if spec in (None, "none", "full") else spec


def evaluate(llm, tasks: list[str], lengths: list[int], samples: int, policies: list[str | None], seed: int = 0,
             progress: bool = True, kvpress_python: str | None = None, threads: int | None = None,
             max_tokens: int | None = None) -> dict:
    """Every (length, task, sample) prompt under every policy, one request at a time, greedy.

    Returns ``{"runs": [{task, length, index, depth, policy, score, output, prompt_tokens, kv_cache_bytes,
    kv_final_bytes, ttft_s, decode_tokens_per_s, cached_prompt_tokens}, ...], "summary": {policy: {...}},
    "skipped": [...]}``; ``summary[policy]`` holds ``accuracy`` (mean score), ``by_length`` / ``by_task`` /
    ``by_cell`` means, the mean KV bytes held at most (``kv_cache_bytes``) and at the end (``kv_final_bytes``),
    ``kv_vs_full`` (its final KV bytes over the full cache's, same prompts), ``ttft_s`` and
    ``decode_tokens_per_s`` means. The policies run in the order given on the same prompt, one after the other: with
    prefix caching a later policy starts from the prompt blocks an earlier one left (``cached_prompt_tokens``), so
    compare TTFT with ``--no-prefix-cache``.

    ``kvpress_python``: also run NVIDIA kvpress (``kvpress_peer.py`` under that interpreter) on the same prompts with
    each policy's kvpress counterpart (``kvpress_presses``); its runs are labelled ``kvpress:<policy>`` and
    ``result["peer"]`` holds its versions. ``max_tokens``: decode this many tokens for every task instead of
    ``MAX_TOKENS[task]`` (EOS ignored: a steadier decode speed at long context)."""
    from ..progress import Progress
    from ..sampling import SamplingParams

    limit = llm.engine.max_model_len
    runs, skipped, made = [], [], []

    def budget(task: str) -> int:
        return max_tokens if max_tokens is not None else MAX_TOKENS[task]

    jobs = []
    for length in lengths:
        for task in tasks:
            if length + budget(task) > limit:
                skipped.append({"task": task, "length": length,
                                "why": f"{length} + {budget(task)} tokens exceed the context of {limit}"})
                continue
            jobs += [(length, task, i) for i in range(samples)]
    with Progress(len(jobs) * len(policies), "longctx", progress) as bar:
        for length, task, i in jobs:
            sample = make_sample(llm.tokenizer, task, length, i, samples, seed)
            made.append(sample)
            for spec in policies:
                bar.describe(f"{task} {length} #{i} {policy_label(spec)}")
                params = SamplingParams(temperature=0, max_tokens=budget(task), kv_policy=spec or "none",
                                        ignore_eos=max_tokens is not None)
                out = llm.generate([sample.prompt_ids], params, use_tqdm=False)[0]
                m = out.metrics
                runs.append(_run(sample, policy_label(spec), out.text, m["kv_cache_bytes"], m["kv_final_bytes"],
                                 m["ttft_s"], m["decode_tokens_per_s"], m["cached_prompt_tokens"]))
                bar.advance()
    peer = None
    if kvpress_python is not None and made:
        peer, peer_runs = run_kvpress(kvpress_python, llm, made, policies, threads, max_tokens)
        runs += peer_runs
    return {"runs": runs, "summary": summarize(runs), "skipped": skipped, "peer": peer}


def default_kvpress_python():
    """Where ``scripts/install-kvpress`` puts the peer's interpreter (``$LEAPLM_CACHE`` or ~/.cache/leaplm)."""
    import os
    from pathlib import Path

    root = Path(os.environ.get("LEAPLM_CACHE", Path.home() / ".cache" / "leaplm")).expanduser()
    return root / "peers" / "kvpress" / "bin" / "python"


def kvpress_presses(policies: list[str | None]) -> list[dict]:
    """The kvpress press for each policy that has one (``none`` -> no press, ``snapkv:ratio=r`` -> ``SnapKVPress``
    with kvpress's own defaults, ``knorm:ratio=r`` -> ``KnormPress``, ``streaming_llm`` -> ``StreamingLLMPress``
    keeping as many tokens)."""
    from ..cache.policies import StreamingLLM, parse_kv_policy
    from ..cache.policies.prompt_press import PromptPress

    out = []
    for spec in policies:
        policy = parse_kv_policy(spec)
        label = "kvpress:" + policy_label(spec)
        if policy is None:
            out.append({"label": label, "press": "none"})
        elif isinstance(policy, PromptPress):   # snapkv, knorm: the press of the same name, as many tokens kept
            out.append({"label": label, "press": policy.name, **({"ratio": policy.ratio} if policy.ratio is not None
                                                                 else {"keep_tokens": policy.budget})})
        elif isinstance(policy, StreamingLLM):
            out.append({"label": label, "press": "streaming_llm", "keep_tokens": policy.sinks + policy.window,
                        "kwargs": {"n_sink": policy.sinks}})
    return out


def run_kvpress(python: str, llm, made: list[Sample], policies: list[str | None], threads: int | None,
                max_tokens: int | None = None):
    """Run the kvpress peer on ``made``'s prompts; -> (its versions, runs scored like leaplm's)."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    from ..errors import InvalidParamsError, LeapLMError

    if not Path(python).is_file():
        raise InvalidParamsError(f"the kvpress peer's python {python!r} does not exist; build its environment with "
                                 "scripts/install-kvpress (kvpress pins its own transformers)")
    presses = kvpress_presses(policies)
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({
            "model": str(llm.model_path), "dtype": str(llm.dtype).replace("torch.", ""), "threads": threads,
            "prompts": [{"ids": s.prompt_ids, "max_tokens": max_tokens or MAX_TOKENS[s.task]} for s in made],
            "presses": presses, "eos": [] if max_tokens else sorted(llm.tokenizer.eos_token_ids)}))
        proc = subprocess.run([python, str(Path(__file__).with_name("kvpress_peer.py")), str(job), str(out)],
                              stdout=subprocess.DEVNULL, stderr=None)
        if proc.returncode != 0:
            raise LeapLMError(f"the kvpress peer failed (exit {proc.returncode}); its messages are above")
        data = json.loads(out.read_text())
    runs = []
    for run in data["runs"]:
        s = made[run["prompt"]]
        ids = [t for t in run["ids"] if t not in llm.tokenizer.eos_token_ids]
        text = llm.tokenizer.decode(ids)
        runs.append(_run(s, run["label"], text, None, run["kv_bytes"], run["ttft_s"], run["decode_tokens_per_s"], 0))
    return data["versions"], runs


def _run(s: Sample, policy: str, text: str, kv_peak, kv_final, ttft_s, decode_tps, cached: int) -> dict:
    """One scored run of ``evaluate``'s ``runs`` (leaplm's or the peer's)."""
    return {"task": s.task, "length": s.length, "index": s.index, "depth": s.depth, "policy": policy,
            "score": score(text, s.answers), "answers": s.answers, "output": text, "prompt_tokens": len(s.prompt_ids),
            "kv_cache_bytes": kv_peak, "kv_final_bytes": kv_final, "ttft_s": ttft_s, "decode_tokens_per_s": decode_tps,
            "cached_prompt_tokens": cached}


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(runs: list[dict]) -> dict:
    out: dict[str, dict] = {}
    full = {(r["task"], r["length"], r["index"]): r for r in runs if r["policy"] == "full"}
    peer_full = {(r["task"], r["length"], r["index"]): r for r in runs if r["policy"] == "kvpress:full"}
    for label in dict.fromkeys(r["policy"] for r in runs):
        mine = [r for r in runs if r["policy"] == label]
        base = peer_full if label.startswith("kvpress:") else full
        ratios = [r["kv_final_bytes"] / base[k]["kv_final_bytes"] for r in mine
                  if (k := (r["task"], r["length"], r["index"])) in base and base[k]["kv_final_bytes"]]
        out[label] = {
            "runs": len(mine), "accuracy": _mean(r["score"] for r in mine),
            "by_length": {str(n): _mean(r["score"] for r in mine if r["length"] == n)
                          for n in dict.fromkeys(r["length"] for r in mine)},
            "by_task": {t: _mean(r["score"] for r in mine if r["task"] == t) for t in dict.fromkeys(r["task"] for r in mine)},
            "by_cell": {f"{t}@{n}": _mean(r["score"] for r in mine if r["task"] == t and r["length"] == n)
                        for t, n in dict.fromkeys((r["task"], r["length"]) for r in mine)},
            "kv_cache_bytes": _mean(r["kv_cache_bytes"] for r in mine),
            "kv_final_bytes": _mean(r["kv_final_bytes"] for r in mine),
            "kv_vs_full": _mean(ratios),
            "ttft_s": _mean(r["ttft_s"] for r in mine),
            "decode_tokens_per_s": _mean(r["decode_tokens_per_s"] for r in mine),
        }
    return out


def plot(summary: dict, path) -> None:
    """Accuracy against the KV bytes held at the end, one line per context length, one point per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lengths = sorted({int(n) for s in summary.values() for n in s["by_length"]})
    for n in lengths:
        pts = sorted((s["kv_final_bytes"] / 2 ** 20, s["by_length"].get(str(n)), label)
                     for label, s in summary.items() if s["by_length"].get(str(n)) is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{n} tokens")
        for x, y, label in pts:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("KV cache held at the end (MiB, mean)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
