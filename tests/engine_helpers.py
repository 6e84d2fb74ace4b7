"""Test helpers for engine-level tests: a drafter that knows the answer but errs on purpose, and a
character-level tokenizer that lets ``LLM`` load the tiny random checkpoints of ``conftest.py``."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from leaplm.speculative.drafters import Draft, Drafter


class Oracle(Drafter):
    """A drafter that knows every row's reference output and proposes it with one wrong token.

    ``answers``: prompts, each followed by its reference output (e.g. vanilla greedy); a row's answer is
    the one its context is a prefix of (none: the engine already went wrong; the draft is empty). Each
    proposal is the next ``k`` tokens of the answer with the token at depth ``w`` replaced by another
    one, where ``w`` cycles through ``0 .. k`` from call to call: a correct verifier accepts exactly
    ``w`` tokens (all ``k`` when ``w == k``), so a generation goes through every rollback length.

    ``tree=True`` proposes a token tree whose accepted path is not the front of the feed order, so
    verification must follow root-to-node paths and the engine must compact the path's KV slots: feed
    order is a *decoy* chain of later answer tokens hanging off the root, then the answer chain (the
    wrong token at depth ``w``), with a wrong sibling before the answer's second node. Penalties
    computed over the feed order instead of the path would count the decoy's tokens.

    ``calls`` records ``(row, len(context), k)`` for every proposal.
    """

    name = "oracle"

    def __init__(self, answers: Sequence[Sequence[int]], num_draft: int = 5, tree: bool = False,
                 vocab_size: int = 128) -> None:
        self.answers = [list(a) for a in answers]
        self.num_draft, self.tree, self.vocab_size = num_draft, tree, vocab_size
        self.calls: list[tuple[int, int, int]] = []
        self._count: dict[int, int] = {}

    def reset(self, row: int) -> None:
        self._count[row] = 0

    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:
        self.calls.append((row, len(context), k))
        context = list(context)
        answer = next((a for a in self.answers if a[: len(context)] == context), [])
        truth = answer[len(context): len(context) + k]
        if not truth:
            return Draft([])
        count = self._count.get(row, 0)
        self._count[row] = count + 1
        wrong_at = count % (k + 1)
        chain = [self._other(t, {t}) if d == wrong_at else t for d, t in enumerate(truth)]
        if not self.tree or k < 4:
            return Draft(chain)
        return self._tree(truth, chain, k)

    def _tree(self, truth: list[int], chain: list[int], k: int) -> Draft:
        tokens: list[int] = []
        parents: list[int] = []

        def add(token: int, parent: int) -> int:
            tokens.append(token)
            parents.append(parent)
            return len(tokens) - 1

        decoy = [t for t in truth[1:] if t not in (chain[0], truth[0])][: max(1, k // 4)]
        decoy = decoy or [self._other(chain[0], {chain[0], truth[0]})]
        parent = -1
        for t in decoy:
            parent = add(t, parent)
        first = add(chain[0], -1)
        if len(chain) > 1:   # a wrong sibling of the answer's second node, fed before it
            add(self._other(chain[1], {chain[1], truth[1]}), first)
        parent = first
        for t in chain[1:]:
            if len(tokens) == k:
                break
            parent = add(t, parent)
        return Draft(tokens, parents=parents)

    def _other(self, token: int, avoid: set[int]) -> int:
        """A token id near ``token`` that is none of ``avoid`` (and no special id 0-2)."""
        candidate = token
        while candidate in avoid or candidate < 3:
            candidate = (candidate + 7) % self.vocab_size
        return candidate


# ---------------------------------------------------------------------- a tokenizer for tiny models
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n"]   # 12 + 96 ids: inside the tiny models' 128


def save_char_tokenizer(folder: Path, chat_template: str | None = None) -> None:
    """Save a character-level tokenizer (ids < 128; ``<s>`` = 1 and ``</s>`` = 2 as in the tiny configs;
    the special tokens of the ChatML, Llama-3 and Gemma chat formats are single ids) into ``folder``."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(folder))
