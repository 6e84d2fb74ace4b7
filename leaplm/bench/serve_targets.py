"""The servers ``leaplm bench-serve --servers`` starts itself, one at a time, each on a free 127.0.0.1 port and
the same model file, its output in ``DIR/<name>[-c<C>].log``.

``plan_server(name, ...) -> ServerPlan | str``: how to start server ``name``, or a ``"skipped: <why>"`` status
when it cannot run here. ``ServerPlan.make(c)`` returns the (unstarted) ``serving_peers.ServerSubprocess`` for
concurrency level ``c``; ``per_level``: a fresh server per level, else one server for every level.

* ``leaplm`` - ``python -m leaplm.cli serve --model PATH --host 127.0.0.1 --port P --max-num-seqs MAX_C``
  (+ ``--leaplm-args``), ready when it has printed ``leaplm serve: ready on `` and ``GET /health`` answers.
* ``llamacpp-server`` - llama.cpp's ``llama-server`` (``serving_peers.LlamaServerProcess``, the binary found as
  for ``leaplm bench --peers llamacpp-server``): restarted per level with ``--parallel C --cont-batching
  -c C * (longest prompt + max tokens + 16) -t T -tb T``; needs a GGUF file.
* ``hf-serve`` - the ``transformers serve`` CLI of the installed transformers: ``transformers serve
  --continuous-batching --host 127.0.0.1 --port P --cb-block-size 64 --cb-num-blocks N --cb-max-batch-tokens B
  MODEL`` with ``HF_HUB_OFFLINE=1``; a GGUF file is named ``FOLDER:FILE.gguf`` (transformers dequantizes it to
  float weights; config and tokenizer come from the file), an HF folder by its path. KV pages for ``MAX_C``
  requests of the longest prompt + max tokens (``serving_peers.hf_kv_pages``). The model runs in a child
  process of the server, so RSS is sampled over the process tree.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .serving_peers import (CTX_SLACK, LlamaServerProcess, ServerSubprocess, find_llama_server, hf_kv_pages,
                            llama_server_version)

SERVERS = ("leaplm", "llamacpp-server", "hf-serve")
LEAPLM_READY = "leaplm serve: ready on "
HF_PAGE = 64


class CommandServer(ServerSubprocess):
    """A server started by ``argv``, where ``{port}`` stands for the free port chosen at ``start()``."""

    def __init__(self, label: str, argv: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.label, self.argv = label, list(argv)

    def command(self, port: int) -> list[str]:
        return [a.replace("{port}", str(port)) for a in self.argv]


@dataclass
class ServerPlan:
    name: str
    make: Callable[[int], ServerSubprocess]
    per_level: bool = False
    info: dict = field(default_factory=dict)


def parse_servers(text: str) -> list[str]:
    from . import BenchError

    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [n for n in names if n not in SERVERS]
    if bad or not names:
        raise BenchError(f"--servers: unknown server {bad[0]!r}; known: {', '.join(SERVERS)}" if bad else
                         f"--servers needs at least one of {', '.join(SERVERS)}")
    return names


def plan_server(name: str, *, model_path: Path, max_concurrency: int, longest_prompt: int, max_tokens: int,
                threads: int, log_dir: Path | None, llama_server: str | None = None, leaplm_args: list[str] = (),
                startup_timeout: float = 600.0) -> ServerPlan | str:
    """How to start ``name`` (see the module docstring), or its ``"skipped: ..."`` status."""
    log = (lambda stem: log_dir / f"{stem}.log" if log_dir is not None else None)  # noqa: E731
    if name == "leaplm":
        argv = [sys.executable, "-m", "leaplm.cli", "serve", "--model", str(model_path), "--host", "127.0.0.1",
                "--port", "{port}", "--max-num-seqs", str(max_concurrency), *leaplm_args]
        from .. import __version__

        return ServerPlan(name, lambda c: CommandServer("leaplm serve", argv, log_path=log("leaplm"),
                                                        startup_timeout=startup_timeout, ready_text=LEAPLM_READY),
                          info={"engine": "leaplm serve", "version": __version__, "command": argv})
    if name == "llamacpp-server":
        if not (model_path.is_file() and model_path.suffix == ".gguf"):
            return "skipped: llama-server needs a GGUF file (--model NAME.gguf or a known GGUF model)"
        binary = find_llama_server(llama_server)
        if binary is None:
            return "skipped: llama-server not found: build it with scripts/build-llama-server, or pass --llama-server PATH"
        per_slot = longest_prompt + max_tokens + CTX_SLACK

        def make(c: int) -> LlamaServerProcess:
            return LlamaServerProcess(binary, model_path, c, c * per_slot, threads, log(f"llama-server-c{c}"),
                                      startup_timeout=startup_timeout)

        return ServerPlan(name, make, per_level=True,
                          info={"engine": "llama.cpp llama-server", "binary": str(binary),
                                "version": llama_server_version(binary), "ctx_per_slot": per_slot, "threads": threads,
                                "command": LlamaServerProcess(binary, model_path, max_concurrency,
                                                              max_concurrency * per_slot, threads).command(0)})
    if name == "hf-serve":
        return _plan_hf(model_path, max_concurrency, longest_prompt, max_tokens, log("hf-serve"), startup_timeout)
    from . import BenchError

    raise BenchError(f"unknown server {name!r}; known: {', '.join(SERVERS)}")


def transformers_cli() -> str | None:
    """The ``transformers`` console script of this Python (beside it, else on PATH); None if there is none."""
    beside = Path(sys.executable).with_name("transformers")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("transformers")


def _plan_hf(model_path: Path, max_c: int, longest_prompt: int, max_tokens: int, log_path: Path | None,
             startup_timeout: float) -> ServerPlan | str:
    if importlib.util.find_spec("transformers") is None:
        return "skipped: transformers is not installed"
    missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
    if missing:
        return f"skipped: transformers serve needs {', '.join(missing)} (pip install 'transformers[serving]')"
    cli = transformers_cli()
    if cli is None:
        return "skipped: the transformers CLI (transformers serve) is not installed with this Python"
    if model_path.is_file() and model_path.suffix == ".gguf":
        model = f"{model_path.parent}:{model_path.name}"
    elif model_path.is_dir():
        model = str(model_path)
    else:
        return f"skipped: transformers serve loads an HF folder or a GGUF file, not {model_path}"
    import transformers

    blocks, batch_tokens = hf_kv_pages(max_c, longest_prompt, max_tokens, HF_PAGE)
    argv = [cli, "serve", "--continuous-batching", "--host", "127.0.0.1", "--port", "{port}",
            "--cb-block-size", str(HF_PAGE), "--cb-num-blocks", str(blocks), "--cb-max-batch-tokens", str(batch_tokens),
            "--log-level", "warning", model]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return ServerPlan("hf-serve", lambda c: CommandServer("transformers serve", argv, log_path=log_path,
                                                          startup_timeout=startup_timeout, env=env),
                      info={"engine": "transformers serve --continuous-batching", "version": transformers.__version__,
                            "command": argv, "gguf_dequantized": model_path.is_file()})
