"""What the trained-head drafters (``eagle``, ``medusa``) share: sizing a candidate tree by its value.

A trained head scores every candidate node with the product of its draft probabilities along the node's path (a
path probability in ``(0, 1]``). ``TrainedDrafter.choose`` turns a candidate tree into the draft:

1. the ``budget`` likeliest nodes, closed under parents (a node is kept only after its parent);
2. of those, as many as pay for the wider verification pass: the count that maximises expected tokens per unit of
   pass time (``cost.best_prefix``), with the target's pass cost by nodes measured at ``bind``
   (``cost.pass_cost``; ``node_cost`` gives a linear cost instead, 0 keeps every node) and the path probabilities,
   **calibrated** by how many tokens the verified drafts actually got accepted, standing in for acceptance.

``lookup=True`` puts prompt lookup first (as Token Recycling does by default): when the context's last 2-3 tokens
occurred before and their continuation gives 2 tokens or more, that copy (at most 8 tokens) is the draft instead of
the head's; the head drafts otherwise. Copies are not booked in the head's calibration or acceptance counts.

The drafter also counts how many tokens each verified draft got accepted (``accepted_hist``), from which
``acceptance_by_depth()`` gives EAGLE's and Medusa's per-depth acceptance.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

from ...errors import InvalidParamsError
from ..cost import best_prefix, drafter_cost, pass_cost
from .base import Draft, Drafter, int_knob


class TrainedDrafter(Drafter):
    needs_hidden = True

    def __init__(self, name: str, num_draft: int, quantization: str | None, node_cost: float | None,
                 lookup: bool = False) -> None:
        self.num_draft = int_knob(name, "num_draft", num_draft, 1)
        if not isinstance(lookup, bool):
            raise InvalidParamsError(f"{name} lookup must be true or false, got {lookup!r}")
        from .prompt_lookup import PromptLookup

        self.lookup = PromptLookup(min(self.num_draft, 8)) if lookup else None
        if quantization not in (None, "int8"):
            raise InvalidParamsError(f"{name} quantization must be None or 'int8', got {quantization!r}")
        self.quantization = quantization
        if node_cost is not None and not (isinstance(node_cost, (int, float)) and not isinstance(node_cost, bool)
                                          and node_cost >= 0):
            raise InvalidParamsError(f"{name} node_cost must be None (measure) or a number >= 0, got {node_cost!r}")
        self.node_cost = node_cost
        self._pass_cost = drafter_cost(self.num_draft, node_cost)
        self._expected = self._hits = 0.0          # calibration: path probability drafted vs tokens accepted
        self.accepted_hist: list[int] = []         # [n]: verified drafts of which exactly n tokens were accepted
        self._drafted: dict[int, float] = {}       # row -> expected accepted tokens of its last (unverified) draft

    def bind_cost(self, target_model) -> None:
        """Measure the target's verification cost by nodes (unless ``node_cost`` fixed it)."""
        if self.node_cost is None:
            self._pass_cost = pass_cost(target_model, self.num_draft)

    def reset(self, row: int) -> None:
        self._drafted.pop(row, None)
        if self.lookup is not None:
            self.lookup.reset(row)

    def copy_draft(self, row: int, context: Sequence[int], k: int) -> Draft | None:
        """With ``lookup``: a prompt-lookup copy of 2 tokens or more, else None (the head drafts)."""
        if self.lookup is None or k < 1:
            return None
        copy = self.lookup.propose(row, context, k).tokens
        if len(copy) < 2:
            return None
        self._drafted.pop(row, None)
        return Draft(copy)

    def calibration(self) -> float:
        """Accepted tokens per unit of drafted path probability so far (prior: one expected, one taken)."""
        return (self._hits + 1.0) / (self._expected + 1.0)

    def count_verdict(self, row: int, tokens: Sequence[int]) -> None:
        """Book a verified draft's outcome (``committed``'s tokens: the pending token, then the accepted ones)."""
        expected = self._drafted.pop(row, 0.0)
        if expected:
            n = max(0, len(tokens) - 1)
            self._expected += expected
            self._hits += n
            self.accepted_hist += [0] * (n + 1 - len(self.accepted_hist))
            self.accepted_hist[n] += 1

    def acceptance_by_depth(self) -> list[float]:
        """``[d]``: the fraction of verified drafts whose accepted path reached depth ``d + 1`` (EAGLE's and Medusa's
        per-depth acceptance; their sum + 1 is the mean tokens per pass of drafted steps)."""
        total = sum(self.accepted_hist)
        if not total:
            return []
        return [sum(self.accepted_hist[d:]) / total for d in range(1, len(self.accepted_hist))]

    def choose(self, row: int, tokens: list[int], parents: list[int], scores: list[float], budget: int,
               context_len: int) -> Draft:
        """The draft from a candidate tree (``parents`` topological, ``-1`` = child of the pending token; ``scores``
        log path probabilities): see the module docstring."""
        keep: list[int] = []
        kept = set()
        for i in sorted(range(len(tokens)), key=lambda i: (-scores[i], i)):
            if parents[i] < 0 or parents[i] in kept:
                keep.append(i)
                kept.add(i)
                if len(keep) == budget:
                    break
        if not keep:
            return Draft([])
        calibration = self.calibration()
        accepts = [min(1.0, math.exp(scores[i]) * calibration) for i in keep]
        cost = self._pass_cost.at(context_len)
        n = max(1, best_prefix(accepts[: len(cost) - 1], cost))
        self._drafted[row] = sum(accepts[:n])
        keep = sorted(keep[:n])   # parents come before children in creation order
        new_index = {node: j for j, node in enumerate(keep)}
        out_tokens = [tokens[i] for i in keep]
        out_parents = [-1 if parents[i] < 0 else new_index[parents[i]] for i in keep]
        if all(p == j - 1 for j, p in enumerate(out_parents)):
            return Draft(out_tokens)   # a chain
        return Draft(out_tokens, parents=out_parents)


def int8_linears(module, names: Sequence[str], lm: Tensor | None = None):
    """Replace ``module``'s ``nn.Linear`` attributes ``names`` by leaplm's int8 kernels (a trained head's weight bytes
    dominate its cost at batch 1; draft quality only moves acceptance). Returns an int8 ``lm`` matrix's layer
    (``[Vd, H]`` weight) when given one."""
    from torch import nn

    from ...quant.int8 import Int8Linear

    for name in names:
        layer = getattr(module, name)
        if isinstance(layer, nn.Linear):
            setattr(module, name, Int8Linear.from_weight(layer.weight.detach(), None if layer.bias is None
                                                         else layer.bias.detach()))
    return Int8Linear.from_weight(lm) if lm is not None else None
