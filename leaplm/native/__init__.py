"""Native (C++) CPU operators, built on this machine at first use: leaplm's int8 and int4 GEMMs (eager and
compiled) and the compiled decode step's attention.

``load()`` compiles ``decode_ops.cpp`` and ``recycling_ops.cpp`` with ``torch.utils.cpp_extension`` (gcc, ninja; ~1 minute once,
then cached under ``~/.cache/torch_extensions``) and returns whether the ops are usable. On failure
(no compiler, ``LEAPLM_NATIVE=0``) it warns once and returns False; the compiled step then attends
through the Python custom op (``leaplm::attend``), int8 weights run on fbgemm (``leaplm::int8_linear``
when compiled; another activation grid, so other last bits) and int4 weights on a float fallback.

Ops (``torch.ops.leaplm_native``; see the C++ file for contracts):

- ``int8_linear(x [M, K], qweight [N/16, K/4, 64] int8, wscale [N_p] float32, comp [N_p] int32, N) -> [M, N]``:
  int8 weights per output channel packed in blocks of 16 outputs (``quant/int8.py``), activations
  quantized to int8 per row inside.
- ``int4_linear(x [M, K], qweight [N/16, K/32, 256] uint8, scale, minv [N/16, K/32, 16], N) -> [M, N]``:
  4-bit weights in groups of 32 (``w = q * scale + minv``), packed in blocks of 16 outputs
  (``quant/int4.py``), activations quantized to int8 per row and group inside.
- ``bind_step(k, v, slots [N], T, spans...)`` / ``unbind_step()``, and
  ``attend(q [1, N, H, D], k, v [1, N, KV, D], layer, kind, scale) -> [1, N, H * D]``: exact per-query
  attention over the bound cache (batch-invariant), float32.

- ``row_topk(x [N, V], k) -> [N, k]``: each row's k largest, ties in index order (``sampling.top_ids``).
- ``recycle_observe`` / ``recycle_grow``: Token Recycling's table updates and best-first tree
  (``spec/drafters/recycling.py``, which keeps the Python reference; contracts in ``recycling_ops.cpp``).

``step_spans(step, sliding)`` turns a decode step's visible slots into ``bind_step``'s arrays.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

_lock = threading.Lock()
_state: dict[str, bool] = {}


def available() -> bool:
    """Whether the native ops are loaded (without trying to build them)."""
    return _state.get("ok", False)


def load(verbose: bool = False) -> bool:
    """Build (once per source version, cached on disk) and load the native ops; False if impossible."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        if os.environ.get("LEAPLM_NATIVE", "1") == "0":
            _state["ok"] = False
            return False
        try:
            _build(verbose)
            _register_fakes()
            _state["ok"] = True
        except Exception as exc:  # a missing compiler must not break generation: fall back, say why
            warnings.warn(f"leaplm's native CPU ops could not be built ({type(exc).__name__}: {exc}); the "
                          "compiled step uses the slower Python ops", RuntimeWarning, stacklevel=2)
            _state["ok"] = False
        return _state["ok"]


def _build(verbose: bool) -> None:
    from torch.utils import cpp_extension

    try:  # pip's ninja puts its binary beside the package, which need not be on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    sources = [str(Path(__file__).with_name(name)) for name in ("decode_ops.cpp", "recycling_ops.cpp")]
    if verbose:
        print("building leaplm's native CPU ops (once; about a minute) ...", flush=True)
    # -fopenmp: at::parallel_for is OpenMP code inlined from ATen's headers (serial without it); the
    # loader resolves libgomp.so.1 to the copy torch already loaded, so there is one thread pool
    cpp_extension.load(name="leaplm_native_ops", sources=sources, is_python_module=False,
                       extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], verbose=False)


def _register_fakes() -> None:
    @torch.library.register_fake("leaplm_native::int8_linear")
    def _int8_linear(x: Tensor, qweight: Tensor, wscale: Tensor, comp: Tensor, out_features: int) -> Tensor:
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("leaplm_native::int4_linear")
    def _int4_linear(x: Tensor, qweight: Tensor, scale: Tensor, minv: Tensor, out_features: int) -> Tensor:
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("leaplm_native::attend")
    def _attend(q: Tensor, k: Tensor, v: Tensor, layer: int, kind: int, scale: float) -> Tensor:
        _, N, H, D = q.shape
        return q.new_empty(1, N, H * D)


def fast_int8() -> bool:
    """Whether leaplm's int8 GEMM runs its AVX-512 VNNI loop here (``quant/int8.py`` uses fbgemm otherwise)."""
    return load() and bool(torch.ops.leaplm_native.int8_vnni())


def step_spans(step, sliding: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(span [N, 2] lo/hi, anc_off [N + 1], anc [M])`` int64 for the queries of ``step`` (a decode-sized
    ``models.transformer._Step``): query n sees slots ``lo..hi-1`` then ``anc[anc_off[n]:anc_off[n+1]]``."""
    span, off, anc = [], [0], []
    B = step.positions.shape[0]
    for b in range(B):
        for lo, hi, ancestors in step.visible_slots(b, sliding):
            span += (lo, hi)
            if ancestors is not None:
                anc += ancestors
            off.append(len(anc))
    return torch.tensor(span), torch.tensor(off), torch.tensor(anc, dtype=torch.long)
