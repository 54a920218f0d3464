"""Per-row sampling tensors for the rows a step draws, from the step's plain `SamplingRow`s."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slipstream.layers.sampler import Penalties, SamplingBatch
from slipstream.runner.batch import SamplingRow, SeqStep, tree_path
from slipstream.runner.inputs import Stager

if TYPE_CHECKING:  # (xgrammar loads only for models that see a constraint)
    from slipstream.grammar import Bitmask


def expand_rows(seqs: list[SeqStep]) -> tuple[list[SamplingRow], list[int], list[list[int]] | None]:
    """The rows a step draws: per drawing sequence one row, or k + 1 after k drafts (row j follows drafts[:j]; in a
    token tree, row 1 + i follows draft i's path from the root). Returns (each row's sampling row, its output index,
    the drafts before it, or None when no sequence has any)."""
    drawing = [s for s in seqs if s.sampling is not None]
    if not any(s.num_drafts for s in drawing):
        rows = [s.sampling for s in drawing]
        return rows, [r.num_output_tokens for r in rows], None
    rows, positions, before = [], [], []
    for s in drawing:
        drafts = s.token_ids[len(s.token_ids) - s.num_drafts :] if s.num_drafts else []
        rows += [s.sampling] * s.num_samples
        if s.draft_parents is None:
            positions += range(s.sampling.num_output_tokens, s.sampling.num_output_tokens + s.num_samples)
            before += [drafts[:j] for j in range(s.num_samples)]
        else:  # (a draft's draw stands where plain decoding draws after its path: seeded noise follows the index)
            paths = [tree_path(s.draft_parents, i) for i in range(s.num_drafts)]
            positions += [s.sampling.num_output_tokens + len(p) for p in [[]] + paths]
            before += [[]] + [[drafts[j] for j in p] for p in paths]
    return rows, positions, before


class SamplingTensors:
    def __init__(self, device: torch.device, vocab: int, eos_ids: list[int], max_rows: int) -> None:
        self.device, self.vocab, self.eos_ids = device, vocab, eos_ids
        self.floats = Stager(device, torch.float32, 3 * max_rows + 16)

    def build(self, rows: list[SamplingRow], positions: list[int], before: list[list[int]] | None, ints: Stager,
              allowed: Bitmask | None = None) -> SamplingBatch | None:
        """Tensors for these rows (small ints staged in `ints`, which holds the step's other inputs), or None when
        plain argmax will do (all greedy, nothing to adjust). `positions`: each row's output index; `before`: the
        draft tokens drawn ahead of it in this step (penalties count them); `allowed`: the tokens each row may draw
        (structured output), widened to the model's vocabulary on the device."""
        ps = [r.params for r in rows]
        plain = allowed is None and all(p.greedy and p.logprobs is None and not p.logit_bias and not p.needs_penalties for p in ps)
        if plain and not any(pos < p.min_tokens for pos, p in zip(positions, ps)):
            return None
        dev, vocab = self.device, self.vocab

        def t(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)

        bias = banned = penalties = None
        bias_rows = [(i, tok, v) for i, p in enumerate(ps) for tok, v in p.logit_bias.items() if 0 <= tok < vocab]
        if bias_rows:
            r, c, v = zip(*bias_rows)
            bias = (t(r, torch.int64), t(c, torch.int64), t(v, torch.float32))
        ban_rows = [
            (i, tok)
            for i, (pos, p) in enumerate(zip(positions, ps))
            if pos < p.min_tokens
            for tok in (self.eos_ids + p.stop_token_ids)
            if 0 <= tok < vocab
        ]
        if ban_rows:
            r, c = zip(*ban_rows)
            banned = (t(r, torch.int64), t(c, torch.int64))
        if any(p.needs_penalties for p in ps):
            penalties = self._penalties(rows, before or [[] for _ in rows], t)
        wants = [p.logprobs for p in ps if p.logprobs is not None]
        n = len(rows)
        floats = self.floats
        floats.reset()
        f = floats.put([p.temperature for p in ps] + [p.top_p for p in ps] + [p.min_p for p in ps])
        i = ints.put([p.top_k if p.top_k > 0 else vocab for p in ps] + [r.seed for r in rows] + positions)
        held = ints.put(allowed.held) if allowed is not None and allowed.padded and allowed.held else None
        floats.upload()
        ints.upload()
        fv, iv = f().view(3, n), i().view(3, n)
        return SamplingBatch(
            temperature=fv[0], top_k=iv[0], top_p=fv[1], min_p=fv[2], seeds=iv[1], positions=iv[2],
            all_greedy=all(p.greedy for p in ps),
            use_top_k_top_p=any(p.top_k > 0 or p.top_p < 1.0 for p in ps),
            use_min_p=any(p.min_p > 0 for p in ps),
            max_logprobs=max(wants) if wants else None,
            bias=bias, banned=banned, penalties=penalties,
            allowed=None if allowed is None else allowed.widen(dev, None if held is None else held()),
        )

    def _penalties(self, rows: list[SamplingRow], before: list[list[int]], t) -> Penalties:  # noqa: ANN001
        counts = torch.zeros((len(rows), self.vocab), dtype=torch.float32, device=self.device)
        seen = torch.zeros((len(rows), self.vocab), dtype=torch.bool, device=self.device)
        for i, (row, drafts) in enumerate(zip(rows, before)):
            history = row.history or []
            outputs = history[row.num_prompt_tokens :] + drafts
            if outputs:
                out_ids = t(outputs, torch.int64)
                counts[i].index_add_(0, out_ids, torch.ones_like(out_ids, dtype=torch.float32))
            seen[i, t(history + drafts, torch.int64)] = True
        ps = [r.params for r in rows]
        return Penalties(
            repetition=t([p.repetition_penalty for p in ps], torch.float32),
            presence=t([p.presence_penalty for p in ps], torch.float32),
            frequency=t([p.frequency_penalty for p in ps], torch.float32),
            output_counts=counts,
            seen=seen,
        )
