"""EAGLE-3 heads: a random head written in the published checkpoint format (`midlayer.*`, `fc`, `lm_head` over a
reduced draft vocabulary, `d2t`) for a random Qwen3 target. The drafts the engine proposes equal a dense float64
reference computed from HF transformers' hidden states of the target (which layers, in which order, which token
beside which state, how the head chains on its own output); the engine's output with the head equals the output
without it, under chunked prefill, preemption, the prefix cache, seeded sampling, penalties and n > 1."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conftest import assert_no_leak
from slipstream import LLM, SamplingParams
from test_speculative import DRAFT_PARAMS  # greedy, seeded with logprobs, penalties, n = 2 with stop tokens
from slipstream.config import EngineConfig
from slipstream.runner.draft_head import _ChainRound
from slipstream.runner.inputs import eager_inputs

HEAD = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            rope_theta=10000.0, rms_norm_eps=1e-6)
DRAFT_VOCAB = 200


def make_head_dir(path, target_config, aux=None, seed=0) -> dict[str, torch.Tensor]:
    """A random EAGLE-3 head for the target, as published heads are laid out; returns its tensors."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    h, i, v, th = HEAD["hidden_size"], HEAD["intermediate_size"], target_config.vocab_size, target_config.hidden_size
    q, kv = HEAD["num_attention_heads"] * HEAD["head_dim"], HEAD["num_key_value_heads"] * HEAD["head_dim"]
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.25  # noqa: E731 - far from ties, as the target is
    n = lambda: torch.rand(h, generator=g) + 0.5  # noqa: E731
    keep = torch.randperm(v, generator=g)[:DRAFT_VOCAB].sort().values
    tensors = {
        "fc.weight": r(h, 3 * th), "midlayer.input_layernorm.weight": n(), "midlayer.hidden_norm.weight": n(),
        "midlayer.self_attn.q_proj.weight": r(q, 2 * h), "midlayer.self_attn.k_proj.weight": r(kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": r(kv, 2 * h), "midlayer.self_attn.o_proj.weight": r(h, q),
        "midlayer.post_attention_layernorm.weight": n(), "midlayer.mlp.gate_proj.weight": r(i, h),
        "midlayer.mlp.up_proj.weight": r(i, h), "midlayer.mlp.down_proj.weight": r(h, i), "norm.weight": n(),
        "lm_head.weight": r(DRAFT_VOCAB, h), "d2t": keep - torch.arange(DRAFT_VOCAB),
        "t2d": torch.zeros(v, dtype=torch.bool).index_fill_(0, keep, True),
    }
    save_file(tensors, str(path / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLMEagle3"], "num_hidden_layers": 1, "vocab_size": v,
              "draft_vocab_size": DRAFT_VOCAB, "target_hidden_size": th, "max_position_embeddings": 512, **HEAD}
    if aux is not None:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux}
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, positions, theta):  # HF's rotate-half convention, over the last dim
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions[:, None].double() * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def head_reference(t: dict[str, torch.Tensor], tokens: list[int], g: torch.Tensor, embed: torch.Tensor,
                   shape: dict = HEAD) -> torch.Tensor:
    """The head over positions 0..n-1 at once (dense causal attention): row p reads tokens[p] (the token after
    position p) and g[p]; returns the outputs o [n, hidden] (float64). `shape`: the head's config.json."""
    T = {k: v.double() for k, v in t.items()}
    m, eps, theta = "midlayer.", shape["rms_norm_eps"], shape["rope_theta"]
    hq, hk, d = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    if g.shape[-1] != shape["hidden_size"]:
        g = g @ T["fc.weight"].T
    x = torch.cat([_rms(embed[tokens], T[m + "input_layernorm.weight"], eps), _rms(g, T[m + "hidden_norm.weight"], eps)], -1)
    n = len(tokens)
    pos = torch.arange(n)
    q = _rope((x @ T[m + "self_attn.q_proj.weight"].T).view(n, hq, d), pos, theta)
    k = _rope((x @ T[m + "self_attn.k_proj.weight"].T).view(n, hk, d), pos, theta).repeat_interleave(hq // hk, 1)
    v = (x @ T[m + "self_attn.v_proj.weight"].T).view(n, hk, d).repeat_interleave(hq // hk, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, hq * d) @ T[m + "self_attn.o_proj.weight"].T
    a = g + attn
    y = _rms(a, T[m + "post_attention_layernorm.weight"], eps)
    mlp = (torch.nn.functional.silu(y @ T[m + "mlp.gate_proj.weight"].T) * (y @ T[m + "mlp.up_proj.weight"].T))
    return a + mlp @ T[m + "mlp.down_proj.weight"].T


def reference_drafts(t, target, tokens: list[int], aux: list[int], k: int) -> list[int]:
    """Greedy drafts after `tokens` (whose last token the target drew): the head catches up over every position but
    the last, reading the target's states entering the `aux` layers, then chains k - 1 times on its own output."""
    with torch.no_grad():
        hs = target(torch.tensor([tokens]), output_hidden_states=True).hidden_states  # hs[i]: entering layer i
    fused = torch.cat([hs[i][0].double() for i in sorted(aux)], -1)[:-1]  # side by side in layer order
    embed = target.get_input_embeddings().weight.double()
    inputs, g = list(tokens[1:]), fused @ t["fc.weight"].double().T
    drafts = []
    for _ in range(k):
        o = head_reference(t, inputs, g, embed)
        logits = _rms(o[-1], t["norm.weight"].double(), HEAD["rms_norm_eps"]) @ t["lm_head.weight"].double().T
        d = int(logits.argmax())
        drafts.append(d + int(t["d2t"][d]))
        inputs.append(drafts[-1])
        g = torch.cat([g, o[-1:]])  # the next position reads its own output
    return drafts


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from test_random_arch_equivalence import CONFIGS, make_model_dir

    root = tmp_path_factory.mktemp("eagle3")
    target = make_model_dir(root / "target", CONFIGS["qwen3"])
    aux = [2, 0, 1]  # named in any order, read in layer order (as heads are trained and other engines read them)
    tensors = make_head_dir(root / "head", CONFIGS["qwen3"], aux=aux)
    make_head_dir(root / "default", CONFIGS["qwen3"], seed=1)  # no layer ids: (2, L // 2, L - 3) = (2, 1, 0)
    return root, target, tensors, aux


class TwoOfThree:
    """A draft policy that chooses k drafts for two steps, then none for one: the head's drafts follow catch-ups over
    the positions a verifying step computed and over a plain decode step's one (on a GPU, a graph replay)."""

    def __init__(self, k: int) -> None:
        self.k, self.steps = k, 0

    def choose(self, batch: int) -> int:
        self.steps += 1
        return 0 if self.steps % 3 == 0 else self.k

    def record(self, *args) -> None:  # noqa: ANN002
        pass


class EagerLadder:
    """Stands in for the head's CUDA-graph ladder on a CPU: what a replay computes, run eagerly from the same buffers
    (the state input read from the runner's `_g`, fed tokens written into the ids), so that the bookkeeping of the
    graph path (which rows, which states, which outputs) is checked without a GPU."""

    def __init__(self, runner) -> None:  # noqa: ANN001
        self.runner = runner
        runner._g = torch.zeros(8, runner.head.norm.weight.shape[0])
        self.round = _ChainRound(runner.head, runner._g)

    def fits(self, n: int) -> bool:
        return n <= self.runner._g.shape[0]

    def run(self, h, feed=None) -> torch.Tensor:  # noqa: ANN001
        ids, positions, meta = eager_inputs(h, self.runner.ints)
        if feed is not None:
            ids = ids.clone()
            feed(ids)
        return self.round(ids, positions, meta)


def drafts_seen(llm: LLM, monkeypatch, ladder: bool = False) -> list[tuple[list[int], list[int]]]:  # noqa: ANN001
    """(tokens, the drafts proposed after them) of each drafting sequence while three greedy prompts run twice: once
    for one token (their prompts chunked, their pages left in the prefix cache), then for twelve on the cached pages;
    every third step drafts nothing. `ladder`: the head's one-token rounds take the graph path (on a CPU, eagerly)."""
    core = llm.engine.core
    core.draft_policy = TwoOfThree(core.config.num_speculative_tokens)
    if ladder:
        core.proposer.runner.graphs = EagerLadder(core.proposer.runner)
    seen = []
    refine = core.proposer.refine

    def record(scheduled, budget):  # noqa: ANN001, ANN202
        refine(scheduled, budget)
        seen.extend((list(s.token_ids), list(s.draft_token_ids)) for s, _ in scheduled if s.draft_token_ids)

    monkeypatch.setattr(core.proposer, "refine", record)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (7, 50, 19)]  # 50: prefilled in chunks
    # Requests that end in their prefill step leave their prompt pages in the prefix cache: the head must have read
    # those positions too, since the requests below skip them (cache hits) and attend to the head's KV there.
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1))
    # and one that shares the first page of a cached prompt but not the token after it: the head's KV at the page's
    # last position was made beside that token, so the page is not shared (radix_cache.py)
    branch = prompts[1][:16] + [(prompts[1][16] + 1) % 512 or 3] + prompts[1][17:30]
    llm.generate(prompts + [branch], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert core.prefix_cache.stats.hit_tokens == 48 + 16  # prompt 2's three full pages, prompt 3's one; none for the branch
    assert len(seen) >= 9
    return seen


@pytest.mark.parametrize("ladder", [False, True], ids=["eager", "graph-path"])
def test_drafts_equal_a_dense_reference(dirs, monkeypatch, ladder):
    root, target, tensors, aux = dirs
    llm = LLM(str(root / "target"), dtype="float32", device="cpu", max_model_len=256, block_size=16,
              max_num_batched_tokens=24, speculative_method="eagle3", speculative_model=str(root / "head"),
              num_speculative_tokens=3, speculative_adaptive=False)
    for tokens, drafts in drafts_seen(llm, monkeypatch, ladder):
        assert drafts == reference_drafts(tensors, target, tokens, aux, len(drafts)), tokens
    assert_no_leak(llm)


def drafts_in_graphs_equal_eager(model: str, monkeypatch, **speculation) -> None:
    """On a GPU (fp32): the head's chain rounds replayed in CUDA graphs propose exactly the drafts they propose run
    eagerly (the output alone could not tell: a wrong draft is only rejected)."""
    got = {}
    for eager in (True, False):
        llm = LLM(model, dtype="float32", device="cuda", max_model_len=256, block_size=16, max_num_batched_tokens=24,
                  gpu_memory_utilization=0.3, enforce_eager=eager, num_speculative_tokens=3, speculative_adaptive=False,
                  **speculation)
        assert (llm.engine.core.proposer.runner.graphs is None) == eager
        got[eager] = drafts_seen(llm, monkeypatch)
        del llm
    assert got[True] == got[False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_head_chain_in_cuda_graphs(dirs, monkeypatch):
    root = dirs[0]
    drafts_in_graphs_equal_eager(str(root / "target"), monkeypatch, speculative_method="eagle3",
                                 speculative_model=str(root / "head"))


def check_output_unchanged(model: str, **speculation) -> None:
    """Greedy, seeded sampling with logprobs, penalties, n = 2 with stop tokens: with `speculation`, exactly the tokens
    of decoding without it, through chunked prefill, preemption and prefix cache hits; per-request draft metrics sum
    to the engine's."""
    g = __import__("random").Random(0)
    prompts = [[g.randrange(3, 512) for _ in range(n)] for n in (5, 40, 90, 23, 64, 11)]
    prompts.append(prompts[2][:70] + [5, 6, 7])  # shares pages with a prompt before it
    small_pool = dict(dtype="float32", device="cpu", max_model_len=256, block_size=16, num_blocks=24,
                      max_num_batched_tokens=64)
    plain = LLM(model, **small_pool)
    spec = LLM(model, speculative_adaptive=False, **speculation, **small_pool)
    core = spec.engine.core
    k = core.config.num_speculative_tokens
    for name, params in DRAFT_PARAMS.items():
        before = (core.stats.drafts, core.stats.draft_tokens, core.stats.accepted_draft_tokens)
        want, got = plain.generate(prompts, params), spec.generate(prompts, params)
        # each request's metrics count its samples' verifying steps; together they are the engine's
        m = [o.metrics for o in got]
        assert (sum(x.num_drafts for x in m), sum(x.draft_tokens for x in m), sum(x.accepted_draft_tokens for x in m)) == (
            core.stats.drafts - before[0], core.stats.draft_tokens - before[1], core.stats.accepted_draft_tokens - before[2])
        assert all(x.mean_accepted_length is None or 1 <= x.mean_accepted_length <= k + 1 for x in m)
        for a, b in zip(want, got):
            for x, y in zip(a.outputs, b.outputs):
                assert x.token_ids == y.token_ids and x.finish_reason == y.finish_reason, name
                if params.logprobs is not None:
                    for la, lb in zip(x.logprobs, y.logprobs):
                        assert la.keys() == lb.keys() and all(abs(la[t] - lb[t]) < 1e-4 for t in la), name
    assert core.stats.draft_tokens > 200 and core.stats.num_preemptions > 0 and core.stats.draft_seconds > 0
    assert core.prefix_cache.stats.hit_tokens > 0
    assert_no_leak(spec)
    assert not core.proposer._params  # every finished sequence is forgotten


def test_a_head_never_changes_the_output(dirs):
    """The head's KV is recomputed with the target's after preemption; positions the target skips (prefix cache
    hits) the head does not read."""
    root = dirs[0]
    check_output_unchanged(str(root / "target"), speculative_method="eagle3", speculative_model=str(root / "default"),
                           num_speculative_tokens=3)


def test_head_trees_never_change_the_output(dirs, monkeypatch):
    """Token trees of the head's chain and its draws' runners-up (shaped here to hold one beside each of the chain's
    first drafts, half the tree): the output is plain decoding's, through chunked prefill, preemption and prefix
    cache hits; the trees were verified, and runners-up kept."""
    from slipstream.engine.proposer import DraftHeadProposer
    from slipstream.runner import batch

    def half_and_half(self, n):
        chain = (n + 1) // 2
        return chain, [1] * (n - chain) + [0] * (2 * chain - n)

    monkeypatch.setattr(DraftHeadProposer, "_shape", half_and_half)
    kept_up = []
    walk = batch.walk_tree

    def spy(draws, drafts, parents):
        path = walk(draws, drafts, parents)
        if parents is not None:
            chain = next((i for i, p in enumerate(parents) if p != i - 1), len(parents))
            kept_up.append(any(i >= chain for i in path))
        return path

    monkeypatch.setattr("slipstream.runner.model_runner.walk_tree", spy)
    root = dirs[0]
    check_output_unchanged(str(root / "target"), speculative_method="eagle3", speculative_model=str(root / "default"),
                           num_speculative_tokens=4, speculative_branches=2)
    assert len(kept_up) > 100 and any(kept_up)


def test_head_tree_shapes_follow_the_measured_rates():
    """The n drafts split by the rates the verdicts measured: a chain while drafts are kept, runners-up beside the first
    drafts once the head's draws are often missed and its runners-up often right; never a runner-up without the chain
    draft it stands beside (whatever the rates)."""
    from slipstream.engine.proposer import DraftHeadProposer

    p = DraftHeadProposer(None, branches=2)
    assert p._shape(4) == (4, [0, 0, 0, 0])  # the priors: a = 0.8, u = 0.25
    for _ in range(100):  # the chain's first draft missed, its runner-up the draw
        p._trees[1] = (3, [1, 0, 0])
        p.accepted(1, 1, [3])
    assert p._kept / (p._kept + p._missed) < 0.02 and p._up_kept / p._up_tried > 0.95
    assert [p._shape(n) for n in (1, 2, 4)] == [(1, [0]), (1, [1]), (2, [1, 1])]
    for branches in (2, 4):
        p = DraftHeadProposer(None, branches=branches)
        for kept, missed, up_kept, up_tried in ((9, 1, 1, 3), (1, 9, 9, 10), (0.01, 9, 9, 9), (5, 5, 0.01, 9)):
            p._kept, p._missed, p._up_kept, p._up_tried = kept, missed, up_kept, up_tried
            for n in range(1, 12):
                chain, ups = p._shape(n)
                assert chain >= 1 and len(ups) == chain and chain + sum(ups) == n and max(ups) <= branches - 1


def test_after_a_tree_the_head_reads_the_kept_drafts_states():
    """catch_up after a token tree's verdict: position by position, the states of the token before the tree and of
    the drafts kept, in their rows of the target's step (not the step's next rows, which held other drafts)."""
    from types import SimpleNamespace

    from slipstream.runner.draft_head import DraftHeadRunner
    from slipstream.runner.inputs import Stager

    states = torch.arange(40, dtype=torch.float32).repeat_interleave(4).view(40, 4)  # row r holds r
    target = SimpleNamespace(computed={7: (10, 20, 6)}, kept_rows={7: [0, 2, 5]}, head_states=states, block_size=16)
    seen = []
    runner = object.__new__(DraftHeadRunner)
    runner.target, runner.graphs, runner.ints = target, None, Stager(torch.device("cpu"), torch.int64, 512)
    runner.head = lambda ids, positions, meta, g: (seen.append((ids.tolist(), positions.tolist(), g[:, 0].tolist())), g)[1]
    # tokens 0..19, then the real token at 20 and the kept drafts (rows 12 and 15 of the step) at 21, 22, the draw at 23
    tokens = list(range(20)) + [100, 101, 102, 103]
    runner.catch_up([(7, tokens, [0, 1], True)])
    assert seen == [([101, 102, 103], [20, 21, 22], [10.0, 12.0, 15.0])]
    assert runner.has_first(7, len(tokens))


def test_runners_up_follow_the_draw():
    """A row's runners-up are the tokens that came next in its own draw: greedy rows by logit, sampled rows in the
    exponential race (the same noise), filtered tokens never; the draw itself is unchanged."""
    from slipstream.kernels.hash import exponential_noise
    from slipstream.layers.sampler import sample
    from slipstream.runner.sampling import SamplingTensors
    from slipstream.runner.batch import SamplingRow
    from slipstream.runner.inputs import Stager

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 50, generator=g) * 2
    rows = [SamplingRow(SamplingParams(temperature=0), 0, 0), SamplingRow(SamplingParams(temperature=0.9, seed=5), 5, 2),
            SamplingRow(SamplingParams(temperature=1.0, top_k=3, seed=6), 6, 1)]
    build = lambda: SamplingTensors(torch.device("cpu"), 50, [], 8).build(  # noqa: E731
        rows, [r.num_output_tokens for r in rows], None, Stager(torch.device("cpu"), torch.int64, 256))
    plain, out = sample(logits, build()), sample(logits, build(), alternatives=3)
    assert out.tokens.tolist() == plain.tokens.tolist()
    assert out.runners_up[0].tolist() == logits[0].argsort(descending=True)[1:4].tolist()
    race = torch.softmax(logits[1] / 0.9, -1) / exponential_noise(torch.tensor([5]), torch.tensor([2]), 50)[0]
    assert [out.tokens[1].item()] + out.runners_up[1].tolist() == race.argsort(descending=True)[:4].tolist()
    assert out.runners_up[2].tolist()[2] == -1  # top-k 3: the draw and two runners-up, no third


def test_head_checkpoints_are_checked(dirs, tmp_path):
    root = dirs[0]
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="speculative_model go together"):
        EngineConfig.from_options(None, speculative_method="eagle3")
    kw = dict(dtype="float32", device="cpu", max_model_len=128, speculative_method="eagle3")
    other = LlamaConfig(vocab_size=512, hidden_size=32)  # a head made for another target (hidden size 32)
    make_head_dir(tmp_path / "other", other)
    with pytest.raises(ValueError, match="hidden size 32"):
        LLM(str(root / "target"), speculative_model=str(tmp_path / "other"), **kw)
    cfg = AutoModelForCausalLM.from_pretrained(str(root / "target")).config
    make_head_dir(tmp_path / "deep", cfg, aux=[0, 1, 9])
    with pytest.raises(ValueError, match="eagle_aux_hidden_state_layer_ids"):
        LLM(str(root / "target"), speculative_model=str(tmp_path / "deep"), **kw)
    make_head_dir(tmp_path / "cut", cfg)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "cut" / "model.safetensors"))
    del tensors["fc.weight"]
    save_file(tensors, str(tmp_path / "cut" / "model.safetensors"))
    with pytest.raises(ValueError, match="missing 1 tensors"):
        LLM(str(root / "target"), speculative_model=str(tmp_path / "cut"), **kw)
    with pytest.raises(ValueError, match="not an EAGLE-3 head"):
        LLM(str(root / "target"), speculative_model=str(root / "target"), **kw)
    # a head trained on shorter texts than the engine serves drafts past its positions (its rotary table is extended)
    short = tmp_path / "short"
    make_head_dir(short, cfg)
    (short / "config.json").write_text(json.dumps({**json.loads((short / "config.json").read_text()),
                                                   "max_position_embeddings": 32}))
    out = LLM(str(root / "target"), speculative_model=str(short), speculative_adaptive=False, **kw).generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 100


