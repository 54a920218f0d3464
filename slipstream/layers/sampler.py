"""Batched sampling: logit bias, min_tokens, penalties, the structured-output mask, temperature, min-p, top-k, top-p,
then a draw.

The draw is the exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks token i with probability p_i, and a
filtered token (p_i = 0) can never win. E_i comes from a counter-based hash of (seed, output position, token),
not from a stateful generator, so a seeded request draws the same tokens whatever else is in the batch, and a
preempted request redraws exactly what it drew before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from slipstream import kernels
from slipstream.kernels.hash import exponential_noise
from slipstream.sampling_params import GREEDY_BELOW


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors, built by the model runner for the rows being sampled."""

    temperature: torch.Tensor  # [S] float32; rows with 0 are greedy
    top_k: torch.Tensor  # [S] int64; vocab size when off
    top_p: torch.Tensor  # [S] float32
    min_p: torch.Tensor  # [S] float32
    seeds: torch.Tensor  # [S] int64
    positions: torch.Tensor  # [S] int64: index of the token being drawn among the row's outputs
    all_greedy: bool
    use_top_k_top_p: bool
    use_min_p: bool
    max_logprobs: int | None  # largest top-n asked for; None: nobody wants logprobs
    # Optional per-row adjustments, absent in the common case.
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, token ids, values)
    banned: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids) masked to -inf (min_tokens)
    penalties: "Penalties | None" = None
    allowed: torch.Tensor | None = None  # [S, ceil(V / 32)] int32: bit t % 32 of word t // 32 set = token t may be drawn


@dataclass
class Penalties:
    repetition: torch.Tensor  # [S]
    presence: torch.Tensor  # [S]
    frequency: torch.Tensor  # [S]
    output_counts: torch.Tensor  # [S, V] occurrences of each token among the row's outputs
    seen: torch.Tensor  # [S, V] bool: token in prompt or outputs


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [S]
    logprobs: torch.Tensor | None  # [S, 1 + k]: the sampled token's logprob, then the top-k
    logprob_ids: torch.Tensor | None  # [S, 1 + k]
    # [S, a] with `alternatives` a: the tokens that came next in the row's draw (greedy: the next largest logits;
    # sampled: the exponential race's next places), -1 where no other token could be drawn
    runners_up: torch.Tensor | None = None


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    rep = p.repetition.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(p.seen, penalized, logits)
    counts = p.output_counts
    return logits - p.frequency.unsqueeze(1) * counts - p.presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_token_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """-inf for every token whose bit in the row's bitmask is clear (structured output)."""
    # Bit b of int32 word w is token 32 w + b; read as little-endian bytes (as CPUs and GPUs store them), bit j of
    # byte k is token 8 k + j. Unpacking bytes to bools writes 1 byte a token instead of 4 (int32 per bit): 170 ms
    # instead of 240-290 for 256 rows x 151,936 tokens on the CPU machine.
    rows, n = allowed.shape[0], logits.shape[-1]
    octets = allowed.view(torch.uint8).view(rows, -1)
    keep = torch.empty((*octets.shape, 8), dtype=torch.bool, device=allowed.device)
    for j in range(8):
        keep[..., j] = (octets >> j) & 1
    return logits.masked_fill(~keep.view(rows, -1)[:, :n], float("-inf"))


def filter_probs(probs: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Zero the probabilities that min-p, top-k and top-p exclude (at least the most likely token survives)."""
    if b.use_min_p:
        floor = b.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    if b.use_top_k_top_p:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        # (a row without top-p drops nothing for it: the running float32 sum can reach the total before the tail,
        # and a seeded draw must not depend on whether a batch mate uses top-p or top-k)
        nucleus = b.top_p.unsqueeze(1)
        drop = (rank >= b.top_k.unsqueeze(1)) | ((mass_before >= nucleus * sorted_p.sum(-1, keepdim=True)) & (nucleus < 1))
        drop[:, 0] = False
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return probs


def sample(logits: torch.Tensor, b: SamplingBatch, fused_kernels: bool = False, alternatives: int = 0) -> SamplerOutput:
    """`fused_kernels`: the model runs on the GPU with Triton kernels; temperature-only rows then draw in one pass.
    `alternatives`: also the runners-up of each row's draw (a draft head's token trees), drawn on the torch path (the
    fused draw is the same draw: tests/test_kernels.py)."""
    fused = not (b.use_top_k_top_p or b.use_min_p) and fused_kernels and not alternatives
    adjusted = b.bias is not None or b.banned is not None or b.penalties is not None
    if not fused or adjusted or b.max_logprobs is not None:  # the fused kernel reads bf16 logits as they are
        logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if b.max_logprobs is not None else None
    if b.bias is not None:
        rows, cols, vals = b.bias
        logits = logits.index_put((rows, cols), vals, accumulate=True)
    if b.banned is not None:
        # (filled on the device: a copy from host memory could wait for the stream, held for the step's masks)
        logits = logits.index_put(b.banned, torch.full((), float("-inf"), device=logits.device))
    if b.penalties is not None:
        logits = apply_penalties(logits, b.penalties)
    if b.allowed is not None and not fused:  # last: no adjustment can bring back a token the grammar refuses
        logits = apply_token_mask(logits, b.allowed)
    alts = None
    if fused:  # (the grammar's mask read in the same pass)
        tokens = kernels.gumbel_argmax(logits, b.temperature, b.seeds, b.positions, b.allowed)
    elif b.all_greedy:
        tokens = logits.argmax(dim=-1)
        if alternatives:
            alts = runners_up(logits, tokens, alternatives, float("-inf"))
    else:
        greedy = logits.argmax(dim=-1)
        is_greedy = b.temperature < GREEDY_BELOW
        temp = torch.where(is_greedy, torch.ones_like(b.temperature), b.temperature)
        probs = filter_probs(torch.softmax(logits / temp.unsqueeze(1), dim=-1), b)
        noise = exponential_noise(b.seeds, b.positions, logits.shape[-1])
        race = probs / noise
        tokens = torch.where(is_greedy, greedy, race.argmax(dim=-1))
        if alternatives:  # (a greedy row's order is its logits'; a filtered token, probability 0, never places)
            alts = torch.where(is_greedy.unsqueeze(1), runners_up(logits, tokens, alternatives, float("-inf")),
                               runners_up(race, tokens, alternatives, 0.0))
    if raw_logprobs is None:
        return SamplerOutput(tokens, None, None, alts)
    chosen = raw_logprobs.gather(1, tokens.unsqueeze(1))
    ids = tokens.unsqueeze(1)
    if b.max_logprobs > 0:
        top_lp, top_ids = raw_logprobs.topk(b.max_logprobs, dim=-1)
        chosen, ids = torch.cat([chosen, top_lp], 1), torch.cat([ids, top_ids], 1)
    return SamplerOutput(tokens, chosen, ids, alts)


def runners_up(scores: torch.Tensor, winners: torch.Tensor, n: int, out: float) -> torch.Tensor:
    """The n best-scoring tokens after each row's winner, -1 where a score is `out` (no such token can be drawn)."""
    top, ids = scores.scatter(1, winners.unsqueeze(1), out).topk(n, dim=-1)
    return torch.where(top > out, ids, -1)
