"""Structured output: constrain generation to a JSON schema, a regex or a grammar.

Contract (details and tensor shapes in ``base.py``; the llguidance backend in ``llguidance_backend.py``)::

    compiled = compile_constraint(tokenizer, json_schema=schema, vocab_size=V)   # cached; raises
    c = compiled.new()                                  # per sequence, microseconds  InvalidConstraintError
    bitmask = allocate_bitmask(1, V)                    # int32 [1, W], W = ceil(V / 32)

Decode loop (one sequence; ``logits [1, V]``)::

    while not c.is_finished():
        if ff := c.forced():                 # optional jump-forward: append without sampling
            c.advance(ff); output += ff; feed ff to the model; continue
        c.fill_mask(bitmask[0])              # CPU, GIL released: can overlap the forward pass
        apply_bitmask_(logits, bitmask)      # -inf on disallowed ids, before penalties/temperature/top-k/top-p
        tok = sample(logits)
        if tok in eos_ids: break             # EOS is allowed only where c.can_stop()
        c.advance([tok])
    # is_finished(): the grammar cannot be extended -> finish as if EOS was sampled (finish_reason "stop")

Speculative verification (``draft`` of k ids, target ``logits [k + 1, V]``)::

    draft = draft[:c.validate(draft)]        # optional: do not verify ids the grammar rejects anyway
    masks = allocate_bitmask(len(draft) + 1, V)
    c.fill_draft_masks(draft, masks)         # row i: mask after draft[:i]; state unchanged
    apply_bitmask_(logits, masks)            # then verify as usual (greedy or speculative sampling)
    c.advance(verdict.tokens)                # accepted draft prefix + the correction/bonus token (stop at EOS)

A drafter that drafts under the constraint advances ``c`` by each draft token and calls ``c.rollback(k)``
before verification. Errors: ``InvalidConstraintError`` (compile time) and ``ConstraintError`` (a
disallowed token, a grammar step over its limits) from ``leaplm.errors``.
"""
from .base import (CompiledConstraint, Constraint, allocate_bitmask, apply_bitmask_, bitmask_width,
                   unpack_bitmask)

# The backend (and with it the llguidance package) loads on first use, so the engine and plain
# generation import without it — e.g. on a machine that has torch but not llguidance.
_BACKEND = ("DEFAULT_TIMEOUT_S", "LLGuidanceConstraint", "LLGuidanceGrammar", "check_constraint", "clear_cache",
            "compile_constraint", "fill_bitmasks", "llguidance_tokenizer")


def __getattr__(name: str):
    if name in _BACKEND:
        try:
            from . import llguidance_backend
        except ImportError as e:
            raise ImportError(f"structured output needs the llguidance package, which did not import ({e}); "
                              "install it: pip install 'llguidance>=1.9,<2'") from None
        return getattr(llguidance_backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CompiledConstraint", "Constraint", "allocate_bitmask", "apply_bitmask_", "bitmask_width", "unpack_bitmask",
    *_BACKEND,
]
