"""Mixture of Experts: routing variants against HF transformers' DeepSeek-V3 layer, the fused Triton grouped GEMMs
against the per-expert loop (CPU: the interpreter in fp32/fp16; GPU: bf16 too, scripts/gpu_check.sh), including
experts that receive no token, every token on one expert, and tied router scores. Whole MoE models against HF
are in test_random_arch_equivalence.py."""
import math

import pytest
import torch

from slipstream.config import MoEConfig
from slipstream.layers.moe import MoE, experts_ref, route
from slipstream.layers.norm import RMSNorm

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# The two forms of the fused layer: the grouped GEMMs (given the interpreter's tiles) and the grouped GEMV of steps of
# a few tokens
PATHS = {"gemm": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32), "gemv": dict(GEMV=True)}


def test_align_by_expert_lays_pairs_out_by_expert():
    from slipstream.kernels.moe import align_by_expert

    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2]], device=DEV)  # expert 3 four times, experts 4..5 never
    sorted_ids, block_expert = align_by_expert(ids, 6, 4)
    pairs = ids.numel()
    blocks = sorted_ids.view(-1, 4)
    assert blocks.shape[0] == block_expert.numel() and sorted_ids.numel() % 4 == 0
    seen = []
    for b, e in zip(blocks.tolist(), block_expert.tolist()):
        real = [p for p in b if p < pairs]
        if e < 0:
            assert not real
            continue
        assert real and all(ids.view(-1)[p].item() == e for p in real)  # every pair in a block belongs to its expert
        assert real == sorted(real)  # token order kept within an expert
        seen += real
    assert sorted(seen) == list(range(pairs))  # each pair exactly once
    assert set(block_expert.tolist()) - {-1} == {0, 1, 2, 3}  # unused experts own no block


def _weights(e, h, inter, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) / h**0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=g) / inter**0.5).to(dtype)
    return w13, w2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path, case", [(p, c) for p in PATHS for c in ("random", "one_expert", "single_token",
                                                                        "few_tokens", "many_tokens", "other_ranks_experts")
                                        if p == "gemm" or c not in ("random", "many_tokens")])
def test_fused_moe_matches_loop(dtype, path, case):
    from slipstream.kernels.moe import fused_moe

    e, h, inter, k = 8, 96, 80, 2
    t = {"random": 13, "one_expert": 9, "single_token": 1, "few_tokens": 3, "many_tokens": 70, "other_ranks_experts": 21}[case]
    if path == "gemv":  # the steps it serves (and the interpreter is slow at it)
        t = min(t, 2)
    w13, w2 = _weights(e, h, inter, dtype, t)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(t, h, generator=g).to(dtype)
    logits = torch.randn(t, e, generator=g)
    if case == "one_expert":  # every token's first choice is expert 5 (and experts 0, 6, 7 get nothing)
        logits[:, 5] += 10
        logits[:, [0, 6, 7]] -= 10
    weights, ids = route(logits, MoEConfig(e, k, inter))
    skipped = case == "other_ranks_experts"
    if skipped:  # expert parallelism: this rank holds experts 0..3; pairs routed to 4..7 are another rank's (-1)
        ids = torch.where(ids < 4, ids, -1)
        assert (ids < 0).any() and (ids >= 0).any()
    ref = experts_ref(x.double(), w13.double(), w2.double(), weights.double(), ids)
    out = fused_moe(x.to(DEV), w13.to(DEV), w2.to(DEV), weights.to(DEV), ids.to(DEV), skipped_pairs=skipped,
                    tiles=PATHS[path])
    assert out.shape == (t, h) and out.dtype == dtype
    err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype] * 4, err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [None, (32, 32), (64, 128)])
@pytest.mark.parametrize("path, t", [("gemm", 1), ("gemm", 21), ("gemv", 1)])
def test_fused_moe_fp8_experts_match_loop(dtype, block, path, t):
    """FP8 experts (W8A16), scales per row or per block, against the loop over the dequantized weights in float64."""
    from slipstream.kernels.moe import Fp8Experts, fused_moe
    from slipstream.layers.quantization.fp8 import dequantize, quantize_weight_blocks, quantize_weight_per_channel

    e, h, inter, k = 6, 128, 64, 2
    w13, w2 = _weights(e, h, inter, torch.float32, 3)
    quant = (lambda w: quantize_weight_per_channel(w)) if block is None else (lambda w: quantize_weight_blocks(w, block))
    (q13, s13), (q2, s2) = ([torch.stack(x) for x in zip(*(quant(w[i]) for i in range(e)))] for w in (w13, w2))
    assert q13.dtype == torch.float8_e4m3fn and s13.shape == ((e, 2 * inter) if block is None else (e, 2 * inter // block[0], h // block[1]))
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, h, generator=g).to(dtype)
    weights, ids = route(torch.randn(t, e, generator=g), MoEConfig(e, k, inter))
    ids[0, 1] = -1  # another rank's expert (expert parallelism): the pair adds nothing
    deq = lambda q, s: torch.stack([dequantize(q[i], s[i], block, torch.float64) for i in range(e)])  # noqa: E731
    ref = experts_ref(x.double(), deq(q13, s13), deq(q2, s2), weights.double(), ids)
    out = fused_moe(x.to(DEV), q13.to(DEV), q2.to(DEV), weights.to(DEV), ids.to(DEV), skipped_pairs=True,
                    quant=Fp8Experts(s13.to(DEV), s2.to(DEV), block), tiles=PATHS[path])
    err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype] * 4, err


