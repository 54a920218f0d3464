"""The plain-data step between the engine core and the model runner, in both directions.

No engine objects cross it (no `Sequence`, no request): each sequence is named by its id and carries what the
runner needs this step. A sequence may compute any number of tokens in one step: a prefill chunk, one decode
token, or a decode token followed by k draft tokens to verify: a chain, each draft following the one before, or a
token tree (`SeqStep.draft_parents`), in which several drafts may follow the same token. Everything here pickles,
so a step can be sent to worker processes (tensor parallelism) as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from slipstream.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    """How to draw a sequence's next token(s)."""

    params: SamplingParams
    seed: int
    num_output_tokens: int  # output index of the first token this step draws (the sampler's counter)
    # Only when the params need penalties: every token the sequence has (prompt then outputs), and the prompt length.
    history: list[int] | None = None
    num_prompt_tokens: int = 0


# One prompt token's score (prompt_logprobs): its rank among the model's choices there (1 = most likely), and
# {token: logprob} with the prompt token first, then the k most likely
PromptScore = tuple[int, dict[int, float]]


@dataclass(slots=True)
class PromptScoring:
    """prompt_logprobs: score prompt tokens against the positions before them."""

    offset: int  # the chunk's first scoring row (row offset + j scores targets[j])
    targets: list[int]  # the prompt tokens that follow those positions
    top: int  # the most likely tokens to report beside each


@dataclass(slots=True)
class SeqStep:
    seq_id: int
    token_ids: list[int]  # tokens whose KV this step computes
    start: int  # position of token_ids[0]: tokens before it are in the cache
    block_table: list[int]  # pages covering every position this step writes
    num_drafts: int = 0  # the last num_drafts tokens are proposed continuations to verify
    sampling: SamplingRow | None = None  # None: a prefill chunk that does not reach the end of the prompt
    # token_ids[0] stands for the token this sequence drew in the step launched just before (its value is still
    # on the device: the core scheduled this step before reading that one's results)
    feed_previous: bool = False
    score: PromptScoring | None = None
    # A token tree: draft i follows draft draft_parents[i] (< i), or the last token before the drafts (-1). None: a
    # chain. Every draft is drawn after, and the verdict walks from the root along the drafts equal to the draws.
    draft_parents: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_samples(self) -> int:
        """Rows drawn this step: one per draft, plus the token after them."""
        return 0 if self.sampling is None else self.num_drafts + 1


@dataclass(slots=True)
class Step:
    seqs: list[SeqStep] = field(default_factory=list)
    # KV to move before the forward, (from slot, to slot) pairs: the drafts a token tree's verdict accepted, written
    # at their places in the tree, go to the positions they now hold in the sequence
    kv_moves: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(slots=True)
class SeqResult:
    """A sequence's accepted tokens: drafts that matched the draws, then one drawn token (1..k+1 in all)."""

    seq_id: int
    tokens: list[int]
    logprobs: list[dict[int, float]] | None = None  # per token: the token's own logprob first, then top-n
    path: list[int] | None = None  # a token tree's accepted drafts, by index, root first


def tree_depths(parents: list[int]) -> list[int]:
    """Each draft's depth in its tree: 1 for a draft that follows the last token before the drafts."""
    depths: list[int] = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return depths


def tree_path(parents: list[int], node: int) -> list[int]:
    """The drafts from the root down to `node` (itself included), root first."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def walk_tree(draws: list[int], drafts: list[int], parents: list[int] | None) -> list[int]:
    """The drafts a verifying step keeps, by index: from the root, while one of the children of the last kept one
    equals the draw after it (the draw plain decoding makes there), which keeps the output exactly plain decoding's.
    `draws[0]`: the draw after the last token before the drafts, `draws[1 + i]`: after draft i. A chain's parents
    are None (each draft the child of the one before)."""
    if parents is None:
        n = 0
        while n < len(drafts) and draws[n] == drafts[n]:
            n += 1
        return list(range(n))
    path, node = [], -1
    while True:
        want = draws[node + 1]
        node = next((i for i in range(node + 1, len(drafts)) if parents[i] == node and drafts[i] == want), -1)
        if node < 0:
            return path
        path.append(node)
