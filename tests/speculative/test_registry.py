"""The drafter registry (``leaplm.speculative.registry``) is the one list of speculative methods: every entry
builds through ``make_drafter`` with its required knobs (its cheapest configuration: a draft model by name,
loaded only at bind; a corpus of token id lists), its aliases resolve to it, a missing required knob or an
unknown method is refused with a message naming it, and the CLI's ``--spec``, the bench's ``--methods`` and
staged drafting's inner drafters are derived from it."""
from __future__ import annotations

import inspect
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import pytest

from leaplm.errors import InvalidParamsError
from leaplm.speculative import registry
from leaplm.speculative.drafters import ALIASES, DRAFTERS, Drafter, make_drafter

ROOT = Path(__file__).resolve().parents[2]
CHEAP = {"model": "some-draft-model", "corpus": [[1, 2, 3, 4, 1, 2, 3, 5]]}   # nothing loads before bind


HEADS: dict[str, str] = {}   # method -> a tiny untrained head folder of that method


@pytest.fixture(autouse=True, scope="module")
def _head_folders(tmp_path_factory):
    """``HEADS``: tiny untrained EAGLE, Medusa and Kangaroo folders (their weights are read when the drafter is
    built); ``CHEAP["path"]`` the EAGLE one."""
    from leaplm.speculative.heads.eagle import EagleConfig, EagleHead
    from leaplm.speculative.heads.kangaroo import KangarooAdapter, KangarooConfig
    from leaplm.speculative.heads.medusa import MedusaConfig, MedusaHeads

    geometry = dict(hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, vocab_size=16,
                    draft_vocab_size=4)
    for method, head in (("eagle", EagleHead(EagleConfig(intermediate_size=8, **geometry))),
                         ("medusa", MedusaHeads(MedusaConfig(hidden_size=8, num_heads=2, vocab_size=16,
                                                             draft_vocab_size=4))),
                         ("kangaroo", KangarooAdapter(KangarooConfig(exit_layer=1, **geometry)))):
        folder = tmp_path_factory.mktemp(f"{method}-head")
        head.save(folder)
        HEADS[method] = str(folder)
    CHEAP["path"] = HEADS["eagle"]
    yield
    CHEAP.pop("path")
    HEADS.clear()


def _required(info: registry.DrafterInfo) -> dict:
    return {k: HEADS.get(info.name, CHEAP[k]) if k == "path" else CHEAP[k] for k in info.needs}


@pytest.mark.parametrize("info", registry.DRAFTERS, ids=lambda i: i.name)
def test_every_registered_drafter_builds_under_every_spelling(info):
    for spelling in info.spellings:
        for spec in ({"method": spelling, **_required(info)},) + ((spelling,) if not info.needs else ()):
            drafter = make_drafter(spec)
            assert type(drafter) is DRAFTERS[info.name] and drafter.name == info.name, spec
    assert registry.resolve(info.name) is info and all(registry.resolve(a) is info for a in info.aliases)


@pytest.mark.parametrize("info", registry.DRAFTERS, ids=lambda i: i.name)
def test_bad_specs_are_refused_with_the_method_and_what_is_wrong(info):
    with pytest.raises(InvalidParamsError, match=f"bad options for {info.name}: .*no_such_knob"):
        make_drafter({"method": info.aliases[0] if info.aliases else info.name, "no_such_knob": 1, **_required(info)})
    for missing in info.needs:
        knobs = {k: v for k, v in _required(info).items() if k != missing}
        with pytest.raises(InvalidParamsError) as e:
            make_drafter({"method": info.name, **knobs})
        message = str(e.value)
        assert message.startswith(f"{info.name} needs ") and registry.KNOBS[missing].what in message.split(":")[0]
        assert registry.KNOBS[missing].flag in message and f"'{missing}': {registry.KNOBS[missing].value}" in message
        if len(info.needs) > 1:
            assert f"({missing} missing)" in message


