"""Tensor parallelism on the CPU over gloo: two ranks (this process and one worker) give exactly the tokens of one,
on the embedded SmolLM2 (9 query / 3 KV heads: an uneven split, 2 + 1 KV heads), a random Qwen3 whose one KV head
both ranks copy, and a random Qwen3-MoE whose experts are split; through chunked prefill and a preemption. A rank
reads only its slices of a checkpoint; a worker that dies stops the engine with an error, not a hang."""
import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import assert_no_leak
from slipstream import LLM, SamplingParams
from slipstream.parallel.shard import Shard, split

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=16, logprobs=2, ignore_eos=True)


def test_split_and_heads():
    assert [split(10, 3, r) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    assert [Shard(r, 2).heads(9, 3) for r in range(2)] == [(0, 6, 0, 2), (6, 3, 2, 1)]  # SmolLM2: KV heads 2 + 1
    assert [Shard(r, 4).heads(16, 2) for r in range(4)] == [(0, 4, 0, 1), (4, 4, 0, 1), (8, 4, 1, 1), (12, 4, 1, 1)]
    with pytest.raises(ValueError, match="cannot be split"):
        Shard(0, 4).heads(6, 2)


def _same(want, got, logprobs=False):
    for a, b in zip(want, got):
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids
            if logprobs:
                for la, lb in zip(x.logprobs, y.logprobs):
                    assert la.keys() == lb.keys() and all(abs(la[t] - lb[t]) < 1e-4 for t in la)


def test_two_ranks_give_the_tokens_of_one(gguf_path):
    """The embedded model, fp32: greedy, seeded sampling with logprobs, and a regular expression (structured
    output); a pool small enough to preempt and a step budget that chunks the prompts; two ranks with overlap."""
    kw = dict(dtype="float32", device="cpu", max_model_len=128, block_size=16, num_blocks=8, max_num_batched_tokens=48)
    prompts = ["The history of the city of Paris begins", "def quicksort(xs):", "Once upon a time, in a village",
               "The three primary colours are", "In mathematics, a prime number is"]
    from slipstream.sampling_params import StructuredOutputs

    regex = SamplingParams(temperature=0.7, seed=1, max_tokens=12, structured_outputs=StructuredOutputs(regex=r"[a-z]{2,8} [0-9]{2}"))
    one = LLM(gguf_path, **kw)
    want = [one.generate(prompts, p) for p in (GREEDY, SEEDED, regex)]
    assert one.engine.core.stats.num_preemptions > 0
    # overlap on, as on a GPU: rank 0 reads the step in flight before it fills a step's masks
    with LLM(gguf_path, tensor_parallel_size=2, async_scheduling="on", **kw) as two:
        _same(want[0], two.generate(prompts, GREEDY))
        _same(want[1], two.generate(prompts, SEEDED), logprobs=True)
        _same(want[2], two.generate(prompts, regex))  # the masks rank 0 fills reach the other rank
        assert two.engine.core.stats.num_preemptions > 0
        scored = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=2)  # rank 0 alone reads the scores
        for w, g in zip(one.generate(prompts, scored), two.generate(prompts, scored)):
            assert len(w.prompt_logprobs) == len(g.prompt_logprobs) == len(w.prompt_token_ids)
            for a, b in zip(w.prompt_logprobs[1:], g.prompt_logprobs[1:]):
                assert a[0] == b[0] and next(iter(a[1])) == next(iter(b[1])) and set(a[1]) == set(b[1])
                assert all(abs(a[1][t] - b[1][t]) < 1e-4 for t in a[1])
        assert_no_leak(two)


