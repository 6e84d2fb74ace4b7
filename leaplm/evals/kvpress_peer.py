"""The kvpress peer of ``leaplm eval longctx``: NVIDIA's kvpress (its presses on transformers) on the same prompts.

Run by the interpreter of a separate environment that has kvpress (it pins its own transformers; ``scripts/install-
kvpress`` builds one), as ``python kvpress_peer.py JOB.json OUT.json``; it imports only torch, transformers and
kvpress, never leaplm. The job: ``{"model": path (.gguf or HF folder), "dtype": "float32", "threads": n,
"prompts": [{"ids": [...], "max_tokens": n}], "presses": [{"label", "press": "none"|"snapkv"|"streaming_llm"|...,
"ratio": fraction KEPT (leaplm's convention; kvpress's compression_ratio is 1 - ratio) or "keep_tokens": n,
"kwargs": {...}}],
"eos": [ids]}``. Each prompt is prefilled whole under the press (question included: the same question-aware
setting as leaplm's policies), then decoded greedily over the compressed cache at the text's positions. Output:
``{"versions": {...}, "runs": [{"prompt", "label", "ids", "kv_tokens", "kv_bytes", "ttft_s", "decode_tokens_per_s"}]}``
with one line of progress per run on stderr.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _press(spec: dict, prompt_len: int):
    import kvpress

    name, ratio, kwargs = spec["press"], spec.get("ratio"), dict(spec.get("kwargs") or {})
    if spec.get("keep_tokens") is not None:   # a fixed number of tokens kept: the ratio of this prompt
        ratio = min(1.0, spec["keep_tokens"] / prompt_len)
    if name == "none":
        return None
    classes = {"snapkv": kvpress.SnapKVPress, "streaming_llm": kvpress.StreamingLLMPress,
               "knorm": kvpress.KnormPress, "expected_attention": kvpress.ExpectedAttentionPress,
               "tova": kvpress.TOVAPress, "observed_attention": kvpress.ObservedAttentionPress}
    if name not in classes:
        raise SystemExit(f"kvpress peer: unknown press {name!r}; known: {', '.join(classes)}")
    return classes[name](compression_ratio=1.0 - float(ratio), **kwargs)


def main(job_path: str, out_path: str) -> int:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(int(job.get("threads") or torch.get_num_threads()))
    path = Path(job["model"])
    dtype = getattr(torch, job.get("dtype", "float32"))
    if path.is_file():   # a GGUF file, dequantized to float (the same weights as leaplm's -q none)
        try:
            from transformers import GgufConfig
        except ImportError:   # older transformers always dequantize
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                         quantization_config=GgufConfig(dequantize=True))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    eos = set(job.get("eos") or [])
    runs = []
    total = len(job["prompts"]) * len(job["presses"])
    for p, prompt in enumerate(job["prompts"]):
        ids = torch.tensor([prompt["ids"]])
        P = ids.shape[1]
        for spec in job["presses"]:
            press = _press(spec, P)
            cache = DynamicCache()
            started = time.perf_counter()
            with torch.inference_mode():
                if press is None:
                    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                else:
                    with press(model):
                        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                tokens = [int(out.logits[0, -1].argmax())]
                ttft = time.perf_counter() - started
                kv_tokens = cache.get_seq_length()
                t0 = time.perf_counter()
                while len(tokens) < prompt["max_tokens"] and tokens[-1] not in eos:
                    held = cache.get_seq_length()
                    out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True,
                                position_ids=torch.tensor([[P + len(tokens) - 1]]),
                                cache_position=torch.tensor([held]))
                    tokens.append(int(out.logits[0, -1].argmax()))
                decode_s = time.perf_counter() - t0
            runs.append({"prompt": p, "label": spec["label"], "ids": tokens, "kv_tokens": kv_tokens,
                         "kv_bytes": (kv_tokens + len(tokens)) * per_token, "ttft_s": ttft,
                         "decode_tokens_per_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0
                         else None})
            print(f"kvpress peer: {len(runs)}/{total} prompt {p} ({P} tokens) {spec['label']}: kept {kv_tokens}, "
                  f"{ttft:.1f}s prefill", file=sys.stderr, flush=True)
    from importlib.metadata import version

    versions = {"kvpress": version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__}
    Path(out_path).write_text(json.dumps({"versions": versions, "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
