"""A compiled decode step: ``torch.compile`` (inductor) of the transformer for decode and verify passes.

Why: at batch 1 a small model's eager decode step is mostly per-operator overhead, not arithmetic
(SmolLM2-135M int8 on 2 cores: ~60% of the step is Python, dispatch and small ops between the
matmuls; docs/benchmarks.md). Inductor fuses the element-wise work of a layer (norms, rotary, SiLU,
residuals, the int8 input scaling) into a few C++ loops and runs the whole step as one graph.

What is compiled: ``Transformer.forward`` for *decode-sized* passes (not a fresh prefill, at most
``EXACT_MAX_T`` tokens per row, every position's logits) — single-token decoding, chain and tree
verification. Prefill stays eager (it is compute-bound; overhead does not matter there).

Attention stays opaque to the compiler, as a custom op called from the graph, in two builds; so do the
int8/int4 GEMMs (``quant/``), which are native ops eager and compiled alike:

- native (C++, ``leaplm/native``; the default on CPU in float32 when it builds): ``leaplm_native::attend``
  writes the step's keys/values into the cache and attends per query over exactly the slots the query
  sees (batch-invariant by construction). The step's cache and geometry are bound once per step
  (``bind_step``). No Python runs between the graph's kernels: SmolLM2 int8 decoding went from 37 to 63
  tok/s with these ops (one-off measurement, same process conditions).
- Python (CUDA, other dtypes, no compiler, or ``compile(native=False)``): ``leaplm::attend(q, k, v, layer)``
  runs the eager model's attention (``Attention.attend``) on the *active step* set around the compiled call
  (``active``). Without a compiler int8 weights fall back to fbgemm: ``leaplm::int8_linear(x, handle,
  out)`` (``quant/int8.py``) finds the packed weight of the ``Int8Linear`` registered under ``handle`` (a
  packed weight is a TorchScript object, which dynamo cannot trace).

After the first (compiling) call, calls skip dynamo's guard evaluation and its per-call frame hook: the
code dynamo generated for the step is called as a plain function (``CompiledStep._find_direct``).

Exactness: every token of a compiled pass runs the same generated code whatever the number of rows and
tokens — the graph sees the ``B * T`` tokens as one row of ``N`` (1-D inputs, ``N`` *unbacked*:
dynamo's ``mark_unbacked``), so there is one graph for all decode-sized passes and no special case
for one token; only attention (a custom op) sees the ``[B, T]`` layout. Speculative decoding on a
compiled int8 model therefore reproduces the compiled model's own greedy decoding bit for bit (tested).
Compiled and eager passes are not bit-identical to each other (fused arithmetic rounds differently);
a model is either compiled or not for a whole generation.

Shapes: ``CompiledStep`` maps ``tokens, positions [B, T]`` to logits ``[B, T, vocab]`` float32, keeping the final hidden
states ``[B, T, hidden]`` in ``last_hidden`` (the graph
itself: ``[N]`` -> ``[1, N, vocab]``).
"""
from __future__ import annotations

import contextlib
import threading
import time
import types
from typing import Iterator

import torch
from torch import Tensor
from torch._dynamo.decorators import mark_unbacked

_local = threading.local()


@contextlib.contextmanager
def active(model, cache, step) -> Iterator[None]:
    """Make ``(model, cache, step)`` the target of ``leaplm::attend`` calls on this thread."""
    previous = getattr(_local, "step", None)
    _local.step = (model, cache, step)
    try:
        yield
    finally:
        _local.step = previous


# Low-level registration (a schema + a CPU/CUDA Python kernel): dispatching to it costs a few
# microseconds less per call than ``torch.library.custom_op``'s wrappers, which matters at ~150 calls
# per decode step. The op does not mutate its inputs (the cache is reached through the active step).
# ``leaplm::int8_linear`` is registered the same way next to ``Int8Linear`` (quant/int8.py).
_lib = torch.library.Library("leaplm", "FRAGMENT")
_lib.define("attend(Tensor q, Tensor k, Tensor v, int layer) -> Tensor")