@pytest.mark.parametrize("scheme, activations", [("tensor", "static"), ("channel", "static"), ("block", "dynamic")])
def test_two_ranks_on_fp8_checkpoints(tmp_path, scheme, activations):
    """FP8 checkpoints in each scheme `slipstream quantize` writes split with their scales (per-tensor ones whole on
    each rank, per-channel ones by rows, 128 x 128 blocks by block): the tokens are one rank's. (With activations
    quantized per token on the fly, a row-parallel rank scales its own half of each row, finer than one rank does:
    close, not identical; per-128 groups, as with block weights, split on group edges and stay identical.) A 16-bit
    checkpoint quantized as it loads runs too."""
    from test_fp8 import _tiny_llama

    from slipstream.loader.quantize import write_fp8_checkpoint

    src, out = str(tmp_path / "src"), str(tmp_path / "fp8")
    _tiny_llama(src, hidden=128, inter=256, heads=4, kv_heads=4, head_dim=128)  # every split falls on a block edge
    calib = [" ".join(f"w{i}" for i in range(384))] if activations == "static" else None
    write_fp8_checkpoint(src, out, scheme, activations, calib, 512, device="cpu", dtype="float32")
    g = __import__("random").Random(1)
    prompts = [[g.randrange(3, 384) for _ in range(n)] for n in (20, 45)]
    kw = dict(dtype="float32", device="cpu", max_model_len=128, max_num_batched_tokens=32)
    want = LLM(out, **kw).generate(prompts, GREEDY)
    with LLM(out, tensor_parallel_size=2, **kw) as two:
        _same(want, two.generate(prompts, GREEDY))
    if scheme == "channel":
        with LLM(src, tensor_parallel_size=2, quantization="fp8", **kw) as online:
            assert [len(o.outputs[0].token_ids) for o in online.generate(prompts, GREEDY)] == [24, 24]


@pytest.mark.parametrize("fmt, experts", [("fp8-channel", False), ("fp8-tensor", False), ("fp8-channel", True),
                                          ("fp8-block", True), ("awq", False), ("gptq", True)])
def test_two_ranks_on_quantized_experts(tmp_path, fmt, experts):
    """A MoE checkpoint whose experts are FP8 or 4-bit (every other layer 16-bit): each rank reads its share, scales
    split with the experts' width (4-bit: a group of 64 columns a rank) or whole with whole experts (expert
    parallel): the tokens are one rank's. FP8 block scales split by width only on block edges: a narrower rank's
    share is refused, naming the blocks."""
    from test_fp8 import _experts_only, _fp8_dequantized, _tiny_moe
    from test_int4 import _int4_dequantized

    from slipstream.layers.quantization import parse_quantization_config
    from slipstream.loader.quantize import write_fp8_checkpoint, write_int4_checkpoint

    weights = _tiny_moe(tmp_path / "src", "qwen3_moe")
    src, q = str(tmp_path / "src"), str(tmp_path / "q")
    if fmt.startswith("fp8"):
        write_fp8_checkpoint(src, q, fmt.removeprefix("fp8-"))
        dequantized = _fp8_dequantized
    else:
        cfg = write_int4_checkpoint(src, q, fmt, 64)
        dequantized = _int4_dequantized(parse_quantization_config(cfg["quantization_config"]), weights)
    _experts_only(q, str(tmp_path / "experts"), str(tmp_path / "deq"), weights, dequantized)
    g = __import__("random").Random(2)
    prompts = [[g.randrange(3, 512) for _ in range(n)] for n in (20, 45)]
    kw = dict(dtype="float32", device="cpu", max_model_len=128, max_num_batched_tokens=32)
    want = LLM(str(tmp_path / "experts"), **kw).generate(prompts, GREEDY)
    with LLM(str(tmp_path / "experts"), tensor_parallel_size=2, enable_expert_parallel=experts, **kw) as two:
        _same(want, two.generate(prompts, GREEDY))
    if fmt == "fp8-block":
        with pytest.raises(ValueError, match="multiple of the"):
            LLM(str(tmp_path / "experts"), tensor_parallel_size=2, **kw)


@pytest.mark.parametrize("fmt", ["awq", "gptq", "online"])
def test_two_ranks_on_4bit_weights(tmp_path, fmt):
    """4-bit layers split with their group scales and zero points (packed nibbles by whole words and groups, AWQ's
    and GPTQ's transposed layouts along their own axes, GPTQ's g_idx by columns): checkpoints `slipstream quantize`
    writes, and a 16-bit one rounded as it loads, give one rank's tokens on two."""
    from test_fp8 import _tiny_llama

    from slipstream.loader.quantize import write_int4_checkpoint

    src, out = str(tmp_path / "src"), str(tmp_path / fmt)
    _tiny_llama(src, hidden=128, inter=256, heads=4, kv_heads=4, head_dim=128)  # every split falls on a group edge
    if fmt != "online":
        write_int4_checkpoint(src, out, fmt, 128, device="cpu", dtype="float32")
    path, quant = (src, "int4") if fmt == "online" else (out, "auto")
    g = __import__("random").Random(2)
    prompts = [[g.randrange(3, 384) for _ in range(n)] for n in (20, 45)]
    kw = dict(dtype="float32", device="cpu", max_model_len=128, max_num_batched_tokens=32, quantization=quant)
    want = LLM(path, **kw).generate(prompts, GREEDY)
    with LLM(path, tensor_parallel_size=2, **kw) as two:
        _same(want, two.generate(prompts, GREEDY))