def test_the_old_messages_stay():
    """The messages callers and the docs know, word for word where they were exact."""
    with pytest.raises(InvalidParamsError, match=r"^draft_model needs a draft model: \{'method': 'draft_model', "
                                                 r"'model': NAME_OR_PATH\} \(CLI: --draft-model\)$"):
        make_drafter("draft")
    with pytest.raises(InvalidParamsError, match=r"^retrieval needs a corpus: .*token id lists; CLI: --corpus\)$"):
        make_drafter("retrieval")
    with pytest.raises(InvalidParamsError, match=r"^rasd needs a draft model and a corpus \(model and corpus missing\)"):
        make_drafter("rasd")
    with pytest.raises(InvalidParamsError, match=r"unknown speculative method 'telepathy'; available: "
                                                 r"prompt_lookup \(pld\), copyspec, .*rasd, eagle, medusa, kangaroo$"):
        make_drafter("telepathy")
    with pytest.raises(InvalidParamsError, match=r"a speculative spec needs a 'method'"):
        make_drafter({"num_draft": 3})
    assert make_drafter(None) is None
    d = make_drafter("pld")
    assert make_drafter(d) is d


def test_the_package_tables_are_the_registry():
    assert list(DRAFTERS) == registry.names()
    assert ALIASES == {a: i.name for i in registry.DRAFTERS for a in i.aliases}
    assert registry.spellings() == [s for i in registry.DRAFTERS for s in i.spellings]
    # every public Drafter subclass defined in the package is registered (a new drafter cannot skip the registry),
    # except the bases that registered drafters share
    import importlib
    import pkgutil

    import leaplm.speculative.drafters as package

    defined = set()
    for found in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{found.name}")
        defined |= {c for c in vars(module).values() if isinstance(c, type) and issubclass(c, Drafter)
                    and c.__module__ == module.__name__ and c is not Drafter and not c.__name__.startswith("_")}
    bases = {c for c in defined if any(issubclass(d, c) and d is not c for d in DRAFTERS.values())}
    assert defined - bases == set(DRAFTERS.values())   # a shared base of registered drafters needs no entry


def test_classes_and_entries_that_disagree_fail_loudly():
    class Nameless(Drafter):
        name = "not_registered"

    with pytest.raises(RuntimeError, match=r"classes without an entry \['not_registered'\]"):
        registry.bind_classes([*DRAFTERS.values(), Nameless])
    with pytest.raises(RuntimeError, match=r"entries without a class \['rasd'\]"):
        registry.bind_classes([c for n, c in DRAFTERS.items() if n != "rasd"])
    twice = registry.DrafterInfo("other", "x", aliases=("pld",))
    with pytest.raises(ValueError, match="spelling 'pld' is registered twice"):
        registry._index([*registry.DRAFTERS, twice])
    with pytest.raises(ValueError, match="names knob 'voice'"):
        registry._index([registry.DrafterInfo("other", "x", needs=("voice",))])


# --------------------------------------------------------------------------- the CLI


def _spec_action():
    from leaplm.cli import build_parser

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    return next(a for a in generate._actions if "--spec" in a.option_strings)


def test_cli_spec_choices_are_the_registry():
    action = _spec_action()
    assert list(action.choices) == registry.spellings()
    for info in registry.DRAFTERS:
        assert info.cli_name in action.help


@pytest.mark.parametrize("info", registry.DRAFTERS, ids=lambda i: i.name)
def test_cli_flags_follow_the_registry(info):
    from leaplm.cli_common import speculative_spec

    flags = {k.dest: f"value-of-{k.dest}" for k in registry.KNOBS.values()}
    for spelling in info.spellings:
        given = {registry.KNOBS[k].dest: flags[registry.KNOBS[k].dest] for k in info.needs}
        spec = speculative_spec(Namespace(spec=spelling, num_draft=None, **given))
        assert spec == {"method": info.name, **{k: flags[registry.KNOBS[k].dest] for k in info.needs}}
        for knob in registry.KNOBS.values():
            args = Namespace(spec=spelling, num_draft=None, **{**given, knob.dest: 7})
            if info.takes(knob.name):
                assert speculative_spec(args)[knob.name] == 7
            else:
                with pytest.raises(InvalidParamsError, match=f"{knob.flag} is only used by --spec .*, not --spec {spelling}"):
                    speculative_spec(args)
        for knob in info.needs:
            without = {d: v for d, v in given.items() if d != registry.KNOBS[knob].dest}
            with pytest.raises(InvalidParamsError, match=f"--spec {spelling} needs {registry.KNOBS[knob].flag}"):
                speculative_spec(Namespace(spec=spelling, num_draft=None, **without))


