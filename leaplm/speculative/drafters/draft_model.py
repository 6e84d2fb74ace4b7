"""A smaller model with the same tokenizer drafts for the target (Leviathan et al. 2023).

Per row the drafter keeps its own KV cache and the list of tokens whose keys/values it holds.
``propose(row, context, k)``: roll the cache back to the longest prefix shared with ``context``
(what the target accepted survives, rejected draft tokens are dropped), feed the rest of the
context in one pass, then draft token by token — greedy (argmax) for greedy requests, sampled
from the request's processed distribution (temperature, top-k/top-p/min-p; penalties are not
applied to the draft) otherwise, returning ``q`` so verification stays exact.

Draft length: at most ``num_draft``; with ``adaptive`` the cap follows acceptance
(``spec.adaptive.DraftLength``) and drafting stops early when the draft's top probability is
below ``confidence`` (0 disables it). Rows are drafted one after another (batch 1 each).

``draft_vocab=N`` shrinks the draft's LM head to the N lowest token ids plus every added/special
token (FR-Spec's frequency-ranked drafting; BPE and sentencepiece ids are roughly ordered by
frequency): on Qwen2.5 (152k tokens) the head is a quarter of the 0.5B draft's weight bytes. The
draft then never proposes a rare token; the target still produces any token.

Staged drafting (``staged``, on by default: ``staged.StagedChain``): the draft's own chain is speculated by
Token Recycling over the draft's candidates (``staged="prompt_lookup"`` for prompt lookup, ``False`` for one
token per draft pass). One draft pass feeds the chain's newest token (after a round, the tokens the target
accepted) and the inner tree after it; the chain follows the draft's own argmax (or sample) down the tree as
long as the tree holds it. The chain is the one the draft drafts alone; it takes fewer draft passes (Qwen
pair on HumanEval: ~1.8 draft passes per round against ~6, docs/benchmarks.md). Not in dynamic tree mode.

``lookup=True`` first tries prompt lookup (``PromptLookup``: the continuation of the context's last
2-3 tokens seen earlier); when it finds ``min_lookup`` tokens or more they are the draft (free, and
long where text is copied — code edits, quotes, summaries), else the model drafts. Lookup drafts
are deterministic (one-hot q), so mixing both stays lossless under sampling too.

Tree mode (``tree_top_k = m > 0``): the draft still runs its greedy chain (one draft pass per
token), and at each depth its next-best ``m`` tokens with draft probability at least
``tree_min_prob`` become alternative leaves under the previous chain token — free to draft (the
draft's distribution is already computed), paid for in target verification width. Of those, the
``tree_extra`` most likely ones (draft probability of the path) are kept, and of those only as many as
pay for the wider verification pass: the count that maximises expected tokens per unit of pass time,
with the draft's path probabilities standing in for acceptance and the target's pass cost by nodes
measured at bind (``spec.cost.pass_cost``; ``node_cost`` gives a linear cost instead, 0 keeps every
leaf; the leaves' probabilities are calibrated by how often verified leaves were taken). If the target
rejects the chain token at some depth but takes an alternative, that depth still gains a token. Tree drafts are deterministic (no q), so lossless under sampling too.
Dynamic tree mode (``tree_width = W > 1``, EAGLE-2 / DySpec style): the tree grows where the draft's
path probability is highest instead of along the greedy chain only. At each depth the W likeliest nodes
of the newest depth get children (their ``tree_top_k + 1`` likeliest next tokens; below the first only
those with probability >= ``tree_min_prob``), computed in one draft pass over the subtree holding them
(tree attention over the draft's cache; the subtree is fed again at each depth, and the compiled draft
step computes the LM head for each of its nodes: on a 2-core CPU this made the mode slower than the chain
for the Qwen pair despite more tokens per pass, docs/benchmarks.md); after as many depths as the chain
would draft, the ``num_draft + tree_extra`` likeliest nodes (by path probability, so every kept node's
parent is kept) are the draft. Deterministic, so lossless under sampling too.
``tree_candidates(row, context, k)`` returns these ingredients (the chain, the alternatives with
their path probabilities, and the draft's distribution after the context) for drafters that build
on the draft model (``rasd``); the draft cache is synced the same way.

A draft with a **different tokenizer** drafts through text (``token_bridge.TokenBridge``: universal
assisted decoding): its proposals are re-tokenized for the target and carry no q, which keeps
greedy and sampled output exact. This needs both tokenizers; without them a vocabulary mismatch
is refused.

The draft model is loaded lazily by ``bind(target_model, target_tokenizer)`` (``LLM`` calls it),
quantized to int8 by default: draft quality only changes how much is accepted, never the output.
Shapes: ``Draft.probs`` ``[n, V_target]`` (zero beyond the draft's vocabulary).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ...cache.kv import KVCache
from ...errors import InvalidParamsError
from ...sampling import SamplingParams, make_generator, processed_logits
from ..adaptive import DraftLength, accepted_prefix
from ..cost import best_prefix, drafter_cost, pass_cost
from ..tree import ancestor_matrix, compaction, depths
from .base import Draft, Drafter

from .staged import COMPILED_FEED_MAX  # noqa: E402  (defined beside its other user, no import cycle)


@dataclass
class _Row:
    params: SamplingParams
    length: DraftLength
    generator: torch.Generator | None = None
    cache: KVCache | None = None
    fed: list[int] = field(default_factory=list)   # tokens whose K/V the draft cache holds
    last_draft: list[int] = field(default_factory=list)
    last_base: int = 0                             # len(context) when last_draft was proposed
    last_by_model: bool = True                     # last_draft came from the model (not lookup)
    last_leaves: list[tuple[float, int, int]] = field(default_factory=list)   # tree mode: the leaves verified


@dataclass
class TreeCandidates:
    """What tree mode drafts from (``DraftModel.tree_candidates``).

    ``chain``: the greedy chain; ``alternatives``: ``(path probability, depth index, token)``, likeliest
    first, token ``token`` as a sibling of ``chain[depth]`` (under ``chain[depth - 1]``, the root for
    depth 0); ``root_probs``: the draft's distribution after the context ``[V_target]`` (None when the
    draft did not run: no room left in its window); ``chain_reach``: the draft probability of each chain
    prefix (``chain[: i + 1]``).
    """

    chain: list[int]
    alternatives: list[tuple[float, int, int]]
    root_probs: torch.Tensor | None
    chain_reach: list[float] = field(default_factory=list)

    def draft(self) -> Draft:
        """The chain with every alternative as a leaf, in depth order (a plain chain without alternatives)."""
        tokens, parents, chain_index = [], [], []
        by_depth: dict[int, list[int]] = {}
        for _, depth, token in self.alternatives:
            by_depth.setdefault(depth, []).append(token)
        for depth, token in enumerate(self.chain):
            parent = chain_index[-1] if chain_index else -1
            chain_index.append(len(tokens))
            tokens.append(token)
            parents.append(parent)
            for alt in by_depth.get(depth, []):
                tokens.append(alt)
                parents.append(parent)
        return Draft(tokens, parents=parents) if len(tokens) > len(self.chain) else Draft(tokens)


class DraftModel(Drafter):
    name = "draft_model"

    def __init__(self, model: str | os.PathLike | torch.nn.Module, num_draft: int = 6, adaptive: bool = True,
                 confidence: float = 0.4, quantization: str | None = "int8", min_draft: int = 1,
                 lookup: bool = False, min_lookup: int = 2, draft_vocab: int | None = None,
                 tokenizer=None, download: bool = True, tree_top_k: int = 0, tree_extra: int = 6,
                 tree_min_prob: float = 0.05, tree_width: int = 1, node_cost: float | None = None,
                 staged=True) -> None:
        if not isinstance(num_draft, int) or num_draft < 1:
            raise InvalidParamsError(f"draft_model num_draft must be an integer >= 1, got {num_draft!r}")
        if not 1 <= min_draft <= num_draft:
            raise InvalidParamsError(f"draft_model needs 1 <= min_draft <= num_draft, got {min_draft}, {num_draft}")
        if not 0.0 <= confidence < 1.0:
            raise InvalidParamsError(f"draft_model confidence must be in [0, 1), got {confidence}")
        from ...quant import check_quantization

        self.quantization = check_quantization(quantization)
        self.num_draft, self.min_draft, self.adaptive, self.confidence = num_draft, min_draft, adaptive, confidence
        if draft_vocab is not None and (not isinstance(draft_vocab, int) or draft_vocab < 2):
            raise InvalidParamsError(f"draft_model draft_vocab must be an integer >= 2 (or None), got {draft_vocab!r}")
        self.draft_vocab = draft_vocab
        if not isinstance(tree_top_k, int) or tree_top_k < 0:
            raise InvalidParamsError(f"draft_model tree_top_k must be an integer >= 0 (0 = chain), got {tree_top_k!r}")
        if not isinstance(tree_extra, int) or tree_extra < 1:
            raise InvalidParamsError(f"draft_model tree_extra must be an integer >= 1, got {tree_extra!r}")
        if not 0.0 <= tree_min_prob < 1.0:
            raise InvalidParamsError(f"draft_model tree_min_prob must be in [0, 1), got {tree_min_prob}")
        if not isinstance(tree_width, int) or isinstance(tree_width, bool) or tree_width < 1:
            raise InvalidParamsError(f"draft_model tree_width must be an integer >= 1, got {tree_width!r}")
        if tree_width > 1 and not tree_top_k:
            raise InvalidParamsError("draft_model tree_width > 1 grows a tree: it needs tree_top_k >= 1")
        self.tree_top_k, self.tree_extra, self.tree_min_prob = tree_top_k, tree_extra, tree_min_prob
        self.tree_width = tree_width
        if node_cost is not None and not (isinstance(node_cost, (int, float)) and node_cost >= 0):
            raise InvalidParamsError(f"draft_model node_cost must be a number >= 0 (None = measure), got {node_cost!r}")
        self.node_cost = node_cost
        self.chain_draft = num_draft
        if tree_top_k:
            self.num_draft = num_draft + tree_extra   # the node budget the engine grants per step
        # the target's pass cost by nodes, which cuts tree mode's leaves (measured in bind unless node_cost given)
        self._pass_cost = drafter_cost(self.num_draft, node_cost)
        self.vocab_map: torch.Tensor | None = None   # draft head row -> token id, when shrunk
        self.download = download
        self.tokenizer = tokenizer          # the draft's tokenizer (loaded from the path when None)
        self.bridge = None
        from .prompt_lookup import PromptLookup

        self.lookup = PromptLookup(num_draft) if lookup else None
        self.min_lookup = min_lookup
        from .staged import make_inner

        self.inner = make_inner(staged)    # the drafter of the draft's own chain (staged drafting), or None
        self.model = model if isinstance(model, torch.nn.Module) else None
        self.model_spec = None if self.model is not None else str(model)
        self.model_path: Path | None = None
        self.target_vocab: int | None = None
        self._rows: dict[int, _Row] = {}
        # tree mode: verified leaves the target took, and what their draft path probabilities promised
        self._leaf_hits, self._leaf_expected = 0, 0.0

    # ------------------------------------------------------------------ set-up
    def bind(self, target_model, target_tokenizer=None) -> None:
        """Load the draft (if given by name/path) next to the target and check they are compatible."""
        from ... import hub
        from ...models.load import build_model
        from ...tokenizer import Tokenizer

        if self.model is None:
            self.model_path = hub.resolve(self.model_spec, download=self.download)
            quant = self.quantization if target_model.device.type == "cpu" else None
            self.model = build_model(self.model_path, dtype=target_model.dtype, device=target_model.device,
                                     quantization=quant)
        self.model.exact = False  # batch invariance matters for the target only; drafts are just proposals
        tcfg, dcfg = target_model.config, self.model.config
        self.bridge = None
        draft_tokenizer = self.tokenizer
        if draft_tokenizer is None and self.model_path is not None and target_tokenizer is not None:
            draft_tokenizer = self.tokenizer = Tokenizer.from_path(self.model_path)
        if draft_tokenizer is not None and target_tokenizer is not None:
            if not same_tokenizer(target_tokenizer, draft_tokenizer):
                from .token_bridge import TokenBridge

                self.bridge = TokenBridge(target_tokenizer, draft_tokenizer)
        elif dcfg.vocab_size != tcfg.vocab_size:
            raise InvalidParamsError(
                f"draft vocabulary ({dcfg.vocab_size} tokens) differs from the target's ({tcfg.vocab_size}) "
                "and there are no tokenizers to draft through text; give both tokenizers or use a draft with the "
                "target's tokenizer")
        if _params(self.model) > _params(target_model):
            warnings.warn(f"the draft model ({_params(self.model):,} parameters) is larger than the target "
                          f"({_params(target_model):,}): speculation will likely be slower than plain decoding",
                          stacklevel=3)
        self.target_vocab = tcfg.vocab_size
        if self.bridge is None and self.draft_vocab is not None and self.draft_vocab < min(dcfg.vocab_size, tcfg.vocab_size):
            keep = set(range(self.draft_vocab))
            if target_tokenizer is not None:
                keep |= set(target_tokenizer.eos_token_ids) | set(target_tokenizer.hf.added_tokens_decoder)
            keep_ids = torch.tensor(sorted(t for t in keep if t < min(dcfg.vocab_size, tcfg.vocab_size)))
            _shrink_head(self.model, keep_ids)
            self.vocab_map = keep_ids.to(self.model.device)
        if self.tree_top_k and self.tree_width == 1 and self.node_cost is None and self.bridge is None:
            self._pass_cost = pass_cost(target_model, self.num_draft)
        if getattr(target_model, "compiled", None) is not None and getattr(self.model, "compiled", 1) is None:
            self.model.compile()   # a compiled target gets a compiled draft (its decode steps: _feed)
        if self.inner is not None:
            self.inner.bind(self.model)   # its pass costs are the draft's (measured on the compiled draft)

    def start(self, row: int, params: SamplingParams) -> None:
        if self.model is None:
            raise InvalidParamsError("draft_model is not bound to a target: call bind(target_model) first")
        self._rows[row] = _Row(params, DraftLength(self.chain_draft, self.min_draft, self.adaptive),
                               None if params.greedy else make_generator(
                                   None if params.seed is None else params.seed + 1, self.model.device))

    def reset(self, row: int) -> None:
        self._rows.pop(row, None)
        if self.lookup is not None:
            self.lookup.reset(row)
        if self.inner is not None:
            self.inner.reset(row)

    # ------------------------------------------------------------------ drafting
    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:
        st = self._state(row, context)
        if self.lookup is not None:
            found = self.lookup.propose(row, context, k)
            if len(found.tokens) >= self.min_lookup:
                st.last_draft, st.last_base, st.last_by_model = found.tokens, len(context), False
                return found
        if self.tree_top_k and self.bridge is None:
            if self.tree_width > 1:
                return self._dynamic_tree(row, context, k)
            found = self.tree_candidates(row, context, k)
            found.alternatives = found.alternatives[: self._leaves_that_pay(found, len(context))]
            st.last_leaves = found.alternatives
            return found.draft()
        st.last_by_model = True
        k = min(k, st.length.k, self.chain_draft)
        if self.bridge is not None:
            return self._propose_through_text(st, row, context, k)
        if not self._room(st, len(context), k):
            return Draft([])
        steps = self._steps(st, row)
        logits = steps.start(context, k)
        tokens, qs = [], []
        for i in range(k):
            logits = self._full_vocab(logits)
            if st.params.greedy:
                if self.confidence > 0 and i > 0:
                    if float(logits.softmax(-1).max()) < self.confidence:
                        break
                token = int(logits.argmax())
            else:
                q = processed_logits(logits[None], st.params, None).softmax(-1)[0]
                if self.confidence > 0 and i > 0 and float(q.max()) < self.confidence:
                    break
                token = int(torch.multinomial(q, 1, generator=st.generator))
                qs.append(q)
            tokens.append(token)
            if i + 1 < k:
                logits = steps.next_logits(token, k - i - 1)
        steps.finish()
        st.last_draft, st.last_base = tokens, len(context)
        return Draft(tokens, torch.stack(qs) if qs else None)  # q rows are already [V_target] (_full_vocab)

    def _state(self, row: int, context: Sequence[int]) -> _Row:
        """The row's state (a greedy one when the engine never started the row), after the adaptive
        length learnt how much of the previous model draft ``context`` took. Idempotent per context."""
        st = self._rows.get(row)
        if st is None:
            self.start(row, SamplingParams(temperature=0.0))
            st = self._rows[row]
        if st.last_draft and st.last_by_model:
            grown = context[st.last_base:]
            accepted = accepted_prefix(st.last_draft, grown)
            st.length.update(len(st.last_draft), accepted)
            if st.last_leaves and len(grown) > accepted:   # did the target take one of tree mode's leaves?
                taken = grown[accepted]
                self._leaf_hits += any(d == accepted and t == taken for _, d, t in st.last_leaves)
                self._leaf_expected += sum(p for p, _, _ in st.last_leaves)
        st.last_draft, st.last_leaves = [], []   # learnt from; every proposal sets them again
        return st

    def tree_candidates(self, row: int, context: Sequence[int], k: int) -> TreeCandidates:
        """Tree mode's ingredients for a budget of ``k`` nodes (see the module docstring): the greedy chain
        (at most ``min(k, num_draft)`` tokens, the adaptive cap and ``confidence`` apply), the next-best
        ``tree_top_k`` tokens per depth with draft probability >= ``tree_min_prob`` (likeliest
        ``k - len(chain)`` kept) and the draft's distribution after ``context``. Deterministic (greedy,
        whatever the request's sampling parameters). Drafters that build on this one (RASD) call it
        directly; the draft cache is synced to ``context`` as ``propose`` does. Not through text: refused
        when the draft has another tokenizer."""
        if self.bridge is not None:
            raise InvalidParamsError("draft_model tree candidates need a draft with the target's tokenizer")
        st = self._state(row, context)
        st.last_by_model = True
        budget, k = k, min(k, st.length.k, self.chain_draft)
        if not self._room(st, len(context), k):
            return TreeCandidates([], [], None)
        steps = self._steps(st, row)
        logits = steps.start(context, k)
        chain: list[int] = []
        alternatives: list[tuple[float, int, int]] = []   # (path probability, depth index, token)
        root: torch.Tensor | None = None
        reach = 1.0                                         # draft probability of the chain so far
        chain_reach: list[float] = []
        for i in range(k):
            probs = self._full_vocab(logits).softmax(-1)
            if root is None:
                root = probs
            top = probs.topk(self.tree_top_k + 1)
            values, ids = top.values.tolist(), top.indices.tolist()
            if self.confidence > 0 and i > 0 and values[0] < self.confidence:
                break
            chain.append(ids[0])
            alternatives += [(reach * p, i, t) for p, t in zip(values[1:], ids[1:]) if p >= self.tree_min_prob]
            reach *= values[0]
            chain_reach.append(reach)
            if i + 1 < k:
                logits = steps.next_logits(ids[0], k - i - 1)
        steps.finish()
        st.last_draft, st.last_base = chain, len(context)
        return TreeCandidates(chain, sorted(alternatives, reverse=True)[: max(0, budget - len(chain))], root,
                              chain_reach)

    def _dynamic_tree(self, row: int, context: Sequence[int], k: int) -> Draft:
        """Dynamic tree mode (``tree_width = W > 1``, see the module docstring): depth by depth, the W nodes of
        the newest depth with the highest path probability get their ``tree_top_k + 1`` likeliest children
        (below the first, only those with probability >= ``tree_min_prob``) from one draft pass over the
        subtree that holds them; then the ``k`` likeliest nodes of all (at most ``num_draft + tree_extra``)
        are the draft — a tree, since a node is never likelier than its parent. Deterministic."""
        st = self._state(row, context)
        st.last_by_model = True
        budget, levels = min(k, self.num_draft), min(k, st.length.k, self.chain_draft)
        if not self._room(st, len(context), levels * self.tree_width):   # scratch slots for the widest subtree
            return Draft([])
        logits = self._sync(st, context)
        tokens: list[int] = []
        parents: list[int] = []
        reach: list[float] = []       # draft probability of each node's path

        def grow(parent: int, node_logits: torch.Tensor) -> list[int]:
            top = self._full_vocab(node_logits).softmax(-1).topk(self.tree_top_k + 1)
            kids = []
            for j, (p, t) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                if j and p < self.tree_min_prob:
                    break
                kids.append(len(tokens))
                tokens.append(t)
                parents.append(parent)
                reach.append((1.0 if parent < 0 else reach[parent]) * p)
            return kids

        newest = grow(-1, logits)
        for _ in range(levels - 1):
            expand = sorted(newest, key=lambda i: -reach[i])[: self.tree_width]
            held = set()                       # the expanded nodes and their ancestors, fed as one subtree
            for i in expand:
                while i >= 0 and i not in held:
                    held.add(i)
                    i = parents[i]
            feed = sorted(held)                # node order is topological: parents were grown first
            at = {node: f for f, node in enumerate(feed)}
            rows = self._feed_tree(st, [tokens[i] for i in feed], [at.get(parents[i], -1) for i in feed],
                                   [at[i] for i in expand])
            newest = [kid for i, node_logits in zip(expand, rows) for kid in grow(i, node_logits)]
        st.cache.commit(0, len(st.fed))        # the subtree's slots are scratch past the committed tokens
        # the likeliest nodes, earlier (so parents) first on ties: every kept node's parent is kept
        keep = sorted(sorted(range(len(tokens)), key=lambda i: (-reach[i], i))[:budget])
        index = {node: j for j, node in enumerate(keep)}
        chain, node = [], -1                   # the greedy path (first child each time) for the adaptive length
        while True:
            node = next((i for i in keep if parents[i] == node), None)
            if node is None:
                break
            chain.append(tokens[node])
        st.last_draft, st.last_base = chain, len(context)
        draft_parents = [index.get(parents[i], -1) for i in keep]
        if draft_parents == list(range(-1, len(keep) - 1)):
            return Draft([tokens[i] for i in keep])
        return Draft([tokens[i] for i in keep], parents=draft_parents)

    def _feed_tree(self, st: _Row, tokens: list[int], parents: list[int], want: list[int]) -> list[torch.Tensor]:
        """One draft pass over a subtree hanging off the last fed token (``parents[i]``: index into ``tokens``,
        -1 = that token, which is fed again as the root at its own slot); the logits after each node of
        ``want`` (indices into ``tokens``). Leaves the cache committed below the root."""
        base = len(st.fed) - 1
        st.cache.commit(0, base)
        logits = self._tree_pass(st, st.fed[-1], tokens, parents, base=base, want=want)
        if getattr(self.model, "compiled", None) is not None:   # every node's logits: pick the wanted ones
            logits = logits[[1 + w for w in want]]
        return list(logits)

    def _tree_pass(self, st: _Row, root: int, tokens: list[int], parents: list[int], base: int | None = None,
                   want: list[int] | None = None) -> torch.Tensor:
        """One draft pass feeding ``root`` at slot ``base`` (default ``len(st.fed)``) and the tree ``tokens``
        (``parents``: tree.py's convention) in the scratch slots after it, with tree attention; ``st.fed`` is
        left as it was (``_keep_path`` commits). Returns the logits after the root and every node
        ``[1 + n, V_draft]`` — or, eager and given ``want``, after those nodes only ``[len(want), V_draft]``."""
        base = len(st.fed) if base is None else base
        if not tokens:
            return self._contiguous_pass(st, [root], base)
        device = self.model.device
        n = len(tokens)
        feed = torch.tensor([[root] + tokens], device=device)
        compiled = getattr(self.model, "compiled", None) is not None
        positions = torch.tensor([[base] + [base + d for d in depths(parents)]], device=device)
        tree = ([base], ancestor_matrix(parents)[None].to(device))
        if compiled:
            # the compiled step computes every fed node's logits, still ~3x cheaper than an eager pass
            # that computes only the wanted ones (0.5B int8 draft, 4-13 nodes, measured on a 2-core CPU)
            return self.model(feed, positions, st.cache, kv_len=base + 1 + n, tree=tree)[0]
        index = list(range(1 + n)) if want is None else [1 + w for w in want]
        return self.model(feed, positions, st.cache, kv_len=base + 1 + n, tree=tree,
                          logit_index=torch.tensor([index], device=device))[0]

    def _keep_path(self, st: _Row, root: int, tokens: list[int], path: list[int]) -> None:
        """After ``_tree_pass`` at ``len(st.fed)``: commit the root and the tree nodes of ``path`` (root to leaf)
        to the draft cache, compacting their slots."""
        base = len(st.fed)
        st.cache.move(0, [(base + src, base + dst) for src, dst in compaction(path)])
        st.fed += [root] + [tokens[i] for i in path]
        st.cache.commit(0, len(st.fed))

    def _target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Draft head rows -> token ids (the identity unless ``draft_vocab`` shrank the head)."""
        return ids if self.vocab_map is None else self.vocab_map[ids]

    def _steps(self, st: _Row, row: int):
        """How this proposal's chain gets its logits: a staged chain (``staged.StagedChain``), or one draft
        pass per token (``_PlainSteps``); both ``start(ids, k)``, ``next_logits(token, remaining)``,
        ``finish()``."""
        if self.inner is None:
            return _PlainSteps(self, st)
        from .staged import StagedChain

        return StagedChain(self, st, row)

    def _leaves_that_pay(self, found: TreeCandidates, context_len: int) -> int:
        """How many of tree mode's alternative leaves (likeliest first) to verify beside the whole chain: the
        number that maximises expected tokens per unit of pass time (``best_prefix`` over the chain's then the
        leaves' path probabilities, standing in for acceptance; ``cost`` the target's pass cost, ``node_cost``:
        measured at bind when None, 0 keeps every leaf). The leaves' probabilities are calibrated by how often
        verified leaves were taken against how often their probabilities said they would be (prior: one
        expected, one taken), since the draft's confidence in its runner-up tokens need not match the
        target's."""
        cost = self._pass_cost.at(context_len)
        n = len(found.chain)
        calibration = (self._leaf_hits + 1.0) / (self._leaf_expected + 1.0)
        accepts = found.chain_reach + [p * calibration for p, _, _ in found.alternatives]
        return max(0, best_prefix(accepts[: len(cost) - 1], cost, keep=n) - n)

    def _propose_through_text(self, st: _Row, row: int, context: Sequence[int], k: int) -> Draft:
        """Greedy draft in the draft's own tokens, handed over as target tokens (no q: see token_bridge)."""
        ids = self.bridge.to_draft(context)
        if not self._room(st, len(ids), k):
            return Draft([])
        steps = self._steps(st, row)
        logits = steps.start(ids, k)
        new: list[int] = []
        for i in range(k):
            if self.confidence > 0 and i > 0 and float(logits.softmax(-1).max()) < self.confidence:
                break
            new.append(int(logits.argmax()))
            if i + 1 < k:
                logits = steps.next_logits(new[-1], k - i - 1)
        steps.finish()
        tokens = self.bridge.to_target(ids, new, k)
        st.last_draft, st.last_base = tokens, len(context)
        return Draft(tokens)

    def _room(self, st: _Row, length: int, k: int) -> bool:
        """Make sure the row's draft cache holds ``length + k + 1`` positions (False: beyond the draft's window)."""
        need = length + k + 1
        dcfg = self.model.config
        if need > dcfg.max_position_embeddings:
            st.last_draft = []
            return False
        if st.cache is None or st.cache.capacity < need:
            capacity = min(max(need, length + st.params.max_tokens + self.num_draft + 1), dcfg.max_position_embeddings)
            st.cache = KVCache.for_model(dcfg, 1, capacity, self.model.dtype, self.model.device)
            st.fed = []
        return True

    def _sync(self, st: _Row, ids: Sequence[int]) -> torch.Tensor:
        """Roll the draft cache back to its longest prefix shared with ``ids`` and feed the rest; returns
        the logits after ``ids`` (the last id is always re-fed to get them)."""
        return self._feed(st, self._rollback(st, ids))

    @staticmethod
    def _rollback(st: _Row, ids: Sequence[int]) -> list[int]:
        """Roll the draft cache back to its longest prefix shared with ``ids``, short of the last id; returns
        the ids to feed next (at least the last one)."""
        common = min(accepted_prefix(st.fed, ids), len(ids) - 1)
        st.fed = st.fed[:common]
        st.cache.commit(0, common)
        return list(ids[common:])

    def _full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits over the target's vocabulary ``[V_target]`` (-inf where the draft has no row)."""
        if self.vocab_map is None and logits.shape[-1] == self.target_vocab:
            return logits
        full = torch.full((self.target_vocab,), float("-inf"), device=logits.device)
        if self.vocab_map is None:
            n = min(self.target_vocab, logits.shape[-1])
            full[:n] = logits[:n]
        else:
            full[self.vocab_map] = logits
        return full

    def _feed(self, st: _Row, tokens: list[int]) -> torch.Tensor:
        """Run ``tokens`` after ``st.fed``; returns the logits after the last one ``[V_draft]``."""
        logits = self._contiguous_pass(st, tokens, len(st.fed))[-1]
        st.fed.extend(tokens)
        st.cache.commit(0, len(st.fed))
        return logits

    def _contiguous_pass(self, st: _Row, tokens: list[int], start: int) -> torch.Tensor:
        """Run ``tokens`` at slots ``start ..`` (``st.fed`` untouched); logits whose last row follows the last
        token: every position's ``[len(tokens), V_draft]`` from the compiled step, else the last one's only."""
        device = self.model.device
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(start, start + len(tokens), device=device)[None]
        if getattr(self.model, "compiled", None) is not None and start > 0 and len(tokens) <= COMPILED_FEED_MAX:
            # the compiled step computes every fed position's logits (it takes no logit_index)
            return self.model(ids, positions, st.cache, kv_len=start + len(tokens), contiguous_start=start)[0]
        return self.model(ids, positions, st.cache, kv_len=start + len(tokens), contiguous_start=start,
                          logit_index=torch.tensor([[len(tokens) - 1]], device=device))[0]


class _PlainSteps:
    """A chain drafted one draft pass per token (``staged=False``), behind ``staged.StagedChain``'s interface."""

    def __init__(self, owner: DraftModel, st: _Row) -> None:
        self.owner, self.st = owner, st

    def start(self, ids: Sequence[int], k: int) -> torch.Tensor:
        return self.owner._sync(self.st, ids)

    def next_logits(self, token: int, remaining: int) -> torch.Tensor:
        return self.owner._feed(self.st, [token])

    def finish(self) -> None:
        pass


def _shrink_head(model, keep_ids: torch.Tensor) -> None:
    """Replace the draft's LM head by its rows ``keep_ids`` (logits ``[..., len(keep_ids)]``)."""
    from ...models.layers import Linear
    from ...quant.int8 import Int8Linear

    head = model.lm_head
    if head is None:
        weight, bias = model.embed, None
    elif isinstance(head, Int8Linear):
        weight, bias = head.dequantized_weight(), head.bias
    else:
        weight, bias = head.weight, head.bias
    weight = weight[keep_ids.to(weight.device)]
    bias = None if bias is None else bias[keep_ids.to(bias.device)]
    if isinstance(head, Int8Linear) or (head is None and getattr(model, "quantization", None)):
        model.lm_head = Int8Linear.from_weight(weight, bias)
    else:
        new = Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        new.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
        if bias is not None:
            new.bias = torch.nn.Parameter(bias.contiguous(), requires_grad=False)
        model.lm_head = new


def _params(model) -> int:
    n = sum(p.numel() for p in model.parameters())
    n += sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "packed"))
    return n


def same_tokenizer(target, draft) -> bool:
    """Do the draft's token ids mean the same text as the target's? (Padding rows may differ.)"""
    tv, dv = target.hf.get_vocab(), draft.hf.get_vocab()
    differ = sum(1 for t in set(tv) & set(dv) if tv[t] != dv[t])
    missing = len(set(tv) ^ set(dv))
    return differ == 0 and missing <= 0.01 * len(tv)