# ---- training (slipstream train-draft) -------------------------------------------------------------------------------

def test_training_unrolls_exactly_as_the_head_drafts(dirs, tmp_path):
    """Unroll step j at position p of EAGLE-3's training-time test is the chain at inference: caught up to p - j on
    the target's states, then j drafts on its own outputs (fed the true tokens). Checked against the dense reference
    of the drafting head, for every p and j."""
    from slipstream.train_draft import Example, _new_head, save, unrolled

    root, target, _, aux = dirs
    llm = LLM(str(root / "target"), dtype="float32", device="cpu", max_model_len=128)
    runner = llm.engine.core.runner
    from slipstream.train_draft import head_config

    head = _new_head(head_config(llm.engine.core.model_config, tuple(aux), 64), runner, torch.arange(64))
    tokens = torch.randint(3, 512, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    labels, states = runner.teacher_states(tokens, tuple(sorted(aux)))
    ex = Example(torch.tensor(tokens), labels.clone(), states.clone())
    with torch.no_grad():
        outs = unrolled(head, ex.tokens, ex.states, 3)
    save(head, str(tmp_path / "h"), 3, torch.float32)
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "h" / "model.safetensors"))
    shape = json.loads((tmp_path / "h" / "config.json").read_text())
    embed = target.get_input_embeddings().weight.double()
    fused = states.double()[:-1] @ t["fc.weight"].double().T
    for j, o in enumerate(outs):
        for p in range(j, len(tokens) - 1):
            q = p - j  # caught up through q, then j chained steps
            inputs, g = tokens[1 : q + 2], fused[: q + 1]
            for _ in range(j):
                out = head_reference(t, inputs, g, embed, shape)
                inputs = inputs + [tokens[len(inputs) + 1]]
                g = torch.cat([g, out[-1:]])
            want = head_reference(t, inputs, g, embed, shape)[-1]
            assert torch.allclose(o[p].double(), want, atol=1e-4, rtol=1e-4), (j, p)