def test_draft_model_alone_implies_the_drafter_that_needs_only_a_model():
    from leaplm.cli_common import speculative_spec

    spec = speculative_spec(Namespace(spec=None, draft_model="d.gguf", corpus=None, tree=None, num_draft=None))
    assert spec == {"method": "draft_model", "model": "d.gguf"}


def test_the_registry_and_the_cli_parser_load_without_torch():
    code = ("import sys; from leaplm.cli import build_parser; build_parser(); import leaplm.bench.methods as m; "
            "m.METHODS['rasd']; print(sorted(x for x in ('torch', 'leaplm.speculative.drafters') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr + out.stdout


def test_the_usage_guide_lists_the_cli_methods():
    usage = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    line = next(x for x in usage.splitlines() if "[--spec " in x)
    listed = line.split("[--spec ", 1)[1].split("]", 1)[0].split("|")
    assert listed == [i.cli_name for i in registry.DRAFTERS]


# --------------------------------------------------------------------------- the bench


def test_bench_methods_cover_the_registry():
    from leaplm.bench.methods import METHODS

    assert set(registry.spellings()) <= set(METHODS)
    for info in registry.DRAFTERS:
        taken = [n for n, p in inspect.signature(DRAFTERS[info.name]).parameters.items()
                 if n not in ("model", "tokenizer", "download", "progress")]
        for spelling in info.spellings:
            spec = METHODS[spelling]
            assert spec.lossless and spec.description.startswith(info.description)
            assert spec.knob_names() == taken


@pytest.mark.parametrize("info", [i for i in registry.DRAFTERS if i.needs], ids=lambda i: i.name)
def test_bench_methods_refuse_a_missing_requirement(info):
    from leaplm.bench import BenchError
    from leaplm.bench.methods import METHODS

    target = SimpleNamespace(draft_model_path=None if "model" in info.needs else Path("d"), contestant=info.name)
    first = next(k for k in info.needs)
    flag_or_knob = "--draft-model" if first == "model" else f"{info.name}:{first}={registry.KNOBS[first].value}"
    with pytest.raises(BenchError, match=f"method '{info.name}' needs .*{flag_or_knob}"):
        METHODS[info.name].fn(target, [1, 2, 3], None)


@pytest.mark.parametrize("info", [i for i in registry.DRAFTERS if not i.needs], ids=lambda i: i.name)
def test_bench_methods_without_requirements_are_lossless_on_a_tiny_model(info, tiny_model_dir):
    from leaplm.bench.methods import load_target, parse_method, vanilla
    from leaplm.sampling import SamplingParams

    folder, _ = tiny_model_dir("llama-gqa-untied")
    target = load_target(folder, need_tokenizer=False)
    params = SamplingParams(temperature=0, max_tokens=12)
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    want = vanilla(target, prompt, params).token_ids
    run = parse_method(info.aliases[0] if info.aliases else info.name)
    assert run(target, prompt, params).token_ids == want
    cached = [v for k, v in target.cache.items() if k[0] == run.label]
    assert run(target, prompt, params).token_ids == want
    again = [v for k, v in target.cache.items() if k[0] == run.label]
    assert len(cached) == 1 and again == cached and again[0] is cached[0]   # one drafter for all the requests


# --------------------------------------------------------------------------- staged drafting's inner drafters


def test_staged_inner_drafters_are_registered_and_resolve_aliases():
    from leaplm.speculative.drafters.staged import INNER_DRAFTERS, make_inner

    assert set(INNER_DRAFTERS) <= set(registry.names())
    for name in INNER_DRAFTERS:
        for spelling in registry.resolve(name).spellings:
            assert make_inner(spelling).name == name and make_inner({"method": spelling}).name == name
    assert make_inner(True).name == "recycling" and make_inner("false") is None
    for bad in ("draft_model", "draft", "copyspec", "telepathy"):
        with pytest.raises(InvalidParamsError, match=f"staged must be .*; got '{bad}'"):
            make_inner(bad)
    with pytest.raises(InvalidParamsError, match="bad options for prompt_lookup"):
        make_inner({"method": "pld", "no_such_knob": 1})
