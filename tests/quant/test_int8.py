"""Int8 projections: close to the float reference, the native kernel's quantized arithmetic exact (up to
float32 rounding), bit-identical per row whatever the batch, and a quantized model stays exact under
speculation (greedy) relative to itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from leaplm import native
from leaplm.engine import Engine
from leaplm.errors import InvalidParamsError
from leaplm.models.load import build_model
from leaplm.quant import check_quantization, quantize_model
from leaplm.quant.int8 import Int8Linear, quantize_weight, unpack_int8
from leaplm.sampling import SamplingParams
from leaplm.speculative.drafters import PromptLookup


def test_weight_quantization_is_symmetric_per_channel():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-2.0, 1.0, 0.1]])
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert torch.allclose(scale[[0, 2]], torch.tensor([1 / 127, 2 / 127]))
    assert torch.equal(q[1], torch.zeros(3, dtype=torch.int8))  # an all-zero row stays zero
    assert (q.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-7


def test_int8_linear_matches_its_dequantized_weight_within_tolerance():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(200, 96, generator=gen) * 0.05, torch.randn(200, generator=gen)
    lin = Int8Linear.from_weight(w, b)
    assert (lin.dequantized_weight() - w).abs().max() <= w.abs().amax(1).max() / 127 / 2 + 1e-6
    x = torch.randn(3, 5, 96, generator=gen)
    y, ref = lin(x), torch.nn.functional.linear(x, w, b)
    assert y.shape == (3, 5, 200)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < 0.02, rel                    # 8-bit activations per token + 8-bit weights
    assert torch.equal(lin(torch.zeros(2, 96)), b.expand(2, -1))  # a zero row gives the bias exactly


def test_each_row_is_bit_identical_whatever_else_is_in_the_batch():
    gen = torch.Generator().manual_seed(1)
    lin = Int8Linear.from_weight(torch.randn(300, 128, generator=gen) * 0.1)
    x = torch.randn(7, 128, generator=gen)
    x[3] *= 50  # an outlier row would change a shared activation scale
    full = lin(x)
    for i in range(7):
        assert torch.equal(lin(x[i: i + 1]), full[i: i + 1])
    assert torch.equal(lin(x[2:5]), full[2:5])


def _kernel_reference(lin: Int8Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``leaplm_native::int8_linear`` computes (native/decode_ops.cpp), exactly, in float64: each row's
    activations quantized as the kernel does in float32 (``xs = max|x| / 127``, ``xq = round(x * (127 / max|x|))``
    to nearest even, clamped to +-127), then ``y = (xq . q[o]) * xs * wscale[o]`` (+ bias). Returns (y, |y|
    before the bias + |bias|: what the kernel's float32 roundings are relative to)."""
    amax = x.abs().amax(-1, keepdim=True)
    xs = amax / 127.0                                                  # float32, as the kernel
    with np.errstate(divide="ignore"):   # float32 division as C++ rounds it (torch's 127 / t is 127 * (1 / t))
        inv = torch.from_numpy(np.where(amax.numpy() > 0, np.float32(127) / amax.numpy(), np.float32(0)))
    xq = torch.round(x * inv).clamp(-127, 127).double()
    q = unpack_int8(lin.qweight, lin.out_features, lin.in_features).double()
    y = (xq @ q.T) * xs.double() * lin.wscale[: lin.out_features].double()   # integer sums: exact in float64
    size = y.abs()
    if lin.bias is not None:
        y, size = y + lin.bias.double(), size + lin.bias.double().abs()
    return y, size


