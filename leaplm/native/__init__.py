"""Native (C++) CPU operators, built on this machine at first use: leaplm's int8, int4 and batch-invariant float32
GEMMs (eager and compiled) and the compiled decode step's attention.

``load()`` compiles ``decode_ops.cpp``, ``recycling_ops.cpp`` and ``f32_ops.cpp`` with ``torch.utils.cpp_extension``
(gcc, ninja; ~1 minute once, then cached under ``~/.cache/torch_extensions``, or ``$TORCH_EXTENSIONS_DIR``) and
returns whether the ops are usable; when it compiles it says so on stderr first (``needs_build()`` tells
beforehand, cheaply). On failure (no compiler, ``LEAPLM_NATIVE=0``) it warns once and returns False; the compiled
step then attends through the Python custom op (``leaplm::attend``), int8 weights run on fbgemm (``leaplm::int8_linear``
when compiled; another activation grid, so other last bits) and int4 weights on a float fallback.

Ops (``torch.ops.leaplm_native``; see the C++ file for contracts):

- ``int8_linear(x [M, K], qweight [N/16, K/4, 64] int8, wscale [N_p] float32, comp [N_p] int32, N) -> [M, N]``:
  int8 weights per output channel packed in blocks of 16 outputs (``quant/int8.py``), activations
  quantized to int8 per row inside.
- ``int4_linear(x [M, K], qweight [N/16, K/32, 256] uint8, scale, minv [N/16, K/32, 16], N) -> [M, N]``:
  4-bit weights in groups of 32 (``w = q * scale + minv``), packed in blocks of 16 outputs
  (``quant/int4.py``), activations quantized to int8 per row and group inside.
- ``f32_linear(x [M, K], wpacked [N/16, K, 16] float32, bias [N] or None, N) -> [M, N]``: float32 weights packed
  in blocks of 16 outputs (``quant/float32.py``); each output is one fused multiply-add chain over k in order
  (then ``+ bias``), so a row's result is bit-identical whatever M, its place in the batch or the thread split
  (``F.linear`` is not). ``f32_portable(on) -> bool`` runs the portable loop instead of AVX-512 (for tests).
- ``bind_step(k, v, slots [N], T, spans...)`` / ``unbind_step()``, and
  ``attend(q [1, N, H, D], k, v [1, N, KV, D], layer, kind, scale) -> [1, N, H * D]``: exact per-query
  attention over the bound cache (batch-invariant), float32.

- ``row_topk(x [N, V], k) -> [N, k]``: each row's k largest, ties in index order (``sampling.top_ids``).
- ``recycle_observe`` / ``recycle_grow``: Token Recycling's table updates and best-first tree
  (``speculative/drafters/recycling.py``, which keeps the Python reference; contracts in ``recycling_ops.cpp``).

``step_spans(step, sliding)`` turns a decode step's visible slots into ``bind_step``'s arrays.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

_lock = threading.Lock()
_state: dict[str, bool] = {}
_NAME = "leaplm_native_ops"
_SOURCES = ("decode_ops.cpp", "recycling_ops.cpp", "f32_ops.cpp")
# -fopenmp: at::parallel_for is OpenMP code inlined from ATen's headers (serial without it); the loader resolves
# libgomp.so.1 to the copy torch already loaded, so there is one thread pool
_CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
BUILD_MESSAGE = "[leaplm] compiling native CPU ops (first run only, about a minute)"


def available() -> bool:
    """Whether the native ops are loaded (without trying to build them)."""
    return _state.get("ok", False)


def needs_build() -> bool:
    """Whether ``load()`` would compile the ops (about a minute) rather than load a cached build: False once
    this process has loaded (or given up on) them, or with ``LEAPLM_NATIVE=0``; else True unless the build
    folder (``build_directory()``) holds the library, built from these sources' paths with these flags, and
    ninja (dry run, ~ms) has nothing to redo — in doubt (no ninja, another checkout's build) True. Reads only."""
    if "ok" in _state or os.environ.get("LEAPLM_NATIVE", "1") == "0":
        return False
    return not _build_is_current(build_directory())


def build_directory() -> Path:
    """Where ``torch.utils.cpp_extension.load`` builds and caches the ops: ``$TORCH_EXTENSIONS_DIR/<name>``, else
    ``<torch's default build root>/py<version>_<cpu|cuXY|rocmXY>/<name>`` (torch's own rule; nothing is created)."""
    import torch
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        if torch.version.hip is not None:
            accelerator = "rocm" + torch.version.hip.replace(".", "")
        elif torch.version.cuda is not None:
            accelerator = "cu" + torch.version.cuda.replace(".", "")
        else:
            accelerator = "cpu"
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(cpp_extension.get_default_build_root(), f"{python}_{accelerator}")
    return Path(root) / _NAME


def _build_is_current(folder: Path) -> bool:
    library, ninja_file = folder / f"{_NAME}.so", folder / "build.ninja"
    try:
        text = ninja_file.read_text(errors="replace") if library.is_file() else ""
    except OSError:   # absent or unreadable: a build is due
        return False
    # torch rewrites build.ninja with this checkout's source paths, this torch's headers and these flags:
    # other ones mean a rebuild
    import torch

    expected = [*_source_paths(), str(Path(torch.__file__).parent / "include"), *_CFLAGS]
    if not text or not all(part in text for part in expected):
        return False
    ninja = shutil.which("ninja", path=_ninja_path())
    if ninja is None:
        return False
    try:
        dry = subprocess.run([ninja, "-n", "-C", str(folder)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return dry.returncode == 0 and "no work to do" in dry.stdout


def _source_paths() -> list[str]:
    return [str(Path(__file__).with_name(name)) for name in _SOURCES]


def _ninja_path() -> str:
    """PATH with pip's ninja (its binary sits beside the package, which need not be on PATH) in front."""
    try:
        import ninja

        return ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        return os.environ.get("PATH", "")


def load(verbose: bool = False) -> bool:
    """Build (once per source version, cached on disk) and load the native ops; False if impossible. When it
    compiles (``needs_build()``), it first prints ``BUILD_MESSAGE`` to stderr."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        if os.environ.get("LEAPLM_NATIVE", "1") == "0":
            _state["ok"] = False
            return False
        try:
            if needs_build():
                print(BUILD_MESSAGE, file=sys.stderr, flush=True)
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

    os.environ["PATH"] = _ninja_path()
    cpp_extension.load(name=_NAME, sources=_source_paths(), is_python_module=False, extra_cflags=list(_CFLAGS),
                       extra_ldflags=list(_LDFLAGS), verbose=verbose)


def _register_fakes() -> None:
    @torch.library.register_fake("leaplm_native::int8_linear")
    def _int8_linear(x: Tensor, qweight: Tensor, wscale: Tensor, comp: Tensor, out_features: int) -> Tensor:
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("leaplm_native::int4_linear")
    def _int4_linear(x: Tensor, qweight: Tensor, scale: Tensor, minv: Tensor, out_features: int) -> Tensor:
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("leaplm_native::f32_linear")
    def _f32_linear(x: Tensor, wpacked: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
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
