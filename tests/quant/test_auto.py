"""quantization="auto": a low-bit GGUF file stays low-bit on CPU (int8 weights); float checkpoints,
other devices and other dtypes keep float weights; an explicit mode always wins."""
import pytest
import torch

from leaplm.errors import InvalidParamsError
from leaplm.models.load import build_model
from leaplm.quant import gguf_is_low_bit, resolve_quantization
from leaplm.quant.int8 import Int8Linear

from ..models.test_gguf import write_gguf


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    folder, ref = tiny_model_dir("llama-gqa-untied")
    tmp = tmp_path_factory.mktemp("auto")
    write_gguf(ref, "llama", tmp / "q8.gguf", f16=False, q8=True)
    write_gguf(ref, "llama", tmp / "f32.gguf", f16=False)
    write_gguf(ref, "llama", tmp / "f16.gguf", f16=True)
    return folder, tmp


def test_low_bit_files_are_told_from_float_ones(files):
    _, tmp = files
    assert gguf_is_low_bit(tmp / "q8.gguf")
    assert not gguf_is_low_bit(tmp / "f32.gguf") and not gguf_is_low_bit(tmp / "f16.gguf")


def test_auto_picks_int8_only_for_low_bit_gguf_on_cpu_in_float32(files):
    folder, tmp = files
    cpu, f32 = torch.device("cpu"), torch.float32
    assert resolve_quantization("auto", tmp / "q8.gguf", cpu, f32) == "int8"
    assert resolve_quantization("auto", tmp / "f16.gguf", cpu, f32) is None
    assert resolve_quantization("auto", folder, cpu, f32) is None                       # safetensors folder
    assert resolve_quantization("auto", tmp / "q8.gguf", cpu, torch.bfloat16) is None   # asked for bf16
    assert resolve_quantization("auto", tmp / "q8.gguf", "cuda", torch.bfloat16) is None
    assert resolve_quantization(None, tmp / "q8.gguf", cpu, f32) is None                # explicit float wins
    assert resolve_quantization("int8", folder, cpu, f32) == "int8"                    # explicit int8 wins
    with pytest.raises(InvalidParamsError, match="auto, none, int8"):
        resolve_quantization("int3", folder, cpu, f32)


def test_build_model_resolves_auto(files):
    _, tmp = files
    q = build_model(tmp / "q8.gguf", quantization="auto")
    assert q.quantization == "int8" and any(isinstance(m, Int8Linear) for m in q.modules())
    f = build_model(tmp / "f32.gguf", quantization="auto")
    assert getattr(f, "quantization", None) is None


def test_auto_on_a_corrupt_gguf_names_the_file(tmp_path):
    from leaplm.errors import CorruptModelError

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)
    with pytest.raises(CorruptModelError, match="cut.gguf"):
        resolve_quantization("auto", bad, torch.device("cpu"), torch.float32)
