"""Per-row sampling tensors for the rows a step draws, from the step's plain `SamplingRow`s."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from slipstream.layers.sampler import Penalties, SamplingBatch
from slipstream.runner.batch import SamplingRow
from slipstream.runner.inputs import Stager
from slipstream.sampling_params import SamplingParams


@dataclass(slots=True)
class Draw:
    """One drawn row: a sequence's sampling row at output index `num_output_tokens + offset`, after `drafts[:offset]`."""

    row: SamplingRow
    offset: int
    drafts: list[int]

    @property
    def params(self) -> SamplingParams:
        return self.row.params

    @property
    def position(self) -> int:
        return self.row.num_output_tokens + self.offset


class SamplingTensors:
    def __init__(self, device: torch.device, vocab: int, eos_ids: list[int], max_rows: int) -> None:
        self.device, self.vocab, self.eos_ids = device, vocab, eos_ids
        self.floats = Stager(device, torch.float32, 3 * max_rows + 16)

    def build(self, draws: list[Draw], ints: Stager) -> SamplingBatch | None:
        """Tensors for these rows (small ints staged in `ints`, which holds the step's other inputs), or None when
        plain argmax will do (all greedy, nothing to adjust)."""
        ps = [d.params for d in draws]
        plain = all(p.greedy and p.logprobs is None and not p.logit_bias and not p.needs_penalties for p in ps)
        if plain and not any(d.position < d.params.min_tokens for d in draws):
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
            for i, d in enumerate(draws)
            if d.position < d.params.min_tokens
            for tok in (self.eos_ids + d.params.stop_token_ids)
            if 0 <= tok < vocab
        ]
        if ban_rows:
            r, c = zip(*ban_rows)
            banned = (t(r, torch.int64), t(c, torch.int64))
        if any(p.needs_penalties for p in ps):
            penalties = self._penalties(draws, t)
        wants = [p.logprobs for p in ps if p.logprobs is not None]
        n = len(draws)
        floats = self.floats
        floats.reset()
        f = floats.put([p.temperature for p in ps] + [p.top_p for p in ps] + [p.min_p for p in ps])
        i = ints.put([p.top_k if p.top_k > 0 else vocab for p in ps] + [d.row.seed for d in draws] + [d.position for d in draws])
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
        )

    def _penalties(self, draws: list[Draw], t) -> Penalties:  # noqa: ANN001
        counts = torch.zeros((len(draws), self.vocab), dtype=torch.float32, device=self.device)
        seen = torch.zeros((len(draws), self.vocab), dtype=torch.bool, device=self.device)
        for i, d in enumerate(draws):
            history = d.row.history or []
            outputs = history[d.row.num_prompt_tokens :] + d.drafts[: d.offset]
            if outputs:
                out_ids = t(outputs, torch.int64)
                counts[i].index_add_(0, out_ids, torch.ones_like(out_ids, dtype=torch.float32))
            seen[i, t(history + d.drafts[: d.offset], torch.int64)] = True
        ps = [d.params for d in draws]
        return Penalties(
            repetition=t([p.repetition_penalty for p in ps], torch.float32),
            presence=t([p.presence_penalty for p in ps], torch.float32),
            frequency=t([p.frequency_penalty for p in ps], torch.float32),
            output_counts=counts,
            seen=seen,
        )