def test_route_ties_pick_distinct_experts():
    logits = torch.zeros(3, 8)  # every score tied
    weights, ids = route(logits, MoEConfig(8, 4, 16))
    assert all(len(set(row)) == 4 for row in ids.tolist())
    torch.testing.assert_close(weights, torch.full((3, 4), 0.25))
    w, _ = route(logits, MoEConfig(8, 4, 16, renormalize=False))
    torch.testing.assert_close(w, torch.full((3, 4), 1 / 8))



ROUTINGS = {  # (experts, k, config options, logits' dtype)
    "softmax": (8, 2, {}, torch.float32),
    "softmax_16bit_logits": (128, 8, {}, torch.float16),
    "softmax_raw_odd_experts": (60, 4, dict(renormalize=False), torch.float32),  # Qwen2-MoE: 60 experts, raw weights
    "sigmoid_bias_groups": (32, 4, dict(scoring="sigmoid", num_groups=4, topk_groups=2, routed_scaling_factor=2.5,
                                        correction_bias=True), torch.float32),  # DeepSeek-V3 / GLM-4.5
    "sigmoid_groups_no_bias": (16, 3, dict(scoring="sigmoid", num_groups=4, topk_groups=3, renormalize=False), torch.float32),
}


@pytest.mark.parametrize("case", sorted(ROUTINGS))
def test_routing_kernel_matches_reference(case):
    """kernels.moe_route (one kernel) against `route` (torch): the same experts in the same order, the same weights;
    where 16-bit logits tie, either of the tied experts."""
    from slipstream import kernels

    e, k, options, dtype = ROUTINGS[case]
    cfg = MoEConfig(e, k, 16, **options)
    g = torch.Generator().manual_seed(e + k)
    logits = (torch.randn(37, e, generator=g) * 2).to(dtype)
    bias = torch.randn(e, generator=g) * 0.1 if cfg.correction_bias else None
    want_w, want_ids = route(logits, cfg, bias)
    w, ids = kernels.moe_route(logits.to(DEV), k, sigmoid=cfg.scoring == "sigmoid", bias=None if bias is None else bias.to(DEV),
                               num_groups=cfg.num_groups, topk_groups=cfg.topk_groups, renormalize=cfg.renormalize,
                               scale=cfg.routed_scaling_factor)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    ids = ids.cpu().long()
    assert all(len(set(row)) == k for row in ids.tolist())
    other = ids != want_ids
    assert other.float().mean() < 0.05 and torch.equal(logits.gather(1, ids)[other], logits.gather(1, want_ids)[other])
    torch.testing.assert_close(w.cpu(), want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's softmax of NaN
def test_routing_kernel_ties_and_limits():
    """Tied scores: k distinct experts, the lowest ids, equal weights; a grouping the kernel cannot lay out is refused
    (the layer then routes with torch)."""
    from slipstream import kernels
    from slipstream.kernels.moe import routable

    w, ids = kernels.moe_route(torch.zeros(3, 8, device=DEV), 4)
    assert ids.tolist() == [[0, 1, 2, 3]] * 3
    torch.testing.assert_close(w.cpu(), torch.full((3, 4), 0.25))
    assert routable(256, 8) and routable(60, 1) and not routable(60, 4) and not routable(96, 3)
    # NaN logits (all of a row's, or one): ids stay experts' ids (on a GPU, Triton's argmax passes over NaN and
    # could pick one of the 4 padding lanes of 60 experts)
    logits = torch.randn(2, 60, device=DEV)
    logits[0], logits[1, 7] = float("nan"), float("nan")
    _, ids = kernels.moe_route(logits, 4)
    assert ((ids >= 0) & (ids < 60)).all(), ids
    with pytest.raises(ValueError, match="powers of two"):
        kernels.moe_route(torch.zeros(2, 60, device=DEV), 2, num_groups=4)
    # configurations that leave a token fewer experts than it takes are refused with the config, before any kernel
    with pytest.raises(ValueError, match="num_experts_per_tok must be at most"):
        MoEConfig(16, 6, 8, num_groups=4, topk_groups=1)
    with pytest.raises(ValueError, match="n_group must leave at least two experts"):
        MoEConfig(8, 2, 8, scoring="sigmoid", num_groups=8, topk_groups=4, correction_bias=True)

def test_deepseek_routing_and_shared_expert_match_hf():
    """Sigmoid scores, grouped top-k, the correction bias for selection only, routed_scaling_factor and a shared
    expert: our MoE layer against HF transformers' DeepseekV3MoE with the same weights."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(0)
    hcfg = DeepseekV3Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
                            n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1)
    hf = DeepseekV3MoE(hcfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.3)
        hf.gate.e_score_correction_bias.normal_(0, 0.2)
    cfg = MoEConfig(16, 4, 32, renormalize=True, scoring="sigmoid", num_groups=4, topk_groups=2,
                    routed_scaling_factor=2.5, correction_bias=True, shared_intermediate_size=32)
    ours = MoE(cfg, 64, fused=False)
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        ours.e_score_correction_bias.copy_(hf.gate.e_score_correction_bias)
        ours.w13.copy_(hf.experts.gate_up_proj)
        ours.w2.copy_(hf.experts.down_proj)
        se = hf.shared_experts
        ours.shared_expert.gate_up_proj.weight.copy_(torch.cat([se.gate_proj.weight, se.up_proj.weight]))
        ours.shared_expert.down_proj.weight.copy_(se.down_proj.weight)
    x = torch.randn(23, 64)
    _, hf_w, hf_ids = hf.gate(x)
    w, ids = route(ours.gate(x), cfg, ours.e_score_correction_bias)
    assert [sorted(r) for r in ids.tolist()] == [sorted(r) for r in hf_ids.tolist()]
    torch.testing.assert_close(w.sort(-1).values, hf_w.sort(-1).values)
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.fill_(1.0)
        out, res = ours(x, None, norm)
        torch.testing.assert_close(res, x)
        torch.testing.assert_close(out, hf(norm(x, None)[0][None])[0], atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("t, split", [(2, 1), (1, 1), (1, 3)])
def test_grouped_gemv_folds_the_norm(monkeypatch, t, split):
    """fused_moe on h + residual not yet normalized, the RMSNorm applied as the grouped GEMV loads it, against the loop
    on the normalized input; the grouped GEMMs refuse such an input. One token's rows take their (pair, K tile) steps
    whole or in 3 slices (gate-up's 2 tiles leave a slice empty, down's 4 steps split unevenly): on a GPU, untuned
    tiles, and 20 more launches that race the slices to the same bits."""
    from slipstream.kernels import matvec, moe
    from slipstream.kernels.moe import fused_moe
    from slipstream.layers.norm import rms_norm_ref

    if matvec.INTERPRET:
        monkeypatch.setattr(matvec, "FIXED_SPLIT", dict(SPLIT_K=split))
    else:
        monkeypatch.setattr(moe, "_moe_gemv", moe._moe_gemv_kernel)
        monkeypatch.setattr(matvec, "FIXED_SPLIT", dict(BLOCK_N=8, BLOCK_K=64, SPLIT_K=split, num_warps=4, num_stages=2))

    e, h, inter, k = 8, 96, 80, 2
    w13, w2 = _weights(e, h, inter, torch.float32, 5)
    g = torch.Generator().manual_seed(5)
    x, nw = torch.randn(t, h, generator=g) * 3, 1 + 0.1 * torch.randn(h, generator=g)
    weights, ids = route(torch.randn(t, e, generator=g), MoEConfig(e, k, inter))
    ref = experts_ref(rms_norm_ref(x.double(), nw.double(), 1e-6), w13.double(), w2.double(), weights.double(), ids)
    args = (x.to(DEV), w13.to(DEV), w2.to(DEV), weights.to(DEV), ids.to(DEV))
    out = fused_moe(*args, tiles=PATHS["gemv"], norm=(nw.to(DEV), 1e-6))
    assert ((out.cpu().double() - ref).norm() / ref.norm()).item() < 1e-5
    for _ in range(20 if DEV == "cuda" else 0):
        assert torch.equal(fused_moe(*args, tiles=PATHS["gemv"], norm=(nw.to(DEV), 1e-6)), out)
    # fp16, an outlier channel (w_norm * x = 120000 is past fp16's range, the normalized input is not), and tiny
    # inputs under small norm weights (which scaling the product down to make room left subnormal)
    big, tiny = x.clone(), 0.001 * x
    big[:, 5], nw_big = 3000.0, nw.clone()
    nw_big[5] = 40.0
    for xx, ww in ((big, nw_big), (tiny, 0.05 * nw)):
        xx, ww = xx.half(), ww.half()
        ref = experts_ref(rms_norm_ref(xx.double(), ww.double(), 1e-6), w13.half().double(), w2.half().double(),
                          weights.double(), ids)
        out = fused_moe(xx.to(DEV), w13.half().to(DEV), w2.half().to(DEV), weights.to(DEV), ids.to(DEV),
                        tiles=PATHS["gemv"], norm=(ww.to(DEV), 1e-6))
        assert torch.isfinite(out).all() and ((out.cpu().double() - ref).norm() / ref.norm()).item() < 3e-3
    with pytest.raises(ValueError, match="normalize x before the grouped GEMMs"):
        fused_moe(x.to(DEV), w13.to(DEV), w2.to(DEV), weights.to(DEV), ids.to(DEV), tiles=PATHS["gemm"],
                  norm=(nw.to(DEV), 1e-6))


@pytest.mark.parametrize("kind", ["qwen3", "deepseek"])
@pytest.mark.parametrize("rows", [1, 2, 19])
def test_fused_layer_matches_torch_layer(kind, rows, monkeypatch):
    """The whole MoE block as a fused model runs it (the router kernel; a few rows: the norm folded into the router's
    GEMV and the grouped GEMV; more: the norm kernel and the grouped GEMMs; DeepSeek-style: grouped sigmoid routing
    with its bias and a shared expert, which keep the norm apart) against the same block on torch, float32."""
    from slipstream import kernels

    monkeypatch.setattr(kernels, "LAYER_GEMV_ROWS", kernels.GEMV_ROWS)  # (the router's GEMV up to the kernel's limit)
    folded = []
    fused_moe = kernels.fused_moe
    monkeypatch.setattr(kernels, "fused_moe", lambda *a, **kw: folded.append(kw.get("norm") is not None) or fused_moe(*a, **kw))
    cfg = (MoEConfig(32, 2, 48) if kind == "qwen3" else
           MoEConfig(16, 4, 32, scoring="sigmoid", num_groups=4, topk_groups=2, routed_scaling_factor=2.5,
                     correction_bias=True, shared_intermediate_size=32))
    g = torch.Generator().manual_seed(rows)
    h, res = torch.randn(rows, 64, generator=g), torch.randn(rows, 64, generator=g)
    outs = []
    for fused in (True, False):
        layer, norm = MoE(cfg, 64, fused=fused), RMSNorm(64, 1e-6, fused=fused)
        with torch.no_grad():
            w = torch.Generator().manual_seed(0)
            for p in list(layer.parameters()) + list(norm.parameters()):
                p.copy_(torch.randn(p.shape, generator=w) * 0.3 + (1 if p is norm.weight else 0))
        assert layer.folds_norm == (fused and kind == "qwen3")
        out, new_res = layer.to(DEV)(h.to(DEV), res.to(DEV), norm.to(DEV))
        outs.append((out.cpu(), new_res.cpu()))
    assert folded == [kind == "qwen3" and rows <= 2]  # (2 tokens x 2 of 32 experts: the grouped GEMV)
    torch.testing.assert_close(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)

_SMALL = {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
          "num_experts_per_tok": 4, "norm_topk_prob": True, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 1024, "rope_theta": 1e6,
          "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "eos_token_id": 2}
NEAR_TIE = 0.1  # nats: a greedy token another summation order may pick instead of the reference's
GPU_MOE = {
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 32, "mlp_only_layers": [0], **_SMALL},
    # DeepSeek-V3 routing over 4 groups with a shared expert, partial RoPE, q/k norm and bias, an MTP module
    "glm4_moe": {"architectures": ["Glm4MoeForCausalLM"], "n_routed_experts": 32, "n_shared_experts": 1, "n_group": 4,
                 "topk_group": 2, "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "partial_rotary_factor": 0.5,
                 "attention_bias": True, "use_qk_norm": True, "num_nextn_predict_layers": 1, **_SMALL},
}


@pytest.mark.skipif(DEV == "cpu", reason="the fused MoE path runs on CUDA")
@pytest.mark.parametrize("arch", sorted(GPU_MOE))
def test_engine_moe_on_gpu_matches_torch_backend(tmp_path, arch):
    """A small random MoE model on the GPU in fp32: the Triton backend (the fused MoE kernels), in CUDA graphs and
    eagerly, and the torch backend (the per-expert loop) give the same greedy tokens; GLM-4.5's MTP module drafting
    (its MoE block on the fused kernels too) changes none of them. FP8 and 4-bit weights (the experts' quantized
    fused kernels): the same tokens in CUDA graphs and eagerly, and nearly all of the torch path's."""
    import json

    from slipstream import LLM, SamplingParams
    from slipstream.bench.common import model_dir

    (tmp_path / "config.json").write_text(json.dumps(GPU_MOE[arch]))
    path = model_dir(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (5, 40, 17, 90, 3, 64, 33, 8)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    runs = [("graphs", "triton", False, {}), ("eager", "triton", True, {}), ("torch", "torch", True, {})]
    if arch == "glm4_moe":
        runs.append(("mtp", "triton", False, dict(speculative_method="mtp", num_speculative_tokens=3)))
    quantized = [(f"{q} {backend}", backend, eager, dict(quantization=q)) for q in ("fp8", "int4")
                 for backend, eager in (("triton", False), ("triton-eager", True), ("torch", True))]
    outs, first = {}, {}
    for name, backend, eager, spec in runs + quantized:
        llm = LLM(path, load_format="dummy", dtype="float32", attention_backend=backend.removesuffix("-eager"), max_model_len=256,
                  gpu_memory_utilization=0.3, enforce_eager=eager, **spec)
        outs[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        if name.endswith(" torch"):  # the reference's first-token log-probabilities, its 20 best
            top = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=20)
            first[name] = [o.outputs[0].logprobs[0] for o in llm.generate(prompts, top)]
        del llm
    assert all(outs[name] == outs["torch"] for name, *_ in runs)
    for q in ("fp8", "int4"):  # the fused kernels in graphs and eagerly alike; against the torch path's dequantized
        # weights (and, FP8, its own activation rounding) the first token of each prompt, or one the reference ranks
        # within NEAR_TIE of its best (on the CPU, with FP8 weights, these models' runners-up lie 0.007 to 0.48 nats
        # behind; later tokens follow the first difference)
        assert outs[f"{q} triton"] == outs[f"{q} triton-eager"]
        for got, ref, lp in zip(outs[f"{q} triton"], outs[f"{q} torch"], first[f"{q} torch"]):
            assert got[0] == ref[0] or lp[ref[0]] - lp.get(got[0], -math.inf) < NEAR_TIE, (q, got[0], ref[0], lp)


def _expert_form(form, e, rows, cols, group, g):
    """Random stacked experts of one projection in `form`: (weights, scales, offsets)."""
    s = torch.rand(e, rows, cols // group, generator=g) / cols
    if form in ("int8", "int8+offsets"):  # a GGUF's 5- to 8-bit blocks: bytes, maybe with offsets
        q = torch.randint(-32, 32, (e, rows, cols), generator=g, dtype=torch.int8)
        return q, s, -8 * s * torch.rand(e, rows, cols // group, generator=g) if form == "int8+offsets" else None
    q = torch.randint(0, 256, (e, rows, cols // 2), generator=g, dtype=torch.uint8)
    return q, s, None if form == "fp4" else -8 * s * torch.rand(e, rows, cols // group, generator=g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("forms, groups", [(("int4", "int4"), (32, 64)), (("int4", "int4"), (128, 16)),
                                           (("fp4", "fp4"), (16, 32)), (("int4", "int8"), (32, 16)),
                                           (("int8+offsets", "int8"), (16, 32))])
@pytest.mark.parametrize("path, t", [("gemm", 1), ("gemm", 21), ("gemv", 1)])
def test_fused_moe_4bit_experts_match_loop(dtype, forms, groups, path, t):
    """4-bit experts (W4A16): integer codes with a scale and an offset per group, or FP4 E2M1 codes with a scale, and
    a GGUF's bytes (with or without offsets), each projection in its own form with its own group size, against the
    loop over the dequantized weights in float64."""
    from slipstream.kernels.moe import Int4Experts, fused_moe
    from slipstream.layers.moe import expert_weights

    e, h, inter, k = 6, 128, 64, 2
    g = torch.Generator().manual_seed(t)
    w13, s13, o13 = _expert_form(forms[0], e, 2 * inter, h, groups[0], g)
    w2, s2, o2 = _expert_form(forms[1], e, h, inter, groups[1], g)
    quant = Int4Experts(s13, o13, groups[0], s2, o2, groups[1])
    x = torch.randn(t, h, generator=g).to(dtype)
    weights, ids = route(torch.randn(t, e, generator=g), MoEConfig(e, k, inter))
    ids[0, 1] = -1  # another rank's expert (expert parallelism): the pair adds nothing
    deq = [expert_weights(w13, w2, i, quant, torch.float64) for i in range(e)]
    ref = experts_ref(x.double(), torch.stack([a for a, _ in deq]), torch.stack([b for _, b in deq]), weights.double(), ids)
    dev = lambda v: None if v is None else v.to(DEV)  # noqa: E731
    out = fused_moe(x.to(DEV), w13.to(DEV), w2.to(DEV), weights.to(DEV), ids.to(DEV), skipped_pairs=True,
                    quant=Int4Experts(dev(s13), dev(o13), groups[0], dev(s2), dev(o2), groups[1]), tiles=PATHS[path])
    err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype] * 4, err


def test_tuned_tile_tables(tmp_path, caplog):
    """`slipstream tune moe` keeps the fastest tiles per token count; the kernels take the nearest count's from the
    table of their layer and GPU, and without a table run the heuristic, saying so once."""
    import logging

    from slipstream.bench.tune_moe import candidates, tune, write_table
    from slipstream.kernels.moe import _tuned, _untuned, choose_tiles, default_tiles, tiles_file

    tiles = candidates("fp8-block128", 2, 228 << 10)
    assert tiles and all(128 % c["BLOCK_K"] == 0 for c in tiles)
    assert all(c["num_stages"] * (c["BLOCK_M"] * c["BLOCK_K"] + 2 * c["BLOCK_K"] * c["BLOCK_N"]) * 2 <= (228 << 10) - 4096
               for c in tiles)
    # a made-up cost: small steps like narrow row blocks, large ones wide ones; one tile fails to run
    cost = lambda t, c: float("inf") if c["BLOCK_N"] == 256 else abs(c["BLOCK_M"] - min(128, t)) + c["num_stages"] / 10  # noqa: E731
    best = tune([1, 64, 4096], tiles, cost)
    assert best[1][0]["BLOCK_M"] == 16 and best[64][0]["BLOCK_M"] == 64 and best[4096][0]["BLOCK_M"] == 128
    name = tiles_file(128, 768, 2048, "fp8-block128", "NVIDIA H200")
    assert name == "E=128,N=768,H=2048,w=fp8-block128,device=NVIDIA_H200.json"
    write_table(best, str(tmp_path), name, "NVIDIA H200", "qwen3-30b-a3b")
    for tokens, want in ((1, 1), (3, 1), (40, 64), (100, 64), (3000, 4096), (100000, 4096)):
        assert choose_tiles(tokens, 8, 128, name, 2, 228 << 10, str(tmp_path)) == best[want][0], tokens
    _tuned.cache_clear()
    _untuned.cache_clear()
    with caplog.at_level(logging.WARNING, logger="slipstream.kernels.moe"):
        other = tiles_file(64, 512, 1024, "bf16", "NVIDIA H200")
        for tokens in (16, 8000):
            assert choose_tiles(tokens, 8, 64, other, 2, 228 << 10, str(tmp_path)) == default_tiles(tokens * 8, 2, 228 << 10)
        # the heuristic's grouped GEMV: one token, or at most a quarter as many pairs as experts
        assert [choose_tiles(t, 8, 128, other, 2, 228 << 10, str(tmp_path)).get("GEMV", False) for t in (1, 4, 5)] == [True, True, False]
        assert [choose_tiles(t, 2, 8, other, 2, 228 << 10, str(tmp_path)).get("GEMV", False) for t in (1, 2)] == [True, False]
    assert sum("no tuned MoE tiles" in r.message for r in caplog.records) == 1
    # a table may name the grouped GEMV for a token count; the nearest count's choice holds
    write_table({1: (dict(GEMV=True), 10.0), 64: (best[64][0], 50.0)}, str(tmp_path), name, "NVIDIA H200", "qwen3-30b-a3b")
    _tuned.cache_clear()
    assert choose_tiles(2, 8, 128, name, 2, 228 << 10, str(tmp_path)) == dict(GEMV=True)
    assert choose_tiles(50, 8, 128, name, 2, 228 << 10, str(tmp_path)) == best[64][0]
    # past GEMV_TOKENS a table's GEMV entries are passed over (a table tuned on small steps alone: the heuristic)
    write_table({1: (dict(GEMV=True), 10.0)}, str(tmp_path), name, "NVIDIA H200", "qwen3-30b-a3b")
    _tuned.cache_clear()
    assert choose_tiles(8192, 8, 128, name, 2, 228 << 10, str(tmp_path)) == default_tiles(8192 * 8, 2, 228 << 10)


@pytest.mark.parametrize("tiles", [dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64), dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=32)])
def test_fused_moe_with_given_tiles(tiles):
    """Any tile the tuner may pick computes the same layer (interpreter: shapes only; warps and stages on the GPU)."""
    from slipstream.kernels.moe import fused_moe

    e, h, inter, k, t = 8, 128, 96, 2, 19
    w13, w2 = _weights(e, h, inter, torch.float32, 1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(t, h, generator=g)
    weights, ids = route(torch.randn(t, e, generator=g), MoEConfig(e, k, inter))
    ref = experts_ref(x.double(), w13.double(), w2.double(), weights.double(), ids)
    out = fused_moe(x.to(DEV), w13.to(DEV), w2.to(DEV), weights.to(DEV), ids.to(DEV), tiles=tiles)
    assert ((out.cpu().double() - ref).norm() / ref.norm()).item() < 1e-5
    # a step of no tokens launches nothing (an autotuner's first call would time empty grids and keep its pick)
    for given in (tiles, dict(GEMV=True), None):
        assert fused_moe(x[:0].to(DEV), w13.to(DEV), w2.to(DEV), weights[:0].to(DEV), ids[:0].to(DEV), tiles=given).shape == (0, h)


def _moe_gguf(path, hf, expert_type, projection_type="F32"):
    """The HF Qwen3-MoE or Qwen2-MoE model `hf` as a GGUF file, as llama.cpp's converter lays it out (experts stacked
    per projection: ffn_gate_exps [E, I, H] ...; a shared expert's gate a vector), experts stored as `expert_type`,
    the other projections (attention, a dense layer's and a shared expert's) as `projection_type`, everything else
    float32 (`expert_type`: one for all three projections, or one each by GGUF name)."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    c = hf.config
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    arch = "qwen3moe" if c.model_type == "qwen3_moe" else "qwen2moe"
    w = gguf.GGUFWriter(str(path), arch)
    for add, value in ((w.add_block_count, c.num_hidden_layers), (w.add_embedding_length, c.hidden_size),
                       (w.add_feed_forward_length, c.intermediate_size), (w.add_head_count, c.num_attention_heads),
                       (w.add_head_count_kv, c.num_key_value_heads),
                       (w.add_key_length, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads),
                       (w.add_layer_norm_rms_eps, c.rms_norm_eps),
                       (w.add_rope_freq_base, c.rope_parameters["rope_theta"]), (w.add_context_length, c.max_position_embeddings),
                       (w.add_vocab_size, c.vocab_size), (w.add_expert_count, c.num_experts),
                       (w.add_expert_used_count, c.num_experts_per_tok), (w.add_expert_feed_forward_length, c.moe_intermediate_size)):
        add(value)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
             "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for key, t in sd.items():
        key = key.removeprefix("model.")
        if key in names:
            w.add_tensor(names[key], t)
        elif key.startswith("layers.") and ".experts." not in key:
            _, i, rest = key.split(".", 2)
            module, _, kind = rest.rpartition(".")
            if projection_type != "F32" and module.endswith("_proj"):
                qt = gguf.GGMLQuantizationType[projection_type]
                w.add_tensor(f"blk.{i}.{parts[module]}.{kind}", quantize(np.ascontiguousarray(t), qt), raw_dtype=qt)
                continue
            w.add_tensor(f"blk.{i}.{parts[module]}.{kind}", t.reshape(-1) if module == "mlp.shared_expert_gate" else t)
    for i in range(c.num_hidden_layers):
        if i in c.mlp_only_layers:
            continue
        gate_up, down = sd[f"model.layers.{i}.mlp.experts.gate_up_proj"], sd[f"model.layers.{i}.mlp.experts.down_proj"]
        inter = down.shape[2]
        for name, t in (("ffn_gate_exps", gate_up[:, :inter]), ("ffn_up_exps", gate_up[:, inter:]), ("ffn_down_exps", down)):
            of = expert_type if isinstance(expert_type, str) else expert_type[name]
            kind = gguf.GGMLQuantizationType[of]
            data = np.ascontiguousarray(t) if of == "F32" else quantize(np.ascontiguousarray(t), kind)
            w.add_tensor(f"blk.{i}.{name}.weight", data, raw_dtype=None if of == "F32" else kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_moe_gguf_files(tmp_path, arch):
    """A qwen3moe / qwen2moe GGUF (experts stacked per projection, a dense layer between; Qwen2-MoE's gated shared
    expert) runs exactly as the HF checkpoint it was written from (float32); with quantized experts,
    `quantization="int4"` keeps them as stored (4-bit, or bytes for 5- to 8-bit blocks, each projection its own) and
    computes exactly what the dequantizing load does."""
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig

    from slipstream import LLM, SamplingParams
    from test_random_arch_equivalence import COMMON, make_model_dir

    common = dict(**{**COMMON, "num_hidden_layers": 3}, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=64, mlp_only_layers=[1], rope_theta=1e6)
    config = (Qwen3MoeConfig(head_dim=16, norm_topk_prob=True, tie_word_embeddings=False, **common) if arch == "qwen3_moe"
              else Qwen2MoeConfig(shared_expert_intermediate_size=96, norm_topk_prob=False, **common))
    hf = make_model_dir(tmp_path / "hf", config)
    kw = dict(tokenizer=str(tmp_path / "hf"), dtype="float32", device="cpu", max_model_len=128, num_blocks=32, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    prompts = [[5, 17, 200, 31, 9, 77], [300, 2, 45]]

    def run(llm):
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)]

    def same(a, b):
        for (ta, la), (tb, lb) in zip(a, b):
            assert ta == tb and all(abs(x[t] - y[t]) < 1e-4 for x, y in zip(la, lb) for t in x)

    _moe_gguf(tmp_path / "f32.gguf", hf, "F32")
    gguf_llm = LLM(str(tmp_path / "f32.gguf"), **kw)
    assert gguf_llm.engine.model_config.moe.layers == (0, 2)
    same(run(gguf_llm), run(LLM(str(tmp_path / "hf"), dtype="float32", device="cpu", max_model_len=128)))
    # experts kept as stored: 4-bit, and (each projection its own form) 5- to 8-bit blocks as bytes, with offsets where
    # the kind has them
    for kinds, forms in (("Q4_0", (torch.uint8, torch.uint8, True, True)),
                         ({"ffn_gate_exps": "Q4_0", "ffn_up_exps": "Q4_0", "ffn_down_exps": "Q8_0"},
                          (torch.uint8, torch.int8, True, False)),
                         ({"ffn_gate_exps": "Q5_1", "ffn_up_exps": "Q5_0", "ffn_down_exps": "Q4_1"},
                          (torch.int8, torch.uint8, True, True))):
        _moe_gguf(tmp_path / "q.gguf", hf, kinds, "Q8_0")  # (the other projections kept too: F32 ones are rounded)
        packed, dense = LLM(str(tmp_path / "q.gguf"), quantization="int4", **kw), LLM(str(tmp_path / "q.gguf"), **kw)
        moe = dict(packed.engine.runner.model.named_modules())["layers.2.mlp"]
        assert (moe.w13.dtype, moe.w2.dtype, hasattr(moe, "w13_offsets"), hasattr(moe, "w2_offsets")) == forms
        assert dict(dense.engine.runner.model.named_modules())["layers.2.mlp"].w13.dtype == torch.float32
        same(run(packed), run(dense))
    # experts with a kind not kept (F32 down) beside kept projections (Q8_0): all three rounded to 4 bits at load,
    # exactly as a 16-bit checkpoint's are (it failed to load: the down projection was left 4-bit)
    _moe_gguf(tmp_path / "r.gguf", hf, {"ffn_gate_exps": "Q4_0", "ffn_up_exps": "Q4_0", "ffn_down_exps": "F32"}, "Q8_0")
    mixed = LLM(str(tmp_path / "r.gguf"), quantization="int4", **kw)
    model = mixed.engine.runner.model
    assert model.layers[0].self_attn.qkv_proj.method.bits == 8
    moe = dict(model.named_modules())["layers.2.mlp"]
    assert moe.w13.dtype == moe.w2.dtype == torch.uint8 and not moe.spec.serialized
    assert mixed.generate(prompts, params)[0].outputs[0].token_ids


def test_roofline_bytes_count_what_a_step_reads(tmp_path, smollm):
    """bench latency's roofline: the embedding table counts only by the rows a step looks up, a tied table once (as
    the head, which reads it whole), experts by the share of them a batch reaches."""
    from slipstream.bench.engine_bench import active_weight_bytes
    from test_fp8 import _llm, _tiny_moe

    def nbytes(p: torch.Tensor) -> int:
        return p.numel() * p.element_size()

    model = smollm.engine.core.runner.model  # tied: the head is the table
    assert model.lm_head.weight is model.embed_tokens.weight
    assert active_weight_bytes(model, 1) == sum(nbytes(p) for p in model.parameters())  # (unique: the table once)
    _tiny_moe(tmp_path, "qwen3_moe")
    model = _llm(str(tmp_path)).engine.core.runner.model  # untied; layer 1 of 2 is MoE, 2 of 4 experts a token
    table = model.embed_tokens.weight
    experts = sum(nbytes(p) for n, p in model.named_parameters() if ".w13" in n or ".w2" in n)
    rest = sum(nbytes(p) for p in model.parameters()) - nbytes(table) - experts
    row = nbytes(table) / table.shape[0]
    assert active_weight_bytes(model, 1) == pytest.approx(rest + row + experts * 2 / 4)
    assert active_weight_bytes(model, 3) == pytest.approx(rest + 3 * row + experts * (1 - (1 - 2 / 4) ** 3))
