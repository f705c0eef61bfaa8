"""An architecture's block plan: which kinds of block it stacks, how many of each and in what order.

A decoder-only Llama is one kind repeated L times; Gemma 2/3 alternate sliding-window and global
attention blocks; an MoE model mixes dense and sparse blocks; T5 stacks an encoder and a decoder
with cross-attention. The architecture declares the plan (`Architecture.stack`); everything else
(the simulation in `context.py`, the per-block sums in `estimator.py`, the peak moments in
`peaks.py`) reads it through this module and knows no layer-naming convention.

Why each kind is simulated twice, not once: the first block of a kind differs from the ones after
it. The very first block's input needs no gradient under an adapter method (so its first matmuls
save nothing for a weight gradient and skip an input gradient), and tensors shared by every block
of a kind (RoPE tables, an eager attention mask) are counted where autograd first saves them. From
its second occurrence on, a block of a kind sees exactly what the next one sees (same shapes,
dtypes and gradient flags), so the second simulated block stands for all the later ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ..errors import LoraCostError

PLAIN = "layer"  # the kind of a model whose blocks are all alike


@dataclass(frozen=True)
class BlockGroup:
    """`count` consecutive blocks of one kind (dense, sliding, global, moe, encoder, decoder...)."""

    kind: str
    count: int


@dataclass(frozen=True)
class Stack:
    """The ordered block groups of a model (consecutive groups of one kind are allowed)."""

    groups: tuple[BlockGroup, ...]

    def __post_init__(self) -> None:
        if not self.groups or any(g.count <= 0 for g in self.groups):
            raise LoraCostError("a model's block plan needs at least one block in every group")

    @classmethod
    def uniform(cls, layers: int, kind: str = PLAIN) -> "Stack":
        return cls((BlockGroup(kind, layers),))

    @classmethod
    def of(cls, kinds) -> "Stack":
        """The plan from one kind per layer, consecutive equal kinds grouped."""
        groups: list[BlockGroup] = []
        for kind in kinds:
            if groups and groups[-1].kind == kind:
                groups[-1] = BlockGroup(kind, groups[-1].count + 1)
            else:
                groups.append(BlockGroup(kind, 1))
        return cls(tuple(groups))

    @property
    def layers(self) -> int:
        return sum(g.count for g in self.groups)

    @cached_property
    def kinds(self) -> tuple[str, ...]:
        """Distinct kinds in order of first appearance."""
        return tuple(dict.fromkeys(g.kind for g in self.groups))

    @cached_property
    def scopes(self) -> tuple[str, ...]:
        """The simulated block that stands for each layer: `<kind>0` for the first block of a kind,
        `<kind>1` for every later one (see the module docstring)."""
        seen: set[str] = set()
        out = []
        for g in self.groups:
            for _ in range(g.count):
                out.append(f"{g.kind}{1 if g.kind in seen else 0}")
                seen.add(g.kind)
        return tuple(out)

    @cached_property
    def simulated(self) -> tuple[tuple[int, str, str], ...]:
        """(layer index, kind, scope) of the blocks the simulation runs, in layer order: each scope
        at its first position. Blocks in between are skipped: their input and output look like the
        last simulated block's."""
        out, done = [], set()
        for i, scope in enumerate(self.scopes):
            if scope not in done:
                done.add(scope)
                out.append((i, scope[:-1], scope))
        return tuple(out)

    @cached_property
    def block_scopes(self) -> tuple[str, ...]:
        return tuple(scope for _, _, scope in self.simulated)

    @cached_property
    def repetitions(self) -> dict[str, int]:
        """How many layers each simulated block stands for."""
        counts: dict[str, int] = {}
        for scope in self.scopes:
            counts[scope] = counts.get(scope, 0) + 1
        return counts

    @cached_property
    def first_and_last(self) -> tuple[tuple[str, int, int], ...]:
        """(kind, first layer index, last layer index) per kind: where the peak moments of backward sit."""
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        i = 0
        for g in self.groups:
            first.setdefault(g.kind, i)
            last[g.kind] = i + g.count - 1
            i += g.count
        return tuple((k, first[k], last[k]) for k in self.kinds)
