"""int4 weights (quant/int4.py + leaplm_native::int4_linear): the packing round-trips a 4-bit grid, the
kernel matches the dequantized weight within activation-quantization error and computes its own quantized
arithmetic exactly (up to float32 rounding) at every width from 1 to 16 rows, rows are bit-identical
whatever the batch and thread count, and an int4 model decodes deterministically, close to float, with
speculation equal to its own greedy output."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from leaplm import native
from leaplm.engine import Engine
from leaplm.models.load import build_model
from leaplm.quant import quantize_model
from leaplm.quant.int4 import Int4Linear, quantize_weight_int4, unpack_int4
from leaplm.quant.int8 import Int8Linear
from leaplm.sampling import SamplingParams
from leaplm.speculative.drafters import PromptLookup, TokenRecycling

# a build failure is itself a failure in tests/native (test_the_native_ops_build_here)
pytestmark = pytest.mark.skipif(not native.load(), reason="int4 kernel needs leaplm's native ops")


def _grid_weight(out_f=24, in_f=64, seed=0):
    """A weight that lies exactly on a 4-bit grid per group of 32 (each group uses q = 0 and 15), with
    float16 scale and minimum: what a GGUF Q4_1 tensor dequantizes to."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_f, in_f // 32, 32), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    scale = (torch.rand(out_f, in_f // 32, 1, generator=gen) * 0.1 + 0.01).half().float()   # as GGUF Q4_1 stores
    low = (torch.randn(out_f, in_f // 32, 1, generator=gen) * 0.1).half().float()
    return (q * scale + low).reshape(out_f, in_f)


def test_packing_round_trips_a_4_bit_grid():
    w = _grid_weight()
    module = Int4Linear.from_weight(w)
    torch.testing.assert_close(module.dequantized_weight(), w, rtol=1e-6, atol=1e-6)
    q, scale, minv = quantize_weight_int4(w)
    assert q.dtype == torch.uint8 and q.shape == (24, 2, 32) and int(q.max()) == 15 and scale.shape == (24, 2)
    assert module.qweight.shape == (2, 2, 256) and module.scale.shape == module.minv.shape == (2, 2, 16)
    assert torch.equal(unpack_int4(module.qweight, 24), q)


@pytest.mark.parametrize("in_f", [64, 576, 100])   # 100: padded to 128 with zero columns
def test_kernel_matches_the_dequantized_weight(in_f):
    torch.manual_seed(1)
    module = Int4Linear.from_weight(torch.randn(40, in_f) * 0.05, bias=torch.randn(40))
    x = torch.randn(6, in_f)
    ref = x @ module.dequantized_weight().T + module.bias
    y = module(x)
    assert y.shape == (6, 40)
    # activations are int8 per group of 32: ~0.5% relative error per product, less on the sum
    assert ((y - ref).norm() / ref.norm()).item() < 1e-2


def _kernel_reference(module: Int4Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``int4_linear`` computes (native/decode_ops.cpp), exactly, in float64: each row's activations are
    quantized per group of 32 as the kernel does in float32 (``xs = max|x| / 127``, ``xq = round(x * (127 /
    max|x|))`` to nearest even, clamped to +-127), then ``y[o] = sum_g xs_g * (scale[o, g] * (q[o, g] . xq_g) +
    minv[o, g] * sum(xq_g))`` (+ bias). Returns (y, the sum of the magnitudes of those 2G products and of the
    bias: the kernel's float32 roundings are relative to it; a group's two products often nearly cancel)."""
    in_p = module.qweight.shape[1] * 32
    xp = torch.nn.functional.pad(x.float(), (0, in_p - x.shape[1])).view(x.shape[0], -1, 32)     # [M, G, 32]
    amax = xp.abs().amax(-1, keepdim=True)
    xs = amax / 127.0                                                      # float32, as the kernel
    with np.errstate(divide="ignore"):   # float32 division as C++ rounds it (torch's 127 / t is 127 * (1 / t))
        inv = torch.from_numpy(np.where(amax.numpy() > 0, np.float32(127) / amax.numpy(), np.float32(0)))
    xq = torch.round(xp * inv).clamp(-127, 127).double()                    # exact small integers
    q = unpack_int4(module.qweight, module.out_features).double()           # [N, G, 32]
    G = q.shape[1]

    def per_output(t: torch.Tensor) -> torch.Tensor:                        # [B, G, 16] -> [N, G]
        return t.transpose(1, 2).reshape(-1, G)[: module.out_features].double()

    scale, minv = per_output(module.scale), per_output(module.minv)
    dots = torch.einsum("ngk,mgk->mng", q, xq)                              # integer dot products [M, N, G]
    xs = xs.double().view(x.shape[0], 1, G)
    weighted, shifted = xs * scale * dots, xs * minv * xq.sum(-1)[:, None, :]   # the kernel's two products
    y, size = (weighted + shifted).sum(-1), (weighted.abs() + shifted.abs()).sum(-1)
    if module.bias is not None:
        y, size = y + module.bias.double(), size + module.bias.double().abs()
    return y, size


def _rows(m: int, in_f: int, seed: int) -> torch.Tensor:
    """``m`` rows of very different scales, one with an outlier and one with an all-zero group of 32."""
    x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(seed)) * torch.logspace(-2, 1, m)[:, None]
    x[0, 3] *= 40
    x[-1, 32:64] = 0.0
    return x


@pytest.fixture(scope="module")
def int4_module():
    """40 outputs (the last block of 16 padded), 100 inputs (padded to 128 with zero columns), with bias."""
    gen = torch.Generator().manual_seed(11)
    return Int4Linear.from_weight(torch.randn(40, 100, generator=gen) * 0.05, bias=torch.randn(40, generator=gen))


@pytest.mark.parametrize("m", range(1, 17))   # 1: decoding; 2..16: verification passes of a chain or a tree
def test_kernel_computes_the_exact_dequantized_arithmetic(m, int4_module):
    """Every output equals the kernel's arithmetic done exactly (``_kernel_reference``) up to the float32
    rounding of its steps: per group two products and two fused multiply-adds, then the bias, each within
    2**-24 of the products' magnitudes (~7e-7 in all for 4 groups). A 1% error (an output or an activation
    scale off by 1%) is over 1e3 times that."""
    x = _rows(m, 100, seed=m)
    y = int4_module(x)
    ref, size = _kernel_reference(int4_module, x)
    groups = int4_module.qweight.shape[1]
    err = ((y.double() - ref).abs() / size).max().item()
    assert err <= (2 * groups + 4) * 2.0 ** -24, (
        f"int4 kernel off the exact arithmetic by {err:.3g} of its terms' magnitude ({m} rows)")


@pytest.mark.parametrize("m", range(2, 17))
def test_each_row_equals_its_single_row_call_bit_for_bit(m, int4_module):
    """Batch invariance at every verification width: row i of an m-row call is the 1-row call on row i."""
    x = _rows(m, 100, seed=100 + m)
    full = int4_module(x)
    for i in range(m):
        assert torch.equal(int4_module(x[i: i + 1]), full[i: i + 1]), f"row {i} of {m} differs from its own call"


def test_rows_are_bit_identical_whatever_the_batch_and_threads():
    torch.manual_seed(2)
    module = Int4Linear.from_weight(torch.randn(700, 96) * 0.05)   # 700 outputs (44 blocks, the last padded)
    x = torch.randn(9, 96)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = module(x)
        torch.set_num_threads(max(2, threads))
        many = module(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    for lo, hi in ((0, 1), (3, 4), (2, 7), (8, 9)):
        assert torch.equal(module(x[lo:hi]), many[lo:hi])


def test_the_float_fallback_computes_the_dequantized_product():
    torch.manual_seed(3)
    module = Int4Linear.from_weight(torch.randn(16, 64))
    module.native = False   # what a machine without a C++ compiler runs
    x = torch.randn(3, 64)
    torch.testing.assert_close(module(x), x @ module.dequantized_weight().T)


def test_misshapen_inputs_are_refused():
    module = Int4Linear.from_weight(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="packed for 64"):
        torch.ops.leaplm_native.int4_linear(torch.randn(1, 96), module.qweight, module.scale, module.minv, 8)
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.leaplm_native.int4_linear(torch.randn(1, 64), module.qweight, module.scale, module.minv, 17)


def test_an_int4_model_is_close_to_float_and_speculation_is_exact(tiny_model_dir):
    folder = tiny_model_dir("llama-gqa-untied")[0]
    fp = build_model(folder)
    q4 = quantize_model(build_model(folder), "int4")
    assert q4.quantization == "int4" and q4.exact
    assert isinstance(q4.blocks[0].mlp.down, Int4Linear) and isinstance(q4.lm_head, Int8Linear)
    reference = quantize_model(build_model(folder), "int4")   # the same 4-bit weights, multiplied in float
    for module in reference.modules():
        if isinstance(module, Int4Linear):
            module.native = False
    tokens = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    for model in (fp, reference, q4):
        from leaplm.cache.kv import KVCache

        cache = KVCache.for_model(model.config, 1, 16, model.dtype, model.device)
        logits.append(model(tokens, torch.arange(12)[None], cache, kv_len=12, contiguous_start=0))

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(logits[2], logits[1]) < 0.03    # the kernel: int8 activations per group of 32
    assert rel(logits[2], logits[0]) < 0.3     # 4-bit random weights (no structure to keep): ~16% here
    engine = Engine(q4, eos_token_ids=[2])
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(3, 128, (6,), generator=gen).tolist()
    prompts = [base * 4, base[:3] * 5]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (30, 25)]
    vanilla = engine.start(prompts, params).run()
    assert [r.output_ids for r in engine.start(prompts, params).run()] == [r.output_ids for r in vanilla]
    for drafter in (PromptLookup(5), TokenRecycling(num_draft=8, node_cost=0.0)):
        spec = engine.start(prompts, params, drafter).run()
        assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla], drafter.name

