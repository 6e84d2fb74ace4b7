"""int4 weights (quant/int4.py + leaplm_native::int4_linear): the packing round-trips a 4-bit grid, the
kernel matches the dequantized weight within activation-quantization error, rows are bit-identical
whatever the batch and thread count, and an int4 model decodes deterministically, close to float, with
speculation equal to its own greedy output."""
from __future__ import annotations

import pytest
import torch

from leaplm import native
from leaplm.engine import Engine
from leaplm.models.load import build_model
from leaplm.quant import quantize_model
from leaplm.quant.int4 import Int4Linear, quantize_weight_int4, unpack_int4
from leaplm.quant.int8 import Int8Linear
from leaplm.sampling import SamplingParams
from leaplm.spec.drafters import PromptLookup, TokenRecycling

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