def test_embedded_q4_1_kept_4bit_on_two_ranks(gguf_path):
    """The embedded GGUF's Q4_1 layers kept 4-bit (groups of 32) split over two ranks: one rank's tokens."""
    kw = dict(dtype="float32", device="cpu", max_model_len=128, quantization="int4")
    prompts = ["The history of the city of Paris begins", "def quicksort(xs):"]
    want = LLM(gguf_path, **kw).generate(prompts, GREEDY)
    with LLM(gguf_path, tensor_parallel_size=2, **kw) as two:
        _same(want, two.generate(prompts, GREEDY))


def test_gguf_8bit_layers_on_two_ranks(tmp_path):
    """A Q4_K_M-like GGUF's 8-bit layers (q | k in Q4_K with v in Q6_K: bytes, scales and offsets per 16 columns;
    down and the output in Q6_K) beside 4-bit ones, split over two ranks: one rank's tokens."""
    from test_int4 import GGUF_MIXES, _tiny_gguf

    from slipstream.bench.common import _synthetic_tokenizer

    path, tok = str(tmp_path / "q4_k_m.gguf"), str(tmp_path / "tok")
    _tiny_gguf(path, GGUF_MIXES["q4_k_m"][0])
    _synthetic_tokenizer(384, 2, tok)
    kw = dict(tokenizer=tok, dtype="float32", device="cpu", max_model_len=128, quantization="int4")
    prompts = [[5, 6, 7, 8, 9], list(range(10, 50))]
    want = LLM(path, **kw).generate(prompts, GREEDY)
    with LLM(path, tensor_parallel_size=2, **kw) as two:
        _same(want, two.generate(prompts, GREEDY))


def test_ranks_over_two_hosts(gguf_path, monkeypatch):
    """--nnodes 2: this process is host 0 (rank 0), `slipstream worker --node-rank 1` in another process host 1,
    meeting at MASTER_ADDR:MASTER_PORT as two hosts would; the tokens are one rank's."""
    import subprocess
    import sys

    from server_util import free_port

    kw = dict(dtype="float32", device="cpu", max_model_len=128, max_num_batched_tokens=32)
    prompts = ["The history of the city of Paris begins", "def quicksort(xs):"]
    want = LLM(gguf_path, **kw).generate(prompts, GREEDY)
    env = dict(__import__("os").environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, env[k])
    host1 = subprocess.Popen([sys.executable, "-m", "slipstream", "worker", gguf_path, "--node-rank", "1", "--nnodes", "2",
                              "--tensor-parallel-size", "2", "--dtype", "float32", "--device", "cpu", "--max-model-len", "128",
                              "--max-num-batched-tokens", "32"], env=env)
    try:
        with LLM(gguf_path, tensor_parallel_size=2, nnodes=2, **kw) as two:
            _same(want, two.generate(prompts, GREEDY))
        assert host1.wait(timeout=60) == 0  # the engine's stop ends the other host's ranks cleanly
    finally:
        if host1.poll() is None:
            host1.kill()
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        monkeypatch.delenv("MASTER_PORT")
        LLM(gguf_path, tensor_parallel_size=2, nnodes=2, **kw)


def test_four_ranks(tmp_path):
    """Four ranks (one KV head each) give one rank's tokens."""
    from test_random_arch_equivalence import CONFIGS, make_model_dir

    make_model_dir(tmp_path, CONFIGS["llama3"])
    prompts = [[5, 17, 200, 31, 9, 77], [300, 2, 45]]
    kw = dict(dtype="float32", device="cpu", max_model_len=128)
    want = LLM(str(tmp_path), **kw).generate(prompts, GREEDY)
    with LLM(str(tmp_path), tensor_parallel_size=4, **kw) as four:
        _same(want, four.generate(prompts, GREEDY))


