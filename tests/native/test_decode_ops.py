"""The native C++ decode ops (leaplm/native): attention equal to a float64 reference for chains, trees,
windows and grouped heads, bit-identical whatever else shares the pass or how many threads run it;
the int8 GEMM equal to its stated integer arithmetic bit for bit; clear errors when misused."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from leaplm import native
from leaplm.quant.int8 import Int8Linear, pack_int8, quantize_weight, unpack_int8

pytestmark = pytest.mark.skipif(os.environ.get("LEAPLM_NATIVE") == "0", reason="native ops disabled (LEAPLM_NATIVE=0)")
ops = torch.ops.leaplm_native if native.load() else None


def test_the_native_ops_build_here():
    """The project installs ninja and needs gcc (as inductor does): the build must succeed, not skip."""
    assert native.available()
    # int8 weights use leaplm's kernel exactly where its VNNI loop is compiled in, fbgemm elsewhere
    assert Int8Linear.from_weight(torch.randn(16, 8)).native == native.fast_int8()


def test_the_amx_loop_runs_where_the_cpu_has_it():
    """int8_linear multiplies in AMX tiles where the CPU and OS allow (from 2 rows on by default; the
    bit-for-bit test below runs every shape through both loops)."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    expected = "amx_int8" in flags and native.fast_int8() and os.environ.get("LEAPLM_AMX") != "0"
    assert bool(ops.int8_amx()) == expected


def _cache(B=2, KV=2, cap=40, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ([torch.randn(B, KV, cap, D, generator=gen)], [torch.randn(B, KV, cap, D, generator=gen)])


def _bind(k, v, slots, T, spans, anc_off=None, anc=()):
    N = len(slots)
    anc_off = torch.tensor(anc_off if anc_off is not None else [0] * (N + 1))
    arrays = (torch.tensor(spans).reshape(N, 2), anc_off, torch.tensor(list(anc), dtype=torch.long))
    ops.bind_step(k, v, torch.tensor(slots), T, *arrays, *arrays)


def _reference(q, K, V, keys, scale):
    """q [H, D] over key slots ``keys`` of K, V [KV, S, D] (float64) -> [H * D]."""
    H, D = q.shape
    KV = K.shape[0]
    kk = K[:, keys].double().repeat_interleave(H // KV, 0)
    vv = V[:, keys].double().repeat_interleave(H // KV, 0)
    w = torch.softmax((q.double()[:, None] @ kk.transpose(1, 2))[:, 0] * scale, -1)
    return (w[:, None] @ vv)[:, 0].reshape(-1)


@pytest.mark.parametrize("D", [16, 24])   # 24: not a multiple of 16, the portable loop
def test_chain_pass_writes_the_cache_and_matches_the_reference(D):
    k_cache, v_cache = _cache(D=D)
    B, T, H, KV = 2, 3, 4, 2
    q, k, v = torch.randn(1, B * T, H, D), torch.randn(1, B * T, KV, D), torch.randn(1, B * T, KV, D)
    slots = [10, 11, 12, 7, 8, 9]          # ragged rows: row 0 at positions 10.., row 1 at 7..
    spans = [(0, 11), (0, 12), (0, 13), (0, 8), (0, 9), (0, 10)]
    _bind(k_cache, v_cache, slots, T, spans)
    out = ops.attend(q, k, v, 0, 0, 0.25)
    ops.unbind_step()
    for n, slot in enumerate(slots):
        b = n // T
        assert torch.equal(k_cache[0][b, :, slot], k[0, n]) and torch.equal(v_cache[0][b, :, slot], v[0, n])
        ref = _reference(q[0, n], k_cache[0][b], v_cache[0][b], list(range(*spans[n])), 0.25)
        torch.testing.assert_close(out[0, n].double(), ref, rtol=1e-5, atol=1e-5)


def test_tree_queries_see_the_committed_range_then_their_ancestors():
    k_cache, v_cache = _cache(B=1)
    # committed slots 0..9; fed nodes in slots 10..13 with parents [-1, 0, 0, 2]
    slots, anc_lists = [10, 11, 12, 13], [[10], [10, 11], [10, 12], [10, 12, 13]]
    off = [0]
    for a in anc_lists:
        off.append(off[-1] + len(a))
    q, k, v = torch.randn(1, 4, 4, 16), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16)
    _bind(k_cache, v_cache, slots, 4, [(2, 10)] * 4, off, [s for a in anc_lists for s in a])  # window cut at 2
    out = ops.attend(q, k, v, 0, 1, 0.3)
    ops.unbind_step()
    for n, anc in enumerate(anc_lists):
        ref = _reference(q[0, n], k_cache[0][0], v_cache[0][0], list(range(2, 10)) + anc, 0.3)
        torch.testing.assert_close(out[0, n].double(), ref, rtol=1e-5, atol=1e-5)


def test_a_query_is_bit_identical_alone_in_a_wide_pass_and_on_more_threads():
    """Speculation's lossless claim rests on this: a token's attention does not depend on the pass."""
    k_cache, v_cache = _cache(B=1, cap=3000, D=64, KV=3)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 8, n, 64, generator=gen) for n in (9, 3, 3))
    wide = [(0, 2001 + i) for i in range(8)]
    _bind(k_cache, v_cache, list(range(2000, 2008)), 8, wide)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = ops.attend(q, k, v, 0, 0, 0.125)
        torch.set_num_threads(max(2, threads))
        many = ops.attend(q, k, v, 0, 0, 0.125)   # 8 queries x 3 heads x 2000 keys: split across threads
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, many)
    for n in range(8):   # the same token fed alone, its keys already in the cache
        _bind(k_cache, v_cache, [2000 + n], 1, [wide[n]])
        alone = ops.attend(q[:, n: n + 1], k[:, n: n + 1], v[:, n: n + 1], 0, 0, 0.125)
        assert torch.equal(alone[0, 0], many[0, n])
    ops.unbind_step()


