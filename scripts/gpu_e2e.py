"""On the GPU: greedy output of the Triton backend with CUDA graphs equals the torch reference backend's, with
overlap (async scheduling) it equals synchronous steps', and with a draft model, n-gram token trees or an EAGLE-3
head proposing it equals plain decoding.

Two prompt sets: eight short chats, and eight questions after one long system prompt (the prefix cache shares
its pages, so the Triton decode attends to them with the cascade kernel).
fp32 (IEEE dots in the kernels): tokens must be identical. bf16: reported (near-ties may flip a token late in
a sequence, since the two backends accumulate in different orders)."""
import argparse
import sys

import torch

from slipstream import LLM, SamplingParams

PROMPTS = ["What is the capital of France?", "Write a short poem about the moon.", "Explain what a hash map is.",
           "List five animals that live in the ocean.", "How do I boil an egg?", "Translate 'thank you' into Spanish.",
           "What is 17 times 3?", "Tell me a fun fact about space."]
SYSTEM = ("You are a patient assistant for a public library. Answer briefly and kindly, cite the shelf when you know it, "
          "and never invent a book that the catalogue does not hold. ") * 8


_RUNS: dict[tuple, list[list[int]]] = {}


def run(model: str, dtype: str, backend: str, eager: bool, budget: int, system: str | None = None,
        overlap: str = "auto", quantization: str = "auto", **spec: object) -> list[list[int]]:
    """The greedy tokens of the prompts under these settings (a reference asked for again is not run again)."""
    key = (model, dtype, backend, eager, budget, system, overlap, quantization, tuple(sorted(spec.items())))
    if key not in _RUNS:
        _RUNS[key] = _run(model, dtype, backend, eager, budget, system, overlap, quantization, **spec)
    return _RUNS[key]


def _run(model: str, dtype: str, backend: str, eager: bool, budget: int, system: str | None, overlap: str,
         quantization: str, **spec: object) -> list[list[int]]:
    llm = LLM(model, device="cuda", dtype=dtype, attention_backend=backend, enforce_eager=eager, max_model_len=2048,
              max_num_batched_tokens=budget, gpu_memory_utilization=0.3, async_scheduling=overlap,
              quantization=quantization, **spec)
    head = [{"role": "system", "content": system}] if system else []
    prompts = [llm.apply_chat_template(head + [{"role": "user", "content": p}]) for p in PROMPTS]
    params = [SamplingParams(temperature=0, max_tokens=48 + 8 * i) for i in range(len(prompts))]
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    stats = llm.engine.core.stats
    accepted = f" drafts {stats.accepted_draft_tokens}/{stats.draft_tokens} accepted" if spec else ""
    print(f"{dtype:8s} {backend:6s} graphs={not eager!s:5s} budget={budget} system={bool(system)} overlap={overlap} "
          f"quantization={quantization}: "
          f"{llm.tokenizer.decode(outs[0])!r}{accepted}")
    del llm
    torch.cuda.empty_cache()
    return outs


def random_eagle3_head(model: str) -> str:
    """A directory holding a random EAGLE-3 head for `model`, laid out as published heads are."""
    import json
    import tempfile

    from safetensors.torch import save_file

    from slipstream.loader import load

    mc = load(model).config
    h, v, dv = mc.hidden_size, mc.vocab_size, min(mc.vocab_size, 8192)
    q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: (torch.rand(*shape, generator=g) - 0.5) * 0.1  # noqa: E731
    keep = torch.randperm(v, generator=g)[:dv].sort().values
    m = "midlayer."
    tensors = {"fc.weight": r(h, 3 * h), m + "input_layernorm.weight": torch.ones(h), m + "hidden_norm.weight": torch.ones(h),
               m + "self_attn.q_proj.weight": r(q, 2 * h), m + "self_attn.k_proj.weight": r(kv, 2 * h),
               m + "self_attn.v_proj.weight": r(kv, 2 * h), m + "self_attn.o_proj.weight": r(h, q),
               m + "post_attention_layernorm.weight": torch.ones(h), m + "mlp.gate_proj.weight": r(mc.intermediate_size, h),
               m + "mlp.up_proj.weight": r(mc.intermediate_size, h), m + "mlp.down_proj.weight": r(h, mc.intermediate_size),
               "norm.weight": torch.ones(h), "lm_head.weight": r(dv, h), "d2t": keep - torch.arange(dv)}
    path = tempfile.mkdtemp(prefix="slipstream-eagle3-")
    save_file(tensors, f"{path}/model.safetensors")
    config = {"architectures": ["LlamaForCausalLMEagle3"], "num_hidden_layers": 1, "hidden_size": h,
              "intermediate_size": mc.intermediate_size, "num_attention_heads": mc.num_heads,
              "num_key_value_heads": mc.num_kv_heads, "head_dim": mc.head_dim, "vocab_size": v, "draft_vocab_size": dv,
              "rms_norm_eps": mc.rms_norm_eps, "rope_theta": mc.rope_theta, "max_position_embeddings": mc.max_position_embeddings}
    with open(f"{path}/config.json", "w") as f:
        json.dump(config, f)
    return path


