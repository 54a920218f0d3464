"""`slipstream train-draft`: train an EAGLE-3 head (models/eagle3.py) for a target model, on the target's own outputs.

1. Data: the target answers the prompts (greedy, through the engine); each prompt + answer is one training sequence.
2. The target reads each sequence once more (`ModelRunner.teacher_states`): the states entering the head's three layers
   at every position, and the token the target itself would draw after each position. Those draws are the labels:
   the head learns to predict the target, not the text.
3. The draft vocabulary: the labels' most frequent tokens (the head's output layer shrinks with it); `d2t` maps them back.
4. Training-time test (EAGLE-3's): the head is unrolled `steps` times as it drafts at inference. Step 0 reads the
   target's states; step j reads at each position the head's own output of step j - 1 at the position before, and
   attends to step 0's keys up to j positions back and to each later step's key on its diagonal: exactly the keys a
   chained draft sees (the caught-up positions, then its own chain). The loss of step j weighs 0.8^j.
5. The head is written as published heads are (`LlamaForCausalLMEagle3`, `midlayer.*`, `d2t`, `t2d`), so it loads in
   slipstream (`--speculative-method eagle3 --speculative-model DIR`) and in the engines that read that format.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from slipstream.attention.registry import create_backend, resolve_backend
from slipstream.config import Eagle3Config
from slipstream.models.eagle3 import Eagle3Head

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DraftTraining:
    steps: int = 3  # drafts unrolled in training (training-time test)
    epochs: int = 2
    lr: float = 1e-3
    draft_vocab_size: int = 8192
    answer_tokens: int = 256  # of each answer the target writes
    held_out: float = 0.1  # share of the sequences kept for the accuracy report
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "epochs", "draft_vocab_size", "answer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.held_out < 1:
            raise ValueError(f"held_out must be in [0, 1), got {self.held_out!r}")


def read_prompts(path: str, limit: int | None = None) -> list[str]:
    """Prompts from a ShareGPT-style JSON (each conversation's first turn) or a text file (one prompt a line)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"prompts file {path!r} cannot be read: {e.strerror}") from None
    if path.endswith(".json"):
        try:
            prompts = [c["conversations"][0]["value"] for c in json.loads(text) if c.get("conversations")]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"prompts file {path!r} is not ShareGPT-style JSON (a list of {{\"conversations\": "
                             f"[{{\"value\": ...}}]}}): {e}") from None
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {path!r}")
    return prompts[:limit]


