"""roofline: weight bytes per token are counted right; the profile returns a sane split."""
import pytest

from leaplm.bench.roofline import measure_bandwidth, profile_decode, weight_bytes_per_token
from leaplm.models.load import build_model


@pytest.mark.parametrize("name", ["llama-gqa-untied", "llama-mha-tied"])
def test_weight_bytes_count_every_matrix_once(name, tiny_model_dir):
    folder, ref = tiny_model_dir(name)
    model = build_model(folder)
    cfg = model.config
    expected = sum(p.numel() for p in ref.parameters()) * 4
    if not cfg.tie_word_embeddings:
        expected -= cfg.vocab_size * cfg.hidden_size * 4  # the untied embedding is a row lookup
    assert weight_bytes_per_token(model) == expected


def test_profile_and_bandwidth_report_numbers(tiny_model_dir):
    folder, _ = tiny_model_dir("llama-gqa-untied")
    prof = profile_decode(build_model(folder), tokens=6, prompt_len=8)
    assert prof["tokens_per_s"] > 0 and abs(sum(prof["time_split"].values()) - 1) < 1e-6
    bw = measure_bandwidth(size_mb=16, repeats=2)
    assert bw["matvec_gb_s"] > 0 and bw["reduction_gb_s"] > 0


def test_int8_weights_count_one_byte_each(tiny_model_dir):
    from leaplm.quant import quantize_model

    folder, ref = tiny_model_dir("llama-gqa-untied")
    model = quantize_model(build_model(folder), "int8")
    cfg = model.config
    matrices = [p for n, p in ref.named_parameters() if p.dim() == 2 and "embed" not in n]
    from leaplm.quant.int8 import Int8Linear

    if next(m for m in model.modules() if isinstance(m, Int8Linear)).native:   # int8 + scales + int32 row sums
        # (outputs: multiples of 16 here; inputs padded to whole AMX tiles of 64)
        expected = sum(p.shape[0] * (-(-p.shape[1] // 64) * 64) + 8 * p.shape[0] for p in matrices)
    else:                                                                            # fbgemm: int8 + sentinels + scales
        expected = sum(p.shape[0] * (p.shape[1] + 2) + 4 * p.shape[0] for p in matrices)
    expected += sum(p.numel() * 4 for n, p in ref.named_parameters() if p.dim() == 1)    # norms stay float
    assert weight_bytes_per_token(model) == expected
    assert expected < sum(p.numel() for p in ref.parameters()) * 4 / 2 - cfg.vocab_size * cfg.hidden_size * 2


def test_int4_weights_count_five_eighths_of_a_byte_each(tiny_model_dir):
    """Nibbles plus a float16 scale and minimum per group of 32: 20 bytes per 32 weights; the head int8."""
    from leaplm.quant import quantize_model

    folder, ref = tiny_model_dir("llama-gqa-untied")
    model = quantize_model(build_model(folder), "int4")
    cfg = model.config
    blocks = [p for n, p in ref.named_parameters() if p.dim() == 2 and "layers" in n]   # 64/96 wide: no padding
    head = ref.lm_head.weight
    expected = sum(p.numel() * 20 // 32 for p in blocks)
    expected += model.lm_head.weight_bytes()   # int8 (counted in the test above)
    expected += sum(p.numel() * 4 for n, p in ref.named_parameters() if p.dim() == 1)
    assert cfg.hidden_size % 32 == 0 and cfg.intermediate_size % 32 == 0
    assert weight_bytes_per_token(model) == expected