def attend(q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
    """``q [1, N, H, D]``, ``k, v [1, N, KV, D]`` (rotated; the step's ``B * T`` tokens in row order) ->
    attention output ``[1, N, H * D]``; writes ``k, v`` into the active step's cache."""
    model, cache, step = _local.step
    B, T = step.positions.shape
    out = model.blocks[layer].attn.attend(q.view(B, T, *q.shape[2:]), k.view(B, T, *k.shape[2:]),
                                          v.view(B, T, *v.shape[2:]), cache, step)
    return out.view(q.shape[0], q.shape[1], out.shape[-1])


@torch.library.register_fake("leaplm::attend", lib=_lib)
def _attend_shape(q: Tensor, k: Tensor, v: Tensor, layer: int) -> Tensor:
    _, N, H, D = q.shape
    return q.new_empty(1, N, H * D)


for _key in ("CPU", "CUDA"):
    _lib.impl("attend", attend, _key)


def _inductor_options(model, native: bool) -> dict:
    """Inductor settings for the step.

    - CPU: single-threaded generated kernels. A decode step's element-wise work is a few rows of a few
      thousand floats, too little to split, and OpenMP regions with barriers between loops stall for
      milliseconds whenever another process holds a core (a tiny model's compiled generation took
      seconds instead of tens of milliseconds on a busy 2-core machine). The matmuls (leaplm's int8/int4
      kernels, fbgemm, or the float GEMM) keep torch's threads.
    - CPU with the native ops: ``cpp_wrapper`` — the code that calls the step's ~400 kernels and ops is
      generated C++ instead of Python, so each call costs no interpreter work (Qwen2.5-0.5B int8 decode:
      31 -> 38 tok/s; SmolLM2 ~1.2x; docs/benchmarks.md, session 8). Not with the Python fallback ops.
    - int8 weights: ``freezing`` — the float parameters left (norms, embedding) become constants of
      the compiled code instead of ~300 graph inputs checked on every call (SmolLM2 decode step:
      +13%, measured). Not for float weights, where freezing would repack every matrix into a second
      copy.
    """
    options = {"cpp.threads": 1} if model.device.type == "cpu" else {}
    if model.device.type == "cpu" and native:
        options["cpp_wrapper"] = True
    if model.quantization:
        options["freezing"] = True
    return options


def _use_native(model) -> bool:
    """Whether the step runs the C++ ops of ``leaplm.native`` (float32 on CPU, when they build)."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return False
    from .. import native

    return native.load()


class CompiledStep:
    """The compiled decode step of one ``Transformer`` (see the module docstring).

    ``__call__(tokens, positions [B, T]) -> logits [B, T, vocab]``; the caller activates the step
    (``active``). ``warm_up()`` compiles now (one dummy pass) instead of at the first decode step.
    """

    def __init__(self, model, native: bool | None = None) -> None:
        self.model = model
        self.compile_s: float | None = None
        self.native = _use_native(model) if native is None else native and _use_native(model)
        if self.native:
            for block in model.blocks:
                block.attn.native = True
        # a private copy of _body's code: dynamo keeps graphs per code object, so each model has its own
        # (one) cache entry — no recompile limit shared by every model of the process, and no other
        # model's graph that the guard-free calls of __call__ would have to tell apart
        body = types.FunctionType(CompiledStep._body.__code__.replace(), globals(), "_body")
        self._code = body.__code__
        self._fn = torch.compile(types.MethodType(body, self), dynamic=True, fullgraph=True,
                                 options=_inductor_options(model, self.native))
        self.direct = None   # the compiled graph's entry, called without dynamo (``_find_direct``)
        self.last_hidden: Tensor | None = None   # [B, T, hidden]: the last call's final hidden states

    def _body(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        torch._check(tokens.shape[0] >= 1)   # lets shape checks on the unbacked size resolve statically
        # the final hidden states come out too (the LM head's input, computed anyway): drafters with trained
        # heads draft from them (``Drafter.needs_hidden``)
        return self.model.layers_forward(tokens[None], positions[None], None, None, None, all_hidden=True)

    def run(self, tokens: Tensor, positions: Tensor, cache, step) -> Tensor:
        """The step's logits ``[B, T, vocab]`` with ``cache`` and ``step`` (a ``_Step``) active."""
        if not self.native:
            with active(self.model, cache, step):
                return self(tokens, positions)
        from .. import native

        full = native.step_spans(step, False)
        sliding = native.step_spans(step, True) if step.window is not None else full
        torch.ops.leaplm_native.bind_step(cache.k, cache.v, step.slots.reshape(-1), tokens.shape[1], *full, *sliding)
        try:
            return self(tokens, positions)
        finally:
            torch.ops.leaplm_native.unbind_step()

    def run_paged(self, tokens: Tensor, positions: Tensor, pool, step) -> Tensor:
        """A paged pass (``models/paged.py``): ``tokens``, ``positions [N]`` -> logits ``[1, N, vocab]``."""
        if not self.native:
            with active(self.model, pool, step):
                return self(tokens[None], positions[None])
        step.bind(pool)
        try:
            return self(tokens[None], positions[None])
        finally:
            step.unbind()

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        B, T = tokens.shape
        # the graph sees the step's tokens as one row of N = B * T: a 1-D input has no stride to guard on;
        # attention (the only op mixing tokens) takes the real [B, T] layout from the active step.
        # Fresh inference tensors: a tensor made outside inference mode would compile another graph.
        flat = [t.reshape(-1).clone() for t in (tokens, positions)]
        if self.direct is not None:   # compiled: the graph's own entry, no dynamo in between
            return self._split(self.direct(*flat), B, T)
        for t in flat:
            mark_unbacked(t, 0)
        if self.compile_s is None:   # the first call compiles
            start = time.perf_counter()
            out = self._fn(*flat)
            self.compile_s = time.perf_counter() - start
            self.direct = self._find_direct()
        else:
            # Later calls skip dynamo's ~1600 guards on the model's modules (SmolLM2 int8 decoding went from
            # 63 to 80 tok/s, measured). Safe here: this step's code object has one graph, which serves
            # every decode-sized pass (unbacked width), and nothing a guard watches changes after
            # compiling (the model's modules and weights are fixed).
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                out = self._fn(*flat)
        return self._split(out, B, T)

    def _split(self, out: tuple[Tensor, Tensor], B: int, T: int) -> Tensor:
        """The graph's ``(logits [1, N, V], hidden [1, N, H])`` -> logits ``[B, T, V]``; keeps the hidden states."""
        logits, hidden = out
        self.last_hidden = hidden.view(B, T, hidden.shape[-1])
        return logits.view(B, T, logits.shape[-1])

    def _find_direct(self):
        """The bytecode dynamo generated for ``_body`` (argument handling, then the compiled graph), as a
        plain method of this step, or None. Calling it skips dynamo's per-call frame hook and cache lookup:
        ~0.75 ms of a 7-8 ms SmolLM2 int8 step (measured; the same logits bit for bit). Safe for the same
        reasons guard evaluation is skipped below: one graph (``fullgraph``, unbacked width) serves every
        decode-sized pass, and nothing a guard watches changes after compiling. Only when dynamo holds
        exactly one entry for the step's private code object; the lookup is a debugging accessor of
        torch's, so any other shape of it falls back to the guarded call."""
        try:
            from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

            entries = _debug_get_cache_entry_list(self._code)
            if len(entries) != 1 or not isinstance(entries[0].code, types.CodeType):
                return None
            code = entries[0].code
            if code.co_argcount != self._code.co_argcount:
                return None
            # dynamo put the graph and its imports in the globals of _body's frame: this module's
            return types.MethodType(types.FunctionType(code, globals(), "_body_compiled"), self)
        except Exception:  # noqa: BLE001 - an accessor that moved or changed: keep the guarded call
            return None

    def warm_up(self) -> float:
        """Compile with one decode pass on a scratch cache; returns the seconds it took."""
        from ..cache.kv import KVCache

        if self.compile_s is not None:
            return 0.0
        model = self.model
        cache = KVCache.for_model(model.config, 1, 4, model.dtype, model.device)
        tokens = torch.zeros(1, 2, dtype=torch.long, device=model.device)
        positions = torch.arange(2, device=model.device)[None]
        model(tokens[:, :1], positions[:, :1], cache, kv_len=1, contiguous_start=0)   # prefill (eager)
        model(tokens[:, 1:], positions[:, 1:], cache, kv_len=2, contiguous_start=1)   # compiles
        return self.compile_s or 0.0
