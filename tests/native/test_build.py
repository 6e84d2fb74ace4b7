"""``native.needs_build()`` predicts whether ``native.load()`` compiles, without compiling (these tests never
rebuild the shared cache: other build folders are temporary copies), and ``load()`` says so when it does."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from leaplm import native


@pytest.fixture
def fresh_process(monkeypatch):
    """As if this process had not loaded the ops yet (the real state is restored afterwards)."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.delenv("LEAPLM_NATIVE", raising=False)


@pytest.fixture
def built():
    if not native.load():
        pytest.skip("the native ops cannot be built here")
    return native.build_directory()


def test_the_cached_build_needs_no_build(built, fresh_process):
    """Right after ``load()`` (which builds if needed) the shared cache holds this checkout's build."""
    if not all(src in (built / "build.ninja").read_text() for src in native._source_paths()):
        pytest.skip("another checkout rebuilt the shared torch_extensions cache meanwhile")
    assert (built / "leaplm_native_ops.so").is_file()
    assert native.needs_build() is False


def test_an_empty_extensions_folder_needs_a_build_and_is_left_untouched(tmp_path, fresh_process, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert native.build_directory() == tmp_path / "leaplm_native_ops"
    assert native.needs_build() is True
    assert list(tmp_path.iterdir()) == []


def _fake_build(folder, sources):
    """A build folder laid out as torch's (build.ninja naming ``sources``, torch's headers and leaplm's flags),
    built by ninja with a stand-in compiler that only touches its outputs: no real compilation."""
    import subprocess

    import torch

    folder.mkdir()
    cxx = folder / "fake-cxx"
    cxx.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && touch "$2"; shift; done\n')
    cxx.chmod(0o755)
    include = Path(torch.__file__).parent / "include"
    (folder / "build.ninja").write_text(f"""ninja_required_version = 1.3
cxx = {cxx}
cflags = -isystem {include} {' '.join(native._CFLAGS)}
rule compile
  command = $cxx -c $in -o $out $cflags
rule link
  command = $cxx $in -shared -o $out
""" + "".join(f"build {Path(src).stem}.o: compile {src}\n" for src in sources)
        + f"build leaplm_native_ops.so: link {' '.join(Path(src).stem + '.o' for src in sources)}\n"
        + "default leaplm_native_ops.so\n")
    ninja = shutil.which("ninja", path=native._ninja_path())
    if ninja is None:
        pytest.skip("ninja is not installed")
    subprocess.run([ninja, "-C", str(folder)], check=True, capture_output=True)


def test_a_stale_or_foreign_build_needs_a_build(tmp_path, fresh_process, monkeypatch):
    """A build of these sources with these flags that ninja finds up to date needs no build; one from another
    checkout's sources (torch would rewrite build.ninja) or with an output gone (ninja would redo it) does."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = native.build_directory()
    _fake_build(folder, native._source_paths())
    assert native.needs_build() is False
    ninja_file = folder / "build.ninja"
    text = ninja_file.read_text()
    ninja_file.write_text(text.replace(native._source_paths()[0], "/elsewhere/decode_ops.cpp"))
    assert native.needs_build() is True
    ninja_file.write_text(text)
    assert native.needs_build() is False
    ninja_file.write_text(text.replace(" -march=native", ""))   # other flags
    assert native.needs_build() is True
    ninja_file.write_text(text)
    (folder / "decode_ops.o").unlink()
    assert native.needs_build() is True


def test_nothing_to_build_once_loaded_or_when_disabled(tmp_path, monkeypatch, fresh_process):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))   # nothing built there
    monkeypatch.setenv("LEAPLM_NATIVE", "0")
    assert native.needs_build() is False
    monkeypatch.delenv("LEAPLM_NATIVE")
    monkeypatch.setattr(native, "_state", {"ok": True})
    assert native.needs_build() is False


@pytest.mark.parametrize("needs", [True, False])
def test_load_announces_a_build_on_stderr_only_when_it_builds(needs, fresh_process, monkeypatch, capsys):
    built = []
    monkeypatch.setattr(native, "needs_build", lambda: needs)
    monkeypatch.setattr(native, "_build", lambda verbose: built.append(verbose))
    monkeypatch.setattr(native, "_register_fakes", lambda: None)
    assert native.load() is True and built == [False]
    out, err = capsys.readouterr()
    assert out == "" and err == (native.BUILD_MESSAGE + "\n" if needs else "")
    assert native.BUILD_MESSAGE == "[leaplm] compiling native CPU ops (first run only, about a minute)"
