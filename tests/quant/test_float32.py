"""Batch-invariant float32 projections (quant/float32.py, native/f32_ops.cpp): the kernel computes exactly its
stated arithmetic (one fused multiply-add chain per output, k in order, then + bias), so every row is bit-identical
whatever the batch, the row's place in it or the thread count; close to float64; a swapped model stays within
float rounding of the original, its decode steps are bit-identical however tokens are grouped, eager and compiled."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leaplm import native
from leaplm.quant.float32 import InvariantLinear, make_batch_invariant, pack_weight, unpack_weight

NATIVE = os.environ.get("LEAPLM_NATIVE") != "0" and native.load()
needs_native = pytest.mark.skipif(not NATIVE, reason="leaplm's native ops are not available here")
ops = torch.ops.leaplm_native if NATIVE else None

# (K, N): K and N multiples of 16 or not, one output, a partial last block, several panels of 64 outputs
SHAPES = [(1, 1), (5, 3), (37, 50), (64, 16), (96, 200), (129, 67), (576, 130)]


def _inputs(M: int, K: int, seed: int) -> torch.Tensor:
    """Rows of very different scales (a shared scale or blocking by magnitude would show)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=gen) * torch.logspace(-2, 2, M)[:, None]


def _fma_chain_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's stated arithmetic, emulated exactly in numpy: acc = 0; acc = fma(x[m, k], w[o, k], acc) for
    k in order (each step rounded once to float32, to nearest even); y = acc + bias (rounded once)."""
    def round_once(p: np.ndarray, c: np.ndarray) -> np.ndarray:
        """float32(p + c) rounded once, for float64 p, c whose sum float64 may round: s + e == p + c exactly
        (TwoSum), and float32(s) is the right answer unless s sits exactly between two float32s with e != 0."""
        s = p + c
        bb = s - c
        e = (c - (s - bb)) + (p - bb)
        r = s.astype(np.float32)
        other = np.nextafter(r, np.where(s > r, np.float32(np.inf), np.float32(-np.inf)))
        tie = (r.astype(np.float64) + other.astype(np.float64)) / 2 == s
        toward_other = np.sign(e) == np.sign(other.astype(np.float64) - s)
        return np.where(tie & (e != 0) & toward_other, other, r)

    xs, ws = x.double().numpy(), w.double().numpy()
    acc = np.zeros((x.shape[0], w.shape[0]), dtype=np.float32)
    for k in range(x.shape[1]):
        acc = round_once(xs[:, k, None] * ws[None, :, k], acc.astype(np.float64))   # the product is exact in float64
    if bias is not None:
        acc = round_once(np.broadcast_to(bias.double().numpy(), acc.shape), acc.astype(np.float64))
    return torch.from_numpy(np.ascontiguousarray(acc))


def test_pack_weight_round_trips_and_pads_with_zeros():
    w = torch.randn(37, 9)
    packed = pack_weight(w)
    assert packed.shape == (3, 9, 16) and packed.dtype == torch.float32
    assert torch.equal(packed[1, 4], w[16:32, 4])             # out[b, k, i] = w[16 b + i, k]
    assert torch.equal(packed[2, :, 5:], torch.zeros(9, 11))  # outputs 37..47: padding
    assert torch.equal(unpack_weight(packed, 37), w)
    big = torch.randn(4096 + 21, 3)                           # over pack_weight's chunk of rows
    assert torch.equal(unpack_weight(pack_weight(big), big.shape[0]), big)


@needs_native
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("portable", [False, True])
def test_kernel_is_exactly_one_fma_chain_per_output(K, N, portable):
    """Bit for bit the stated arithmetic (so every row is the same chain whatever else is computed), with and
    without a bias, on the AVX-512 loop and the portable one (the same bits where the CPU has an FMA)."""
    gen = torch.Generator().manual_seed(K * 1000 + N)
    w, b = torch.randn(N, K, generator=gen) * 0.1, torch.randn(N, generator=gen)
    x = _inputs(13, K, seed=K + N)
    previous = ops.f32_portable(portable)
    try:
        for bias in (None, b):
            y = ops.f32_linear(x, pack_weight(w), bias, N)
            assert torch.equal(y, _fma_chain_reference(x, w, bias)), f"K={K} N={N} bias={bias is not None}"
    finally:
        ops.f32_portable(previous)


@needs_native
@pytest.mark.parametrize("K,N", SHAPES)
def test_each_row_is_bit_identical_whatever_the_batch(K, N):
    """Every row of an M-row call equals the row computed alone, for M = 1..17, 64, 300, in any order of the
    rows, on 1 or 2 threads."""
    gen = torch.Generator().manual_seed(N)
    lin = InvariantLinear.from_weight(torch.randn(N, K, generator=gen) * 0.1, torch.randn(N, generator=gen))
    x = _inputs(300, K, seed=K)
    alone = torch.cat([lin(x[j: j + 1]) for j in range(300)])
    for M in [*range(1, 18), 64, 300]:
        assert torch.equal(lin(x[:M]), alone[:M]), f"K={K} N={N}: a row of a {M}-row call differs from it alone"
    perm = torch.randperm(300, generator=gen)
    assert torch.equal(lin(x[perm[:123]]), alone[perm[:123]])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(lin(x), alone)
    finally:
        torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize("K,N", [(96, 200), (576, 130), (1536, 96)])
def test_close_to_float64(K, N):
    """Within the sequential-sum error bound: |y - y64| <= gamma_{K+1} * (sum_k |x_k w_k| + |b|), gamma_n =
    n u / (1 - n u), u = 2^-24 (the bound of K + 1 roundings in a chain); and far closer on average."""
    gen = torch.Generator().manual_seed(K)
    w, b = torch.randn(N, K, generator=gen) * 0.05, torch.randn(N, generator=gen)
    x = _inputs(20, K, seed=1)
    y = InvariantLinear.from_weight(w, b)(x).double()
    ref = x.double() @ w.double().T + b.double()
    size = x.double().abs() @ w.double().abs().T + b.double().abs()
    u = 2.0 ** -24
    gamma = (K + 1) * u / (1 - (K + 1) * u)
    err = (y - ref).abs() / size
    assert err.max().item() <= gamma, f"max error {err.max().item():.3g} of the sum of |terms| > bound {gamma:.3g}"
    assert err.mean().item() <= 20 * u   # typical chains err ~sqrt(K) u, not K u
    # and no worse than torch's own float32 GEMM, on the whole
    torch_err = ((F.linear(x, w, b).double() - ref).abs() / size).mean().item()
    assert err.mean().item() <= 3 * torch_err + u


@needs_native
def test_module_shapes_bias_dtype_and_errors():
    gen = torch.Generator().manual_seed(3)
    torch_lin = torch.nn.Linear(40, 24)
    lin = InvariantLinear.from_linear(torch_lin)
    x = torch.randn(2, 5, 40, generator=gen)
    y = lin(x)
    assert y.shape == (2, 5, 24) and y.dtype == torch.float32
    assert torch.equal(y, lin(x.reshape(10, 40)).reshape(2, 5, 24))   # 3-D input: the same rows
    torch.testing.assert_close(y, torch_lin(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(lin(torch.zeros(3, 40)), torch_lin.bias.detach().expand(3, -1))   # zero rows: the bias
    assert torch.equal(lin.dequantized_weight(), torch_lin.weight.detach())
    assert lin.weight_bytes() == 2 * 40 * 16 * 4 + 24 * 4
    assert lin(torch.zeros(0, 40)).shape == (0, 24)
    with pytest.raises(ValueError, match="input has 41 features, the weight takes 40"):
        lin(torch.randn(3, 41))
    with pytest.raises(ValueError, match="bias of shape"):
        InvariantLinear.from_weight(torch.randn(8, 4), torch.randn(9))
    with pytest.raises(RuntimeError, match="weight was packed for 40"):
        ops.f32_linear(torch.randn(2, 39), lin.packed, None, 24)
    with pytest.raises(RuntimeError, match="24 outputs do not fit 1 blocks"):
        ops.f32_linear(torch.randn(2, 40), lin.packed[:1].contiguous(), None, 24)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        ops.f32_linear(torch.randn(2, 40), lin.packed, torch.zeros(23), 24)


# ------------------------------------------------------------------------------------------- whole models

def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    from leaplm.cache.kv import KVCache

    B, T = tokens.shape
    cache = KVCache.for_model(model.config, B, T, torch.float32, "cpu")
    return model(tokens, torch.arange(T)[None].expand(B, -1), cache)


def test_nothing_changes_without_the_native_ops_or_off_float32(tiny_model_dir, monkeypatch):
    from leaplm.models.layers import Linear
    from leaplm.models.load import build_model

    folder, _ = tiny_model_dir("llama-gqa-untied")
    model = build_model(folder)
    monkeypatch.setattr(native, "load", lambda verbose=False: False)
    assert make_batch_invariant(model) == 0
    assert sum(isinstance(m, Linear) for m in model.modules()) == 13
    monkeypatch.undo()
    assert make_batch_invariant(build_model(folder, dtype=torch.bfloat16)) == 0


@needs_native
@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-bias"])   # untied head; tied head + qkv biases
def test_swapped_model_is_close_and_its_decode_steps_ignore_the_grouping(name, tiny_model_dir):
    from leaplm.cache.kv import KVCache
    from leaplm.models.layers import Linear
    from leaplm.models.load import build_model

    folder, _ = tiny_model_dir(name)
    ref, model = build_model(folder), build_model(folder)
    tied = model.lm_head is None
    assert make_batch_invariant(model) == 3 * 4 + 1            # qkv, o, gate_up, down per block; the head
    assert not any(isinstance(m, Linear) for m in model.modules())
    assert isinstance(model.lm_head, InvariantLinear) and tied == (name == "qwen2-bias")
    if tied:
        assert torch.equal(model.lm_head.dequantized_weight(), model.embed)
    assert make_batch_invariant(model) == 0                    # nothing left to swap
    tokens = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    a, b = _logits(ref, tokens), _logits(model, tokens)
    assert (a - b).abs().max().item() <= 1e-4

    # with exact (per-query) attention, a token's logits do not depend on how many tokens share its pass
    # or on the other rows (F.linear's weights break this: gemv at 1 row, gemm kernels blocked by M beyond)
    model.exact = True
    seqs = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(4))

    def run(groups, rows):
        cache = KVCache.for_model(model.config, len(rows), 40, torch.float32, "cpu")
        toks, at = seqs[rows], 20
        model(toks[:, :at], torch.arange(at)[None].expand(len(rows), -1), cache, kv_len=at, contiguous_start=0)
        out = []
        for g in groups:
            pos = torch.arange(at, at + g)[None].expand(len(rows), -1)
            out.append(model(toks[:, at: at + g], pos, cache, kv_len=at + g, contiguous_start=at))
            at += g
        return torch.cat(out, dim=1)

    one_by_one = run([1] * 10, [0])
    assert torch.equal(run([4, 1, 5], [0]), one_by_one)
    assert torch.equal(run([10], [0]), one_by_one)
    assert torch.equal(run([3, 7], [1, 0])[1:], one_by_one)


@needs_native
@pytest.mark.slow   # compiling the step: ~30-60 s on 2 cores
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_swapped_model_matches_eager_and_ignores_the_pass_width(tiny_model_dir):
    from leaplm.cache.kv import KVCache
    from leaplm.models.load import build_model

    folder, _ = tiny_model_dir("qwen2-bias")
    eager, compiled = build_model(folder), build_model(folder)
    assert make_batch_invariant(eager) == make_batch_invariant(compiled) == 13
    assert compiled.compile() > 0
    gen = torch.Generator().manual_seed(5)
    prompt, step = torch.randint(3, 100, (1, 8), generator=gen), torch.randint(3, 100, (1, 3), generator=gen)

    def run(model, widths):
        cache = KVCache.for_model(model.config, 1, 32, torch.float32, "cpu")
        model(prompt, torch.arange(8)[None], cache, kv_len=8, contiguous_start=0, logit_index=torch.tensor([[7]]))
        cache.commit(0, 8)
        start, parts = 8, []
        for w in widths:
            parts.append(model(step[:, start - 8: start - 8 + w], torch.arange(start, start + w)[None], cache,
                               kv_len=start + w, contiguous_start=start))
            start += w
        return torch.cat(parts, dim=1)

    wide, narrow = run(compiled, (3,)), run(compiled, (1, 1, 1))
    torch.testing.assert_close(wide, run(eager, (3,)), rtol=1e-4, atol=1e-4)
    assert torch.equal(wide, narrow)   # the compiled step's rows are invariant too