def answers(llm: Any, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Each prompt (in the chat template where the model has one) followed by the target's greedy answer."""
    from slipstream import SamplingParams

    tok = llm.tokenizer
    if getattr(tok, "chat_template", None):
        token_ids = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    else:
        token_ids = [tok.encode(p) for p in prompts]
    limit = min(llm.engine.core.max_model_len, llm.engine.core.config.scheduler.max_num_batched_tokens)
    token_ids = [ids for ids in token_ids if len(ids) < limit - max_tokens]
    outs = llm.generate(token_ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    return [list(o.prompt_token_ids) + o.outputs[0].token_ids for o in outs]


@dataclass
class Example:
    """One training sequence, kept in host memory (the target's states of thousands of sequences would not fit beside
    its KV pool on the GPU) and moved to the device one at a time."""

    tokens: torch.Tensor  # [n]
    labels: torch.Tensor  # [n]: the target's own next token after each position
    states: torch.Tensor  # [n, 3 x hidden], in the target's dtype: what enters the head's three layers

    def to(self, device: torch.device) -> "Example":
        return Example(self.tokens.to(device), self.labels.to(device), self.states.to(device).float())


def head_config(target: Any, aux: tuple[int, ...], draft_vocab_size: int) -> Eagle3Config:
    """A head shaped like one of the target's layers (its attention heads, MLP width and positions)."""
    layer = replace(target, architecture="LlamaForCausalLM", num_layers=1, attention_bias=False, qk_norm=False, moe=None)
    return Eagle3Config(layer, min(draft_vocab_size, target.vocab_size), target.hidden_size, aux)


def _ttt_mask(n: int, j: int, device: torch.device) -> torch.Tensor:
    """[n, (j + 1) n]: which keys position p of unroll step j sees: step 0's up to p - j, step i's at p - j + i."""
    p = torch.arange(n, device=device)[:, None]
    r = torch.arange(n, device=device)[None, :]
    return torch.cat([r <= p - j] + [r == p - j + i for i in range(1, j + 1)], dim=1)


def unrolled(head: Eagle3Head, tokens: torch.Tensor, states: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The head's outputs o [n - 1, hidden] at each unroll step: row p reads token p + 1 (see the module's 4.)."""
    attn = head.self_attn
    n = len(tokens) - 1
    hq, hk, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    pos = torch.arange(n, device=tokens.device)
    ids, g = tokens[1:], states[:n]
    keys, values, outs = [], [], []
    for j in range(steps):
        qkv, residual = head.project(ids, g)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary(pos, q.view(n, hq, d), k.view(n, hk, d))
        keys.append(k)
        values.append(v.view(n, hk, d))
        key = torch.cat(keys).repeat_interleave(hq // hk, dim=1)
        value = torch.cat(values).repeat_interleave(hq // hk, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, key) * attn.scale
        scores = scores.masked_fill(~_ttt_mask(n, j, tokens.device), float("-inf"))
        a = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), value).reshape(n, hq * d)
        o = head.feed_forward(attn.o_proj(a), residual)
        outs.append(o)
        g = torch.cat([o[:1], o[:-1]])  # the next step's position p reads this step's output at p - 1
    return outs


def losses(head: Eagle3Head, ex: Example, draft_of: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The weighted loss and, per unroll step, (draws equal to the target's, positions scored)."""
    outs = unrolled(head, ex.tokens, ex.states, steps)
    target = draft_of[ex.labels[1:]]  # row p predicts the target's draw after position p + 1
    total, hits = ex.tokens.new_zeros((), dtype=torch.float32), []
    for j, o in enumerate(outs):
        t = target[j:]
        scored = t >= 0
        logits = head.draft_logits(o[j:]).float()
        if scored.any():
            total = total + 0.8**j * F.cross_entropy(logits[scored], t[scored])
        hits.append((int((logits.argmax(dim=-1) == t).sum()), len(t)))
    return total, hits


def collect(llm: Any, sequences: list[list[int]], aux: tuple[int, ...]) -> list[Example]:
    runner = llm.engine.core.runner
    if llm.engine.core.prefix_cache is not None:  # teacher_states writes the first pages of the pool
        llm.engine.core.prefix_cache.clear()
    out = []
    for seq in sequences:
        labels, states = runner.teacher_states(seq, aux)
        # (copies out of inference mode: its tensors cannot enter autograd)
        out.append(Example(torch.tensor(seq), labels.cpu().clone(), states.cpu().clone()))
    return out


def train(llm: Any, prompts: list[str], cfg: DraftTraining, aux: tuple[int, ...] | None = None) -> tuple[Eagle3Head, dict]:
    """Train a head for `llm`'s model; returns it and a report (accuracy of each unroll step on held-out data)."""
    torch.manual_seed(cfg.seed)
    core = llm.engine.core
    if core.config.tensor_parallel_size > 1:
        raise ValueError("train-draft runs the model on one device: tensor_parallel_size must be 1")
    mc, runner = core.model_config, core.runner
    aux = aux or (2, mc.num_layers // 2, mc.num_layers - 3)
    started = time.perf_counter()
    sequences = answers(llm, prompts, cfg.answer_tokens)
    if len(sequences) < 2:
        raise ValueError(f"{len(sequences)} usable prompts: training needs at least 2 (one held out)")
    examples = collect(llm, sequences, tuple(sorted(aux)))
    data_s = time.perf_counter() - started
    random.Random(cfg.seed).shuffle(examples)
    held = examples[: int(len(examples) * cfg.held_out)]
    train_set = examples[len(held) :]
    counts = torch.bincount(torch.cat([e.labels for e in train_set]), minlength=mc.vocab_size).to(runner.device)
    hc = head_config(mc, tuple(aux), cfg.draft_vocab_size)
    kept = counts.topk(hc.draft_vocab_size).indices.sort().values
    draft_of = torch.full((mc.vocab_size,), -1, dtype=torch.int64, device=runner.device)
    draft_of[kept] = torch.arange(len(kept), device=runner.device)
    head = _new_head(hc, runner, kept)
    params = [p for n, p in head.named_parameters() if n != "embed_tokens.weight"]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    total_steps = cfg.epochs * len(train_set)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    rng = random.Random(cfg.seed)
    for epoch in range(cfg.epochs):
        order = list(range(len(train_set)))
        rng.shuffle(order)
        run_loss = 0.0
        for i in order:
            loss, _ = losses(head, train_set[i].to(runner.device), draft_of, cfg.steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
            sched.step()
            run_loss += loss.item()
        log.info("epoch %d: mean loss %.3f", epoch + 1, run_loss / len(train_set))
    report = {"sequences": len(examples), "held_out": len(held), "train_tokens": sum(len(e.tokens) for e in train_set),
              "draft_vocab_size": hc.draft_vocab_size, "aux_layers": list(aux), "data_seconds": round(data_s, 1),
              "train_seconds": round(time.perf_counter() - started - data_s, 1),
              "held_out_accuracy": _accuracy(head, held, draft_of, cfg.steps) if held else None}
    for p in params:
        p.requires_grad_(False)
    return head, report


@torch.no_grad()
def _accuracy(head: Eagle3Head, examples: list[Example], draft_of: torch.Tensor, steps: int) -> list[float]:
    """Per unroll step: how often the head's greedy draft equals the target's draw (the chain's earlier drafts
    assumed right: the acceptance of draft j + 1 given j accepted)."""
    hits = [[0, 0] for _ in range(steps)]
    for ex in examples:
        for j, (h, n) in enumerate(losses(head, ex.to(draft_of.device), draft_of, steps)[1]):
            hits[j][0] += h
            hits[j][1] += n
    return [round(h / max(n, 1), 4) for h, n in hits]


def _new_head(cfg: Eagle3Config, runner: Any, kept: torch.Tensor) -> Eagle3Head:
    """A head to train on the target's device in float32, sharing the target's embedding (frozen)."""
    spec = resolve_backend("torch", "cpu")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device(runner.device):
            head = Eagle3Head(cfg, create_backend(spec))  # its own float32 copy of the embedding, trained on
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator(device=runner.device).manual_seed(0)
    for name, p in head.named_parameters():
        if "norm" in name:
            p.data.fill_(1.0)
        else:  # unit-variance outputs for unit-variance inputs
            p.data.normal_(0.0, 1 / math.sqrt(p.shape[-1]), generator=g)
        p.requires_grad_(True)
    head.embed_tokens.weight.data.copy_(runner.model.embed_tokens.table())  # the target's, frozen
    head.embed_tokens.weight.requires_grad_(False)
    head.draft_to_target.copy_(kept)
    return head


def _layer_ids(cfg: Eagle3Config, num_target_layers: int) -> dict:
    """The layer ids for config.json, left out where they are the default (2, L // 2, L - 3): engines agree on the
    default, but read explicit ids differently (vLLM and slipstream: the layers' inputs; SGLang: their outputs)."""
    aux = tuple(sorted(cfg.aux_layers_of(num_target_layers)))
    default = (2, num_target_layers // 2, num_target_layers - 3)
    return {} if aux == default else {"eagle_config": {"eagle_aux_hidden_state_layer_ids": list(aux)}}


def save(head: Eagle3Head, path: str, num_target_layers: int, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write the head as published heads are: config.json and model.safetensors (`midlayer.*`, `d2t`, `t2d`; no
    embedding: the head reads the target's)."""
    from safetensors.torch import save_file

    cfg = head.config
    c = cfg.layer
    attn, mlp = head.self_attn, head.mlp
    q, k, v = attn.qkv_proj.weight.split(attn.qkv_proj.output_sizes)
    gate, up = mlp.gate_up_proj.weight.split(mlp.gate_up_proj.output_sizes)
    m = "midlayer."
    tensors = {
        "fc.weight": head.fc.weight, m + "input_layernorm.weight": head.input_layernorm.weight,
        m + "hidden_norm.weight": head.hidden_norm.weight, m + "self_attn.q_proj.weight": q,
        m + "self_attn.k_proj.weight": k, m + "self_attn.v_proj.weight": v, m + "self_attn.o_proj.weight": attn.o_proj.weight,
        m + "post_attention_layernorm.weight": head.post_attention_layernorm.weight, m + "mlp.gate_proj.weight": gate,
        m + "mlp.up_proj.weight": up, m + "mlp.down_proj.weight": mlp.down_proj.weight, "norm.weight": head.norm.weight,
        "lm_head.weight": head.lm_head.weight,
    }
    out = {n: t.detach().to("cpu", dtype).contiguous() for n, t in tensors.items()}
    kept = head.draft_to_target.cpu()
    out["d2t"] = kept - torch.arange(cfg.draft_vocab_size)
    out["t2d"] = torch.zeros(c.vocab_size, dtype=torch.bool).index_fill_(0, kept, True)
    os.makedirs(path, exist_ok=True)
    save_file(out, os.path.join(path, "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
              "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_heads,
              "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
              "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling_dict or None,
              "max_position_embeddings": c.max_position_embeddings, "vocab_size": c.vocab_size,
              "draft_vocab_size": cfg.draft_vocab_size, "target_hidden_size": cfg.target_hidden_size,
              **_layer_ids(cfg, num_target_layers),
              "torch_dtype": str(dtype).removeprefix("torch."), "tie_word_embeddings": False}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