def test_attend_matches_sdpa_on_long_rows():
    k_cache, v_cache = _cache(B=1, cap=1500, D=64, KV=1)
    q, k, v = torch.randn(1, 1, 2, 64), torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)
    _bind(k_cache, v_cache, [1400], 1, [(0, 1401)])
    out = ops.attend(q, k, v, 0, 0, 0.125)
    ops.unbind_step()
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[0][:, :, :1401].expand(1, 2, -1, -1),
                                         v_cache[0][:, :, :1401].expand(1, 2, -1, -1), scale=0.125)
    torch.testing.assert_close(out.view(1, 2, 64), ref[0].transpose(0, 1).reshape(1, 2, 64), rtol=1e-5, atol=1e-5)


def _int8_reference(x: torch.Tensor, module: Int8Linear) -> torch.Tensor:
    """The kernel's arithmetic in torch: exact integer sums, then the same float32 steps."""
    amax = x.abs().amax(1, keepdim=True)
    xs = amax / 127
    xq = torch.round(x * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))).clamp(-127, 127)
    q = unpack_int8(module.qweight, module.out_features, module.in_features)
    isum = xq.double() @ q.double().T            # exact: integers far below 2**53
    return isum.float() * (xs * module.wscale[None, : module.out_features])


@pytest.mark.parametrize("rows,out_f,in_f", [(1, 96, 64), (5, 40, 30), (17, 300, 128), (33, 16, 4)])
def test_int8_linear_is_the_stated_integer_arithmetic_bit_for_bit(rows, out_f, in_f):
    """Every row count takes a different register or tile blocking; all equal the reference exactly."""
    torch.manual_seed(rows)
    module = Int8Linear(in_f, out_f, None, native=pack_int8(*quantize_weight(torch.randn(out_f, in_f))))
    x = torch.randn(rows, in_f)
    x[0] *= 40
    previous = ops.int8_amx_min_rows(10**9)   # the VNNI loop
    try:
        y = ops.int8_linear(x, module.qweight, module.wscale, module.comp, out_f)
        ops.int8_amx_min_rows(1)                 # the AMX loop where the CPU has it (else VNNI again)
        assert torch.equal(ops.int8_linear(x, module.qweight, module.wscale, module.comp, out_f), y)
    finally:
        ops.int8_amx_min_rows(previous)
    assert torch.equal(y, _int8_reference(x, module))
    assert torch.equal(ops.int8_linear(x[-1:], module.qweight, module.wscale, module.comp, out_f)[0], y[-1])


