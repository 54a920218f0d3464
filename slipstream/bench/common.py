"""Shared by the benchmarks: measured ceilings (copy bandwidth, matmul rate), dummy model directories."""
from __future__ import annotations

import contextlib
import cProfile
import gc
import importlib.util
import json
import os
import pstats
import tempfile
import types
from collections.abc import Iterator
from importlib import resources

import torch

BUNDLED = {"llama-3.1-8b", "qwen3-0.6b", "qwen3-30b-a3b", "mixtral-8x7b", "glm-4.5-air"}


# A 4-bit checkpoint's quantization_config (AutoAWQ's): with random weights, a model whose 16-bit form would not fit
AWQ_4BIT = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def model_dir(name: str, quantization_config: dict | None = None) -> str:
    """A bundled config name (llama-3.1-8b, qwen3-0.6b, qwen3-30b-a3b, mixtral-8x7b, glm-4.5-air), a config.json, or
    an HF dir. Config-only inputs become a temporary directory with a synthetic word-level tokenizer over the model's
    vocabulary (for dummy weights); `quantization_config`: written into its config (random weights held quantized
    from the start)."""
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "tokenizer_config.json")) and quantization_config is None:
        return name
    if name in BUNDLED:
        cfg = json.loads(resources.files("slipstream.configs").joinpath(f"{name}.json").read_text())
    else:
        path = os.path.join(name, "config.json") if os.path.isdir(name) else name
        with open(path) as f:
            cfg = json.load(f)
    if quantization_config is not None:
        cfg["quantization_config"] = dict(quantization_config)
        kept = _dense_down_projections_kept(cfg, quantization_config.get("group_size"))
        if kept:
            cfg["quantization_config"]["modules_to_not_convert"] = [
                *(quantization_config.get("modules_to_not_convert") or ()), *kept]
    out = tempfile.mkdtemp(prefix="slipstream-dummy-")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    _synthetic_tokenizer(cfg["vocab_size"], cfg.get("eos_token_id"), out)
    return out


def _dense_down_projections_kept(cfg: dict, group: int | None) -> list[str]:
    """The dense MLPs' down projections whose input width the checkpoint's group does not divide (GLM-4.5-Air's first
    layer: 10,944 columns, groups of 128), which a 4-bit quantizer must leave 16-bit: a checkpoint lists them as not
    converted. Dense MLPs: the first `first_k_dense_replace` layers of a MoE model that has them, every layer of one
    without experts."""
    width = cfg.get("intermediate_size")
    if not group or group <= 0 or not width or width % group == 0:
        return []
    moe = any(key in cfg for key in ("n_routed_experts", "num_experts", "num_local_experts"))
    dense = cfg.get("first_k_dense_replace", 0) if moe else cfg["num_hidden_layers"]
    return [f"model.layers.{i}.mlp.down_proj" for i in range(dense)]


def _synthetic_tokenizer(vocab: int, eos: int | list[int] | None, out: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos_id = (eos[0] if isinstance(eos, list) else eos) or 2
    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token=f"w{eos_id}").save_pretrained(out)


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (median of 20)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    del src, dst
    return 2 * nbytes / times[len(times) // 2]


def matmul_rate(device: torch.device, n: int = 8192) -> float:
    """bf16 dense matmul FLOP/s on random data (median of 10)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def graph_us(calls: list) -> float:
    """Mean µs per call, replaying all of `calls` in one CUDA graph: µs-scale kernels are timed without launch gaps,
    as they run inside the engine's decode graphs."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for fn in calls:  # compile and autotune outside the capture
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps / len(calls)


def module_from_file(path: str) -> types.ModuleType:
    """Another version of one of our modules, loaded from its file (an A/B script's "before", e.g. a file of main's
    tree) beside the one this tree imports."""
    spec = importlib.util.spec_from_file_location(f"{os.path.splitext(os.path.basename(path))[0]}_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def table(rows: list[list[object]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


@contextlib.contextmanager
def watch_compiles(label: str) -> Iterator[list[str]]:
    """Collect the Triton kernels compiled (or autotuned) inside the block and warn about them: a compile inside a
    timed region spoils the timing, and in a server it is a latency spike."""
    from slipstream.kernels._device import on_compile

    seen: list[str] = []
    try:
        restore = on_compile(lambda kernel, _: seen.append(kernel))
    except RuntimeError:  # a Triton without a compilation listener: nothing to watch with
        restore = lambda: None  # noqa: E731
    try:
        yield seen
    finally:
        restore()
        if seen:
            # each variant whole (its constants and which arguments are multiples of 16): the name alone does not
            # say which case the warm-up missed
            print(f"WARNING: {len(seen)} Triton compilations inside '{label}': {sorted({k.split('(')[0] for k in seen})}")
            for variant in sorted(set(seen)):
                print(f"  {variant}")


def release_gpu_memory() -> None:
    """Return the GPU memory of engines the caller has dropped (graphs and pools are freed by the collector), before
    the next engine budgets its KV cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def exposed_times(kernels: list[tuple[str, float, float]]) -> tuple[dict[str, list[float]], float]:
    """Kernels as (name, start, end) on one device -> ({name: [launches, time in which it alone extended the device's
    busy time]}, that busy time). With programmatic dependent launch a kernel's programs are placed while the kernel
    before it runs and wait for it, and a profiler counts that wait in the kernel's own time: a kernel table then
    ranks the small kernels after the big ones by their predecessors' tails. The time each kernel adds past the
    kernels before it does not double count: the times add up to the busy time."""
    out: dict[str, list[float]] = {}
    frontier, busy = float("-inf"), 0.0
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        added = max(0.0, end - max(start, frontier))
        frontier = max(frontier, end)
        busy += added
        entry = out.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += added
    return out, busy


@contextlib.contextmanager
def profiled(kind: str | None) -> Iterator[None]:
    """--profile host: cProfile of the block (the engine loop); --profile gpu: torch.profiler's kernel table, and each
    kernel's time counted past the kernels before it (exposed_times)."""
    if kind == "host":
        prof = cProfile.Profile()
        prof.enable()
        yield
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    elif kind == "gpu":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            yield
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
        kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA]
        times, busy = exposed_times(kernels)
        rows = [["kernel", "launches", "exposed us", "us a launch", "share of busy time"]]
        for name, (n, t) in sorted(times.items(), key=lambda kv: -kv[1][1])[:20]:
            rows.append([name[:60], n, f"{t:.0f}", f"{t / n:.2f}", f"{100 * t / busy:.1f}%"])
        print(f"each kernel's time past the kernels before it (busy {busy / 1e3:.2f} ms):")
        print(table(rows))
    else:
        yield