def test_train_draft_learns_the_target_and_serves(dirs, tmp_path, capsys):
    """`slipstream train-draft` on the random target's own answers to 48 prompts: replaying eight of them, the
    trained head's drafts are accepted far more often than an untrained one's (a random target is a chaotic function
    that 2.6K tokens teach only by heart: this shows the data, labels, training and format fit together; what a head
    learns of a real model is measured in docs/benchmarks.md); it loads as published heads do; the output with it is
    the output without."""
    from slipstream import cli

    root = dirs[0]
    g = torch.Generator().manual_seed(11)
    lines = [" ".join(f"t{i}" for i in torch.randint(3, 512, (8,), generator=g).tolist()) for _ in range(48)]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(lines))
    cli.main(["train-draft", str(root / "target"), "--prompts", str(prompts), "--out", str(tmp_path / "head"),
              "--answer-tokens", "48", "--epochs", "20", "--lr", "3e-3", "--draft-vocab-size", "512", "--device", "cpu",
              "--dtype", "float32", "--max-model-len", "128", "--quiet"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["sequences"] == 48 and report["draft_vocab_size"] == 512 and len(report["held_out_accuracy"]) == 3
    test = lines[:8]  # as train-draft read them
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = dict(dtype="float32", device="cpu", max_model_len=128)
    want = [o.outputs[0].token_ids for o in LLM(str(root / "target"), **kw).generate(test, params)]
    rates = {}
    for name in ("head", "untrained"):
        if name == "untrained":  # the same shape, weights as drawn before training
            make_head_dir(tmp_path / name, AutoModelForCausalLM.from_pretrained(str(root / "target")).config, seed=2)
        llm = LLM(str(root / "target"), speculative_method="eagle3", speculative_model=str(tmp_path / name),
                  num_speculative_tokens=3, speculative_adaptive=False, **kw)
        assert [o.outputs[0].token_ids for o in llm.generate(test, params)] == want
        st = llm.engine.core.stats
        rates[name] = st.accepted_draft_tokens / st.draft_tokens
    assert rates["head"] > 0.2 and rates["head"] > 10 * rates["untrained"], (rates, report)


def test_a_head_keeps_a_grammar(dirs):
    """Drafts of a constrained request are verified against masks filled after the drafts before them: the output
    with the head is the constrained output without it (a regular expression over the target's word tokens, which
    the grammar reads as their raw strings: t19 t25 t21 is "t19t25t21")."""
    from slipstream.sampling_params import StructuredOutputs

    root = dirs[0]
    kw = dict(dtype="float32", device="cpu", max_model_len=128)
    so = StructuredOutputs(regex=r"t1[0-9](t2[0-9]){2,5}")
    params = [SamplingParams(temperature=0, max_tokens=12, structured_outputs=so),
              SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=12, structured_outputs=so)]
    prompts = [[5, 6, 7], [40, 41]]
    want = LLM(str(root / "target"), **kw).generate(prompts, params)
    spec = LLM(str(root / "target"), speculative_method="eagle3", speculative_model=str(root / "default"),
               num_speculative_tokens=3, speculative_adaptive=False, **kw)
    got = spec.generate(prompts, params)
    for a, b in zip(want, got):
        assert [x.token_ids for x in a.outputs] == [y.token_ids for y in b.outputs]
        assert all(3 <= len(y.token_ids) <= 7 and y.finish_reason == "stop" for y in b.outputs), b.outputs
    assert spec.engine.core.stats.draft_tokens > 0
    assert_no_leak(spec)