def test_misuse_is_refused_with_a_message():
    torch.manual_seed(0)
    module = Int8Linear(4, 8, None, native=pack_int8(*quantize_weight(torch.randn(8, 4))))
    with pytest.raises(RuntimeError, match="do not fit"):
        ops.int8_linear(torch.randn(1, 4), module.qweight, module.wscale, module.comp, 17)
    with pytest.raises(RuntimeError, match="packed for 64"):   # inputs are padded to whole AMX tiles
        ops.int8_linear(torch.randn(1, 65), module.qweight, module.wscale, module.comp, 8)
    with pytest.raises(ValueError, match="input has 6 features, the weight takes 4"):
        module(torch.randn(2, 6))
    ops.unbind_step()
    with pytest.raises(RuntimeError, match="outside a bound step"):
        ops.attend(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4), 0, 0, 1.0)
    k_cache, v_cache = _cache(B=1, cap=8, D=4, KV=1)
    with pytest.raises(RuntimeError, match="beyond the cache"):
        _bind(k_cache, v_cache, [8], 1, [(0, 9)])


@pytest.mark.parametrize("k", [1, 3, 8, 64])
def test_row_topk_is_a_stable_descending_sort_cut_to_k(k):
    """Largest first, equal values in index order (so k = 1 is torch.argmax's first maximum), whatever the
    row length (vector body and scalar tail), the number of rows (threads) or the stride; ties and -inf
    rows included."""
    gen = torch.Generator().manual_seed(k)
    for V in (k, 17, 100, 1001, 49152):
        if V < k:
            continue
        x = torch.randn(9, V, generator=gen)
        x[1] = (x[1] * 2).round()                    # many ties
        x[2] = float("-inf")                          # a fully masked row (a grammar allowing nothing)
        x[3, ::2] = float("-inf")
        x[4] = 0.0
        got = ops.row_topk(x, k)
        assert torch.equal(got, torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k])
        assert torch.equal(ops.row_topk(x, 1)[:, 0], x.argmax(-1))
        assert torch.equal(ops.row_topk(x[5:6], k), got[5:6])          # a row alone: same answer
    wide = torch.randn(4, 300, generator=gen)
    assert torch.equal(ops.row_topk(wide[:, :200], k), torch.sort(wide[:, :200], dim=-1, descending=True, stable=True).indices[:, :k])


def test_row_topk_ranks_nan_like_torch():
    x = torch.randn(3, 100)
    x[1, 50] = float("nan")
    x[2, 7] = x[2, 9] = float("nan")
    assert torch.equal(ops.row_topk(x, 1)[:, 0], x.argmax(-1))
    assert torch.equal(ops.row_topk(x, 1)[1], torch.tensor([50]))
    assert set(ops.row_topk(x, 2)[2].tolist()) == {7, 9}


def test_row_topk_refuses_bad_input():
    with pytest.raises(RuntimeError, match="k must be in 1..min"):
        ops.row_topk(torch.randn(2, 10), 11)
    with pytest.raises(RuntimeError, match="k must be in 1..min"):
        ops.row_topk(torch.randn(2, 100), 65)
    with pytest.raises(RuntimeError, match="float32"):
        ops.row_topk(torch.randn(2, 10, dtype=torch.float64), 1)