def compare(got: list[list[int]], ref: list[list[int]], dtype: str, what: str) -> int:
    """Prints how many sequences agree; a failure (1) where float32's do not all agree."""
    same = sum(g == r for g, r in zip(got, ref))
    print(f"  {same}/{len(ref)} sequences identical {what}")
    return int(dtype == "float32" and same != len(ref))


def spec_case(model: str, dtype: str, what: str, **spec: object) -> int:
    """Greedy tokens with speculation on the Triton path (graphs) against plain decoding's with overlap off."""
    ref = run(model, dtype, "triton", False, 8192, SYSTEM, overlap="off")
    return compare(run(model, dtype, "triton", False, 8192, SYSTEM, **spec), ref, dtype, what)


PARTS = ("overlap", "backends", "int4", "draft", "trees", "eagle3")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated, of: {', '.join(PARTS)} (all, about thirty engines started, take over four "
                         "minutes on an H100)")
    a = ap.parse_args()
    parts = a.parts.split(",")
    if set(parts) - set(PARTS):
        ap.error(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; choose from {', '.join(PARTS)}")
    failures, dtypes = 0, ("float32", "bfloat16")
    # Overlap (async scheduling, on by default on CUDA) against synchronous steps; a budget of 40 mixes prefill
    # chunks into decode steps. A sequence that ends on eos still computes one more (dropped) token with overlap,
    # so batches can differ by a row: fp32 must agree, bf16 is reported.
    if "overlap" in parts:
        for dtype in dtypes:
            ref = run(a.model, dtype, "triton", False, 40, SYSTEM, overlap="off")
            failures += compare(run(a.model, dtype, "triton", False, 40, SYSTEM, overlap="on"), ref, dtype,
                                "with overlap off")
    # bf16 with the system prompt: prefills over 64 tokens, which take the Hopper (Gluon) prefill kernel on an H100/H200.
    if "backends" in parts:
        for dtype, system in (("float32", None), ("float32", SYSTEM), ("bfloat16", None), ("bfloat16", SYSTEM)):
            ref = run(a.model, dtype, "torch", True, 8192, system)
            for eager, budget in ((False, 8192), (True, 8192), (False, 40)):  # graphs; eager; chunked prefill + mixed steps
                failures += compare(run(a.model, dtype, "triton", eager, budget, system), ref, dtype,
                                    "to the torch backend")
    # The GGUF as stored (--quantization int4: the embedded model's Q4_1 layers 4-bit, its tied Q8_0 head 8-bit, read
    # by the W4A16 GEMM and GEMV, the embedding's lookups dequantizing its rows) on the Triton path with graphs, and
    # with mixed steps: the tokens of its dequantized weights on the torch backend.
    if "int4" in parts:
        for dtype in dtypes:
            ref = run(a.model, dtype, "torch", True, 8192, SYSTEM)
            for budget in (8192, 40):
                failures += compare(run(a.model, dtype, "triton", False, budget, SYSTEM, quantization="int4"), ref,
                                    dtype, "kept quantized")
    # A draft model (the target itself: its drafts, drawn as the target draws, are all right) on the Triton path,
    # its chained draft steps in CUDA graphs fed on the device: the same greedy tokens as without speculation.
    if "draft" in parts:
        for dtype in dtypes:
            failures += spec_case(a.model, dtype, "with a draft model", speculative_method="draft",
                                  speculative_model=a.model, num_speculative_tokens=3)
    # n-gram token trees (the continuations of an n-gram's last three occurrences): tree steps run the Triton prefill
    # kernel with ancestor masks in graph pieces, the kept drafts' KV moved before the next step
    if "trees" in parts:
        for dtype in dtypes:
            failures += spec_case(a.model, dtype, "with n-gram token trees", speculative_method="ngram",
                                  num_speculative_tokens=6, speculative_branches=3, speculative_adaptive=False)
    # An EAGLE-3 head (random weights in the published format) on the Triton path: the head's catch-up prefill and
    # chained decodes run the Triton kernels on its own one-layer pool; the target keeps its CUDA graphs.
    if "eagle3" in parts:
        head = random_eagle3_head(a.model)
        for dtype in dtypes:
            failures += spec_case(a.model, dtype, "with an EAGLE-3 head", speculative_method="eagle3",
                                  speculative_model=head, num_speculative_tokens=3)
    print("GPU E2E:", "PASS" if not failures else f"FAIL ({failures})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