@pytest.mark.parametrize("arch, experts", [("qwen3", False), ("qwen3_moe", False), ("qwen3_moe", True), ("qwen2_moe", True)])
def test_two_ranks_on_random_models(tmp_path, arch, experts):
    """Qwen3 with one KV head (both ranks hold it) and Qwen3-MoE, each rank a slice of every expert or (expert
    parallel) half of the experts whole, a dense layer between; Qwen2-MoE expert parallel (its shared expert split
    by width); random weights saved as a checkpoint; prompts
    chunked, a pool small enough to preempt, and no page leaked."""
    from test_random_arch_equivalence import CONFIGS, make_model_dir

    make_model_dir(tmp_path, CONFIGS[arch])
    g = __import__("random").Random(0)
    prompts = [[g.randrange(3, 512) for _ in range(n)] for n in (30, 7, 55, 41)]
    kw = dict(dtype="float32", device="cpu", max_model_len=128, max_num_batched_tokens=32, block_size=16, num_blocks=9)
    one = LLM(str(tmp_path), **kw)
    want = one.generate(prompts, GREEDY)
    assert one.engine.core.stats.num_preemptions > 0
    with LLM(str(tmp_path), tensor_parallel_size=2, enable_expert_parallel=experts, **kw) as two:
        if arch == "qwen3_moe":  # rank 0 holds half the experts whole, or a half-width slice of all 8
            from slipstream.layers.moe import MoE

            moe = next(m for m in two.engine.core.runner.model.modules() if isinstance(m, MoE))
            assert tuple(moe.w2.shape) == ((4, 64, 48) if experts else (8, 64, 24)), moe.w2.shape
        _same(want, two.generate(prompts, GREEDY))
        assert two.engine.core.stats.num_preemptions > 0
        assert_no_leak(two)


@pytest.mark.parametrize("arch, experts", [("llama3", False), ("qwen3_moe", True)])
def test_a_rank_reads_only_its_slices(tmp_path, arch, experts):
    """Building one rank's slice of the model from lazily read safetensors reads about half of the checkpoint's
    bytes: the norms (and a MoE's routers) are whole on each rank, everything else split (4 KV heads 2 + 2; with
    expert parallelism, half the experts whole), and exactly what the rank keeps."""
    from test_random_arch_equivalence import CONFIGS, make_model_dir

    from slipstream.attention.torch_backend import TorchAttention
    from slipstream.config import ModelConfig
    from slipstream.loader.hf import safetensors_weights
    from slipstream.models.llama import LlamaForCausalLM

    make_model_dir(tmp_path, CONFIGS[arch])
    cfg = ModelConfig.from_hf(__import__("json").load(open(tmp_path / "config.json")))
    files = [str(tmp_path / "model.safetensors")]
    total = sum(t.numel() * t.element_size() for _, t in safetensors_weights(files))
    for rank in range(2):
        with torch.device("cpu"):
            model = LlamaForCausalLM(cfg, TorchAttention(), shard=Shard(rank, 2, expert_parallel=experts))
        read = [0]
        model.load_weights(safetensors_weights(files, lazy=True, read=read))
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        assert read[0] == held  # exactly what the rank keeps
        assert 0.45 * total < read[0] < 0.55 * total, (read[0], total)


def test_an_idle_engine_keeps_its_ranks_and_a_dead_one_stops_it(gguf_path):
    """Idle for longer than the ranks' timeout (which their wait for the next step obeys too): rank 0's keep-alives
    hold the other rank, which serves the next request. Then SIGKILL it: the next step fails at once with an error
    (gloo sees the closed connection)."""
    llm = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=128, tensor_parallel_size=2, distributed_timeout_s=8)
    first = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids
    worker = llm.engine.runner.workers[0]
    time.sleep(10)
    assert worker.is_alive()
    assert llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids == first
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    start = time.monotonic()
    with pytest.raises(Exception):
        llm.generate(["Hello again"], SamplingParams(max_tokens=4))
    assert time.monotonic() - start < 60
    torch.distributed.destroy_process_group()  # this process may form another group


def test_a_rank_lost_mid_step_is_reported_once_the_step_is_stuck(monkeypatch):
    """On NCCL a step whose peer died waits in its collective until the timeout: rank 0's watch reports a rank that ends
    while a step is still under way after the grace, and kills the other local ranks first (the engine-core process then
    exits); nothing for one that ends between steps (the next step's check fails it). The step stands still here by
    waiting on an event."""
    import multiprocessing
    import threading

    from slipstream.parallel.workers import LeadRunner

    class Waiting:  # a runner whose launch waits, like a collective whose peer is gone
        release = threading.Event()

        def launch(self, step, fill_masks=None):
            self.release.wait(30)
            return step

    monkeypatch.setattr(LeadRunner, "_send", lambda self, obj: None)
    fork = multiprocessing.get_context("fork")
    reports = {}
    for mid_step in (True, False):
        workers = [fork.Process(target=time.sleep, args=(60,), daemon=True) for _ in range(2)]
        for w in workers:
            w.start()
        lead = LeadRunner(Waiting(), None, workers, keepalive_s=3600)
        reports[mid_step] = []
        lead.watch(reports[mid_step].append, grace_s=0.5)
        stepping = threading.Thread(target=lead.launch, args=("step",))
        if mid_step:
            stepping.start()
            time.sleep(0.2)
        workers[1].kill()
        workers[1].join(5)
        time.sleep(2.0)
        assert workers[0].is_alive() != mid_step  # the other rank killed only by a report
        Waiting.release.set()
        if mid_step:
            stepping.join(5)
        workers[0].kill()
        lead._closing.set()  # (no keep-alive thread left behind)
    assert len(reports[True]) == 1 and "rank 2 exited" in reports[True][0], reports
    assert reports[False] == []


