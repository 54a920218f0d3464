"""Steps that carry many tokens per sequence.

Runner level (plain-data steps): feeding k known tokens to a sequence in one step (teacher forcing) gives the
same logits and writes the same KV as k one-token steps. On a GPU the single-token steps replay the decode
graphs and the k-token steps a graph ladder captured for k tokens (scripts/gpu_check.sh runs this file there).

Engine level: drafts given to running sequences (as a speculative proposer will) are verified by the rule
"accept while the draw equals the draft, then take the draw"; whatever the drafts, the output is exactly that
of plain decoding (greedy, seeded sampling, penalties), correct drafts save steps, and no page leaks.
"""
import random
from dataclasses import replace

import pytest
import torch

from conftest import assert_no_leak
from graph_emulation import emulate_cuda_graphs
from slipstream import SamplingParams
from slipstream.config import EngineConfig, ModelConfig, MoEConfig
from slipstream.runner.batch import SamplingRow, SeqStep, Step
from slipstream.runner.cuda_graphs import CapturePool, GraphLadder, PiecewiseLadder
from slipstream.runner.inputs import front_padded, host_inputs
from slipstream.runner.model_runner import ModelRunner

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TINY = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                   max_position_embeddings=256, tie_word_embeddings=True, qk_norm=True)
BS = 16