@pytest.mark.skipif(not native.fast_int8(), reason="the exact arithmetic of leaplm's native int8 kernel")
@pytest.mark.parametrize("m", [*range(1, 17), 17, 40])   # decoding, verification widths, the wide-pass tilings
def test_native_kernel_computes_the_exact_quantized_arithmetic(m):
    """Each output is the exact integer dot product scaled by ``xs * wscale`` (``_kernel_reference``) up to
    three float32 roundings (the scales' product, the output, the bias: 3 * 2**-24 of its magnitude); a 1%
    error is ~5e4 times that. And each row equals its own one-row call, bit for bit."""
    gen = torch.Generator().manual_seed(20 + m)
    lin = Int8Linear.from_weight(torch.randn(200, 96, generator=gen) * 0.05, torch.randn(200, generator=gen))
    assert lin.native
    x = torch.randn(m, 96, generator=gen) * torch.logspace(-2, 1, m)[:, None]
    x[-1, 5] *= 30   # an outlier sets its row's scale
    y = lin(x)
    ref, size = _kernel_reference(lin, x)
    err = ((y.double() - ref).abs() / size.clamp_min(1e-30)).max().item()
    assert err <= 3 * 2.0 ** -24, f"int8 kernel off the exact arithmetic by {err:.3g} of the output ({m} rows)"
    for i in range(m):
        assert torch.equal(lin(x[i: i + 1]), y[i: i + 1]), f"row {i} of {m} differs from its own call"


def test_bad_quantization_requests_are_refused():
    with pytest.raises(InvalidParamsError, match="unknown quantization 'int3'"):
        check_quantization("int3")
    with pytest.raises(InvalidParamsError, match="CPU only"):
        check_quantization("int8", "cuda")
    assert check_quantization("none") is None and check_quantization(None) is None


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-bias", "gemma3"])
def test_quantized_model_is_close_to_float_and_exact_under_speculation(name, tiny_model_dir):
    folder, _ = tiny_model_dir(name)
    ref = build_model(folder)
    q = build_model(folder, quantization="int8")
    assert q.quantization == "int8" and not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    from leaplm.cache.kv import KVCache

    tokens = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(20)[None]
    a = ref(tokens, pos, KVCache.for_model(ref.config, 1, 20, torch.float32, "cpu"))
    b = q(tokens, pos, KVCache.for_model(q.config, 1, 20, torch.float32, "cpu"))
    assert ((a - b).norm() / a.norm()).item() < 0.05
    # greedy speculation reproduces the quantized model's own greedy output, token for token
    engine = Engine(q, eos_token_ids=[2])
    prompts = [[5, 6, 7, 8] * 5, [9, 10, 11] * 4 + [5, 6, 7]]
    params = [SamplingParams(temperature=0, max_tokens=24)] * 2

    def run(drafter=None):
        return engine.start(prompts, params, drafter).run()

    vanilla, spec = run(), run(PromptLookup(num_draft=6, min_ngram=1))
    assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla]
    assert sum(r.accepted for r in spec) > 0


def test_quantize_model_needs_float32(tiny_model_dir):
    folder, _ = tiny_model_dir("llama-gqa-untied")
    model = build_model(folder, dtype=torch.bfloat16)
    with pytest.raises(InvalidParamsError, match="float32"):
        quantize_model(model, "int8")


@pytest.mark.parametrize("name", ["llama-gqa-untied", "mistral-sliding", "gemma3"])
def test_int8_decode_steps_are_bit_identical_however_tokens_are_grouped(name, tiny_model_dir):
    """The guarantee behind exact speculation on int8 weights: the logits of a token do not depend on
    how many tokens share its pass (verification) or on the other rows of the batch."""
    from leaplm.cache.kv import KVCache

    model = build_model(tiny_model_dir(name)[0], quantization="int8")
    gen = torch.Generator().manual_seed(4)
    seqs = torch.randint(3, 128, (2, 30), generator=gen)
    prefix = 20  # past the sliding window (8): the window path is covered too

    def run(groups, rows):
        cache = KVCache.for_model(model.config, len(rows), 40, torch.float32, "cpu")
        toks = seqs[rows]
        model(toks[:, :prefix], torch.arange(prefix)[None].expand(len(rows), -1), cache, kv_len=prefix, contiguous_start=0)
        out, at = [], prefix
        for g in groups:
            pos = torch.arange(at, at + g)[None].expand(len(rows), -1)
            out.append(model(toks[:, at: at + g], pos, cache, kv_len=at + g, contiguous_start=at))
            at += g
        return torch.cat(out, dim=1)

    one_by_one = run([1] * 10, [0])
    assert torch.equal(run([4, 1, 5], [0]), one_by_one)
    assert torch.equal(run([10], [0]), one_by_one)
    assert torch.equal(run([3, 7], [1, 0])[1:], one_by_one)   # another row beside it changes nothing