def test_a_rank_killed_by_a_signal_is_named_as_the_cause_of_rank_0s_error():
    """Rank 0 meets a dead rank as a closed connection (gloo) or a step's error; a rank killed by a signal is named
    instead. One that exited on its own error (code 1: its traceback is on stderr, often rank 0's own error too)
    leaves rank 0's error as it is, and so does a Ctrl-C."""
    import multiprocessing

    from slipstream.parallel.workers import _blame

    ctx = multiprocessing.get_context("fork")
    alive, sigtermed, sigkilled = (ctx.Process(target=time.sleep, args=(60,)) for _ in range(3))
    for p in (alive, sigtermed, sigkilled):
        p.start()
    try:
        reset = RuntimeError("Connection reset by peer")
        assert _blame([alive], reset) is reset  # (after a second's wait for a rank to end)
        sigkilled.kill()  # code -9
        blamed = _blame([alive, sigkilled], reset, "the engine started")
        assert str(blamed) == "tensor-parallel rank 2 exited (code -9) while the engine started", blamed
        interrupt = KeyboardInterrupt()
        assert _blame([alive, sigkilled], interrupt) is interrupt
        os.kill(sigtermed.pid, signal.SIGTERM)
        sigtermed.join()
        assert str(_blame([sigtermed], reset)) == "tensor-parallel rank 1 exited (code -15)"
        exited = ctx.Process(target=os._exit, args=(1,))
        exited.start()
        exited.join()
        assert _blame([exited], reset) is reset
    finally:
        for p in (alive, sigtermed, sigkilled):
            p.kill()
            p.join()


def _running(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except FileNotFoundError:
        return False


def test_serve_with_two_ranks_and_its_shutdowns(gguf_path):
    """`slipstream serve --tensor-parallel-size 2`: answers, and SIGTERM leaves no rank behind; a rank killed while
    the server is idle ends it non-zero within seconds, with no request to find out; so does one killed while the
    engine starts (rank 0 waits for it in the rendezvous, which would last distributed_timeout_s, 600 s)."""
    import httpx

    from server_util import free_port
    from test_serve_process import _children, _start, _wait_healthy

    def cmdline(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read()
        except OSError:  # (ended meanwhile)
            return b""

    def ranks_of(proc):
        return [c for p in _children(proc.pid) for c in _children(p) if b"spawn_main" in cmdline(c)]

    for mode in ("stop", "kill idle", "kill starting"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _start(gguf_path, port, "--tensor-parallel-size", "2")
        try:
            if mode == "kill starting":
                deadline = time.monotonic() + 60
                while not (ranks := ranks_of(proc)) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert ranks, "the engine core started no rank"
                os.kill(ranks[0], signal.SIGKILL)
                try:
                    said = proc.communicate(timeout=30)[0].decode()  # (read as it comes: a full pipe would block it)
                except subprocess.TimeoutExpired as e:
                    alive = [p for p in [proc.pid, *_children(proc.pid)] if _running(p)]
                    raise AssertionError(f"the server outlived its killed rank; running: "
                                         f"{[cmdline(p)[:120] for p in alive]}; it said: {e.output}") from None
                assert proc.returncode != 0
                assert "tensor-parallel rank 1 exited (code -9)" in said, said  # (in the rendezvous, a load or warm-up)
                continue
            _wait_healthy(proc, url)
            r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0}, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            ranks = ranks_of(proc)
            assert ranks, "the engine core started no rank"
            if mode == "kill idle":
                os.kill(ranks[0], signal.SIGKILL)
                assert proc.wait(timeout=20) != 0
            else:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
            time.sleep(1)
            assert not [r for r in ranks if _running(r)], "a rank outlived the server"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