def _logits_by_seq(runner: ModelRunner, step: Step) -> dict[int, torch.Tensor]:
    seqs, logits, _ = runner.compute_logits(step)
    out, r = {}, 0
    for s in seqs:
        if s.sampling is not None:
            out[s.seq_id] = logits[r : r + s.num_samples].float().cpu()
            r += s.num_samples
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_k_tokens_in_one_step_equal_k_single_steps(device):
    k = 4
    config = EngineConfig.from_options(None, device=device, dtype="float32", block_size=BS, num_blocks=32,
                                       max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256)
    runner = ModelRunner(config, TINY, None, 256, {2})
    if device == "cuda":
        runner.capture_graphs(k)
        assert set(runner.graphs) == {1, k}
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (37, 21)]
    forced = [torch.randint(3, 256, (k,), generator=g).tolist() for _ in prompts]
    row = SamplingRow(SamplingParams(temperature=0), seed=0, num_output_tokens=0)

    def tables(first_page: int) -> list[list[int]]:
        return [list(range(first_page + 4 * i, first_page + 4 * i + 4)) for i in range(len(prompts))]

    # k single-token steps (sequences 0, 1 on pages 0..7)
    t1 = tables(0)
    runner.compute_logits(Step([SeqStep(i, p, 0, t1[i], 0, row) for i, p in enumerate(prompts)]))
    single = {i: [] for i in range(len(prompts))}
    for j in range(k):
        got = _logits_by_seq(runner, Step([SeqStep(i, [forced[i][j]], len(p) + j, t1[i], 0, row) for i, p in enumerate(prompts)]))
        for i in single:
            single[i].append(got[i])
    # one step of k tokens per sequence (sequences 10, 11 on pages 8..15): the first is the decode token, the
    # other k - 1 are drafts, so k rows are drawn
    t2 = tables(8)
    runner.compute_logits(Step([SeqStep(10 + i, p, 0, t2[i], 0, row) for i, p in enumerate(prompts)]))
    multi = _logits_by_seq(runner, Step([SeqStep(10 + i, forced[i], len(p), t2[i], k - 1, row) for i, p in enumerate(prompts)]))
    for i, p in enumerate(prompts):
        ref = torch.cat(single[i])
        assert multi[10 + i].shape == ref.shape == (k, TINY.vocab_size)
        torch.testing.assert_close(multi[10 + i], ref, atol=2e-4, rtol=1e-4)
        # the same K/V at every position the forced tokens were written to (and the prompt's)
        slots1 = [t1[i][q // BS] * BS + q % BS for q in range(len(p) + k)]
        slots2 = [t2[i][q // BS] * BS + q % BS for q in range(len(p) + k)]
        for layer in range(TINY.num_layers):
            for cache in (*runner.backend.kv_cache(layer), *(runner.backend.kv_scales(layer) or ())):
                flat = cache.view(-1, *cache.shape[2:])
                torch.testing.assert_close(flat[slots2].cpu(), flat[slots1].cpu(), atol=2e-5, rtol=1e-5)


def test_capture_pool_replays_on_new_inputs_and_restores_the_collector(monkeypatch):
    """CapturePool.capture (emulated on the CPU): a replay computes from what the captured inputs hold now, into the
    captured result; the garbage collector, paused during the capture, is on again after it (and after a failure)."""
    import gc

    emulate_cuda_graphs(monkeypatch)
    pool = CapturePool(torch.device("cpu"))
    x = torch.arange(4.0)
    with torch.inference_mode():
        graph, y = pool.capture(lambda: x * 2 + 1)
        x.copy_(torch.tensor([10.0, 20.0, 30.0, 40.0]))
        graph.replay()
    assert y.tolist() == [21.0, 41.0, 61.0, 81.0] and gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        pool.capture(lambda: 1 / 0)
    assert gc.isenabled()


# On the CPU the graphs are emulated (tests/graph_emulation.py), where the experts' reference loop is not graph-safe
PIECES = [(d, v) for d in DEVICES for v in ("dense", "eagle3-states", "fp8-kv", "moe") if d == "cuda" or v != "moe"]


@pytest.mark.parametrize("device,variant", PIECES)
def test_steps_of_any_shape_in_graph_pieces_equal_eager(monkeypatch, device, variant):
    """Mixed steps (prompt chunks beside decodes, fed tokens, a cached prefix, drafts of several lengths, a step of
    exactly a captured size) replayed as captured pieces with the attention between them: the same logits, the same
    states for a draft head, the same KV as the eager forward, step after step."""
    aux = (1,) if variant == "eagle3-states" else ()
    mc = replace(TINY, moe=MoEConfig(4, 2, 32, layers=(1,))) if variant == "moe" else TINY
    config = EngineConfig.from_options(None, device=device, dtype="float32", block_size=BS, num_blocks=64,
                                       max_model_len=256, max_num_seqs=8, max_num_batched_tokens=200,
                                       kv_cache_dtype="fp8" if variant == "fp8-kv" else "auto")
    runner = ModelRunner(config, mc, None, 256, {2}, aux_layers=aux)
    if device == "cpu":  # the runner captures graphs on CUDA only
        emulate_cuda_graphs(monkeypatch)
        runner.pieces = PiecewiseLadder(runner.model, runner.backend, runner.ints, 200, runner.kv.pad_slot,
                                        CapturePool(runner.device), aux)
    pieces = runner.pieces
    assert pieces is not None and pieces.sizes[-1] == 200 and 64 in pieces.sizes
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (37, 27, 80)]
    more = torch.randint(3, 256, (8,), generator=g).tolist()
    row = SamplingRow(SamplingParams(temperature=0), seed=0, num_output_tokens=0)

    def run(base: int, first_page: int) -> tuple[list[dict], list[dict], list[list[int]]]:
        t = [list(range(first_page + 6 * i, first_page + 6 * i + 6)) for i in range(3)]
        a, b, c = (base + i for i in range(3))
        runner.launch(Step([SeqStep(a, prompts[0], 0, t[0], 0, row), SeqStep(b, prompts[1], 0, t[1], 0, row)]))
        steps = [
            # the two decodes fed the tokens just drawn, on the device, beside the first chunk of a prompt
            Step([SeqStep(a, [0], 37, t[0], 0, row, feed_previous=True), SeqStep(b, [0], 27, t[1], 0, row, feed_previous=True),
                  SeqStep(c, prompts[2][:50], 0, t[2])]),
            # its last chunk after the cached 50, beside decodes given their tokens
            Step([SeqStep(a, [more[0]], 38, t[0], 0, row), SeqStep(b, [more[1]], 28, t[1], 0, row),
                  SeqStep(c, prompts[2][50:], 50, t[2], 0, row)]),
            # drafts of several lengths: 3, none, 1
            Step([SeqStep(b, [more[2]], 29, t[1], 0, row), SeqStep(a, more[3:7], 39, t[0], 3, row),
                  SeqStep(c, more[6:8], 80, t[2], 1, row)]),
        ]
        return (*_run_steps(runner, steps, bool(aux)), t)

    replays = []
    monkeypatch.setattr(pieces, "run", lambda h, feed: replays.append(len(h.input_ids)) or type(pieces).run(pieces, h, feed))
    graphed, graphed_states, t1 = run(0, 0)
    assert replays == [64, 52, 32, 7]  # every step, the first prefill (exactly a captured size) included
    runner.pieces = None
    eager, eager_states, t2 = run(10, 20)
    _same_by_seq(graphed, eager, 10)
    _same_by_seq(graphed_states, eager_states, 10)
    _same_kv(runner, t1, t2, (43, 30, 82))


def _run_steps(runner: ModelRunner, steps: list[Step], states: bool) -> tuple[list[dict], list[dict]]:
    """Each step's logits by sequence id, and (`states`) the states a draft head reads, by sequence id."""
    got, kept = [], []
    for step in steps:
        got.append(_logits_by_seq(runner, step))
        if states:
            kept.append({sid: runner.head_states[r : r + n].cpu().clone() for sid, (r, _, n) in runner.computed.items()})
    return got, kept


def _same_by_seq(a: list[dict], b: list[dict], offset: int) -> None:
    """Step by step, sequence i's tensors in `a` equal sequence i + offset's in `b`."""
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        assert {k + offset for k in step_a} == set(step_b)
        for sid, x in step_a.items():
            torch.testing.assert_close(x, step_b[sid + offset], atol=2e-4, rtol=1e-4)


def _same_kv(runner: ModelRunner, t1: list[list[int]], t2: list[list[int]], lengths: tuple[int, ...]) -> None:
    """Each position's K/V (and scales) of sequence i, on pages t1[i] and t2[i], equal in every layer."""
    for i, n in enumerate(lengths):
        slots1 = [t1[i][q // BS] * BS + q % BS for q in range(n)]
        slots2 = [t2[i][q // BS] * BS + q % BS for q in range(n)]
        for layer in range(TINY.num_layers):
            for cache in (*runner.backend.kv_cache(layer), *(runner.backend.kv_scales(layer) or ())):
                flat = cache.view(-1, *cache.shape[2:])
                # an FP8 value may round one step (1/8) the other way on a last-bit difference
                tol = dict(atol=4e-3, rtol=0.13) if cache.dtype == torch.float8_e4m3fn else dict(atol=2e-5, rtol=1e-5)
                torch.testing.assert_close(flat[slots1].float().cpu(), flat[slots2].float().cpu(), **tol)


def _with_drafts(monkeypatch, llm, propose):
    """Before every step, give each decoding sequence the drafts `propose(seq)` returns."""
    core = llm.engine.core
    monkeypatch.setattr(core, "overlap", False)  # drafts need every earlier token known, as a proposer does
    step = core.step

    def drafting_step():
        for seq in core.scheduler.running:
            if seq.num_tokens - seq.num_computed_tokens == 1:
                seq.draft_token_ids = propose(seq)
        return step()

    monkeypatch.setattr(core, "step", drafting_step)


PARAMS = {
    "greedy": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    "seeded": SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=24, logprobs=2, ignore_eos=True),
    "penalties": SamplingParams(temperature=0.8, seed=3, repetition_penalty=1.3, frequency_penalty=0.5, max_tokens=24,
                                ignore_eos=True),
    "stops_in_drafts": SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
}


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_drafts_never_change_the_output(fresh, monkeypatch, kind):
    llm, params, k = fresh, PARAMS[kind], 4
    prompt = "The three most important ideas in physics are"
    core = llm.engine.core
    start = core.stats.steps
    ref = llm.generate([prompt], params)[0].outputs[0]
    plain_steps = core.stats.steps - start

    def right(seq):
        n = seq.num_output_tokens
        return ref.token_ids[n : n + k]

    rng = random.Random(0)

    def wrong(seq):
        return [rng.randrange(llm.engine.model_config.vocab_size) for _ in range(k)]

    def half(seq):  # right for two tokens, then wrong: a rejection in the middle
        good = right(seq)[:2]
        return good + [(t + 1) % 1000 for t in right(seq)[2:]]

    for name, propose in (("right", right), ("wrong", wrong), ("half", half)):
        with monkeypatch.context() as m:
            _with_drafts(m, llm, propose)
            before = core.stats.steps
            out = llm.generate([prompt], params)[0].outputs[0]
            steps = core.stats.steps - before
        assert out.token_ids == ref.token_ids, name
        assert out.text == ref.text and out.finish_reason == ref.finish_reason
        if params.logprobs is not None:
            assert len(out.logprobs) == len(ref.logprobs)
            for a, b in zip(out.logprobs, ref.logprobs):
                assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-3 for t in a)
        if name == "right":
            assert steps < plain_steps, f"correct drafts took {steps} steps, plain decoding {plain_steps}"
    assert_no_leak(llm)


@pytest.mark.parametrize("device,variant", [(d, v) for d in DEVICES for v in ("dense", "fp8-kv", "eagle3-states")])
def test_uneven_drafts_padded_to_the_verifying_shape_equal_the_step_unpadded(monkeypatch, device, variant):
    """Sequences verifying 3, 0 and 1 drafts (one fed the token just drawn, on the device) beside a prompt's last 2
    tokens, padded in front to the 4 tokens a sequence of the verifying ladder (on a GPU they replay its graph; on the
    CPU the padded step runs eagerly): the same logits, draft-head states and KV as the same steps unpadded."""
    aux = (1,) if variant == "eagle3-states" else ()
    config = EngineConfig.from_options(None, device=device, dtype="float32", block_size=BS, num_blocks=64,
                                       max_model_len=256, max_num_seqs=8, max_num_batched_tokens=200,
                                       kv_cache_dtype="fp8" if variant == "fp8-kv" else "auto")
    runner = ModelRunner(config, TINY, None, 256, {2}, aux_layers=aux)
    padded_shape = runner._graph_shaped
    replays = []
    if device == "cuda":
        runner.capture_graphs(4)
        ladder = runner.graphs[4]
        monkeypatch.setattr(ladder, "run", lambda h, feed: replays.append(len(h.input_ids)) or type(ladder).run(ladder, h, feed))
    else:  # no graphs on the CPU: pad as the runner would for a verifying ladder of 4 tokens a sequence
        padded_shape = lambda h: front_padded(h, 4, runner.kv.pad_slot) or h  # noqa: E731
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (37, 27, 80, 30)]
    more = torch.randint(3, 256, (12,), generator=g).tolist()
    row = SamplingRow(SamplingParams(temperature=0), seed=0, num_output_tokens=0)

    def run(base: int, first_page: int) -> tuple[list[dict], list[dict], list[list[int]]]:
        t = [list(range(first_page + 6 * i, first_page + 6 * i + 6)) for i in range(4)]
        a, b, c, d = (base + i for i in range(4))
        runner.launch(Step([SeqStep(a, prompts[0], 0, t[0], 0, row), SeqStep(b, prompts[1], 0, t[1], 0, row),
                            SeqStep(c, prompts[2], 0, t[2], 0, row), SeqStep(d, prompts[3][:28], 0, t[3])]))
        steps = [
            # b fed the token just drawn, no drafts; a 3 drafts; c 1; d its prompt's last 2 tokens
            Step([SeqStep(b, [0], 27, t[1], 0, row, feed_previous=True), SeqStep(a, more[0:4], 37, t[0], 3, row),
                  SeqStep(c, more[4:6], 80, t[2], 1, row), SeqStep(d, prompts[3][28:], 28, t[3], 0, row)]),
            Step([SeqStep(a, more[6:8], 41, t[0], 1, row), SeqStep(b, more[8:11], 28, t[1], 2, row),
                  SeqStep(c, [more[11]], 82, t[2], 0, row)]),
        ]
        return (*_run_steps(runner, steps, bool(aux)), t)

    monkeypatch.setattr(runner, "_graph_shaped", padded_shape)
    padded, padded_states, t1 = run(0, 0)
    if device == "cuda":
        assert replays == [16, 12]
    monkeypatch.setattr(runner, "_graph_shaped", lambda h: h)
    plain, plain_states, t2 = run(10, 30)
    _same_by_seq(padded, plain, 10)
    _same_by_seq(padded_states, plain_states, 10)
    _same_kv(runner, t1, t2, (43, 31, 83, 30))  # the padding rows wrote over none of them


def test_front_padding_keeps_each_real_row_where_the_attention_reads_it():
    row = SamplingRow(SamplingParams(temperature=0), seed=0, num_output_tokens=0)
    h = host_inputs([SeqStep(0, [5, 6, 7], 10, [0], 2, row), SeqStep(1, [8], 20, [1, 2]), SeqStep(2, [9, 4], 3, [3], 1, row)],
                    BS, False)
    assert h.sample_rows == [0, 1, 2, 4, 5]
    p = front_padded(h, 3, pad_slot=99)
    assert p.input_ids == [5, 6, 7, 0, 0, 8, 0, 9, 4] and p.positions == [10, 11, 12, 18, 19, 20, 2, 3, 4]
    assert p.slots == [10, 11, 12, 99, 100, 36, 99, 51, 52] and p.query_lens == [3, 3, 3] and p.seq_lens == [13, 21, 5]
    assert p.first_rows == [0, 5, 7] and p.sample_rows == [0, 1, 2, 7, 8] and p.num_decodes == 0
    assert front_padded(h, 2, pad_slot=99) is None  # a sequence computes more tokens than the shape holds
    assert front_padded(host_inputs([SeqStep(0, [5, 6], 0, [0], 1)], BS, False), 3, pad_slot=99) is None  # context < 3


def test_only_uneven_steps_that_fit_the_verifying_ladder_are_padded():
    """The runner pads a step to the verifying ladder's shape only where that replays one graph of at most
    PAD_TO_GRAPH_TOKENS rows: not all-decode steps (the decode ladder), not steps already of that shape, not a
    sequence computing more tokens than the shape, not beyond the ladder or the bound (counted at the replayed size)."""
    config = EngineConfig.from_options(None, device="cpu", dtype="float32", block_size=BS, num_blocks=64,
                                       max_model_len=256, max_num_seqs=64, max_num_batched_tokens=256)
    runner = ModelRunner(config, TINY, None, 256, {2})

    class Ladder:  # the sizes a verifying ladder of 4 tokens a sequence would capture, up to 48 sequences
        sizes = [1, 2, 4, 8, 16, 32, 48]
        fits, size_for = GraphLadder.fits, GraphLadder.size_for

    runner.graphs = {1: Ladder(), 4: Ladder()}
    row = SamplingRow(SamplingParams(temperature=0), seed=0, num_output_tokens=0)

    def shaped(counts: list[int]) -> list[int]:
        seqs = [SeqStep(i, [7] * c, 40, [i, 64 - i, 1, 2], c - 1, row) for i, c in enumerate(counts)]
        return runner._graph_shaped(host_inputs(seqs, BS, False)).query_lens

    assert shaped([1, 4, 2]) == [4, 4, 4]
    assert shaped([1] * 3) == [1] * 3 and shaped([4] * 3) == [4] * 3 and shaped([5, 1]) == [5, 1]
    assert shaped([2] * 33) == [4] * 33  # replays 48 x 4 = 192 rows
    assert shaped([2] * 49) == [2] * 49  # beyond the ladder
    runner.graphs = {1: Ladder(), 8: Ladder()}
    assert shaped([2] * 32) == [8] * 32  # 32 x 8 = 256 rows
    assert shaped([2] * 33) == [2] * 33  # 33 sequences replay 48 x 8 = 384 rows


BEHIND = [(d, p) for d in DEVICES for p in ("eager", "padded", "pieces", "ladder") if d == "cuda" or p != "ladder"]


@pytest.mark.parametrize("device,path", BEHIND)
def test_a_step_planned_behind_a_verifying_one_equals_the_step_planned_after_it(monkeypatch, device, path):
    """Step 1 verifies drafts (a: 3, the first two right; b: 2, wrong; c: none). Step 2 is launched before step 1 is
    read, planned as if every draft were accepted: the device feeds each sequence the draw after its last accepted
    draft and moves its positions, KV slots and context back by the drafts rejected. Its logits and KV equal those of
    step 2 planned after reading step 1 (run eagerly), on each path a step takes: eagerly, padded in front to a
    verifying shape, in graph pieces, and on a GPU the verifying ladder's graphs."""
    config = EngineConfig.from_options(None, device=device, dtype="float32", block_size=BS, num_blocks=64,
                                       max_model_len=256, max_num_seqs=8, max_num_batched_tokens=200)
    runner = ModelRunner(config, TINY, None, 256, {2})
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (37, 27, 30)]
    junk = torch.randint(3, 256, (8,), generator=g).tolist()
    row = SamplingRow(SamplingParams(temperature=0), seed=0, num_output_tokens=0)

    def draws(step: Step) -> dict[int, list[int]]:
        return {r.seq_id: r.tokens for r in runner.execute(step)}

    eager = (None, {}, lambda h: h)

    def use(pieces, graphs, shape) -> None:  # noqa: ANN001
        runner.pieces, runner.graphs = pieces, graphs
        monkeypatch.setattr(runner, "_graph_shaped", shape)

    path_of = {"eager": eager, "padded": (None, {}, lambda h: front_padded(h, 3, runner.kv.pad_slot, 3) or h)}
    if path == "pieces":
        if device == "cpu":
            emulate_cuda_graphs(monkeypatch)
            runner.pieces = PiecewiseLadder(runner.model, runner.backend, runner.ints, 200, runner.kv.pad_slot,
                                            CapturePool(runner.device))
        path_of["pieces"] = (runner.pieces, {}, lambda h: h)
    if path == "ladder":
        runner.capture_graphs(3)
        path_of["ladder"] = (None, runner.graphs, lambda h: h)
    use(*eager)
    # the greedy continuation of a's prompt, two tokens past its first draw (on pages of their own)
    first = draws(Step([SeqStep(99, prompts[0], 0, list(range(50, 54)), 0, row)]))[99][0]
    g1 = draws(Step([SeqStep(99, [first], 37, list(range(50, 54)), 0, row)]))[99][0]
    g2 = draws(Step([SeqStep(99, [g1], 38, list(range(50, 54)), 0, row)]))[99][0]
    even = path == "ladder"  # (its graphs take 3 tokens for every sequence)

    def run(base: int, first_page: int, behind: bool) -> tuple[dict, list[list[int]], list[int], list[int]]:
        t = [list(range(first_page + 6 * i, first_page + 6 * i + 6)) for i in range(3)]
        a, b, c = (base + i for i in range(3))
        use(*eager)
        f = draws(Step([SeqStep(s, p, 0, tab, 0, row) for s, p, tab in zip((a, b, c), prompts, t)]))
        step1 = Step([SeqStep(a, [f[a][0], g1, g2, junk[0]], 37, t[0], 3, row),
                      SeqStep(b, [f[b][0]] + junk[1:3], 27, t[1], 2, row), SeqStep(c, [f[c][0]], 30, t[2], 0, row)])
        drafts = {a: [junk[3], junk[4]], b: junk[5:7] if even else [], c: junk[7:9] if even else [junk[7]]}
        use(*path_of[path])
        if behind:  # planned before step 1 is read: every draft accepted
            launched = runner.launch(step1)
            step2 = Step([SeqStep(s, [0] + drafts[s], start, tab, len(drafts[s]), row, feed_previous=True)
                          for s, start, tab in zip((a, b, c), (41, 30, 31), t)])
            logits = _logits_by_seq(runner, step2)
            results = {r.seq_id: r.tokens for r in runner.collect(launched)}
        else:
            results = {r.seq_id: r.tokens for r in runner.execute(step1)}
            use(*eager)
            step2 = Step([SeqStep(s, results[s][-1:] + drafts[s], start + len(results[s]), tab, len(drafts[s]), row)
                          for s, start, tab in zip((a, b, c), (37, 27, 30), t)])
            logits = _logits_by_seq(runner, step2)
        ends = [start + len(results[s]) + len(drafts[s]) for s, start in zip((a, b, c), (37, 27, 30))]
        return logits, t, ends, [len(results[s]) - 1 for s in (a, b, c)]

    behind, t1, ends, accepted = run(0, 0, True)
    after, t2, ends2, accepted2 = run(10, 20, False)
    assert accepted == accepted2 == [2, 0, 0] and ends == ends2
    _same_by_seq([behind], [after], 10)
    _same_kv(runner, t1, t2, ends)
