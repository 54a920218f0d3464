"""Triton kernels against their torch references in fp32 (CPU: TRITON_INTERPRET=1 with fp16/fp32; the GPU check
script covers bf16 on the device)."""
import os
import subprocess
import sys

import pytest
import torch

from slipstream.attention.backend import AttentionMetadata
from slipstream.attention.torch_backend import paged_attention_ref
from slipstream.kernels.activation import silu_and_mul
from slipstream.kernels.attention import decode_splits, paged_decode, paged_prefill
from slipstream.kernels.rmsnorm import fused_add_rms_norm
from slipstream.layers.norm import rms_norm_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's bf16 dot is wrong; on the GPU the same tests run in bf16 too (scripts/gpu_check.sh).
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def make_paged(ctx_lens, q_lens, hq, hk, d, page, dtype, seed):
    """Random K/V scattered over a shuffled page pool, random queries; returns tensors and metadata."""
    g = torch.Generator().manual_seed(seed)
    n_pages = sum(-(-c // page) for c in ctx_lens) + 3
    perm = torch.randperm(n_pages, generator=g).tolist()
    k_cache = torch.randn(n_pages, page, hk, d, generator=g).to(dtype)
    v_cache = torch.randn(n_pages, page, hk, d, generator=g).to(dtype)
    tables, used = [], 0
    for c in ctx_lens:
        n = -(-c // page)
        tables.append(perm[used : used + n])
        used += n
    width = max(len(t) for t in tables)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(ctx_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_lens_cpu=list(q_lens), seq_lens_cpu=list(ctx_lens), max_query_len=max(q_lens), max_seq_len=max(ctx_lens),
    )
    return q, k_cache, v_cache, meta


def to(dev, *ts):
    return [t.to(dev) for t in ts]


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# 64-token pages with 8 query heads: on the GPU only, where they take the TMA path (under the interpreter they repeat
# the 16-token pages' head groupings, at about 37 s of a CI run)
_HEADS = [(4, 4, 64), (8, 2, 128), (8, 1, 64)]  # (query heads, KV heads, head dim)
_PAGED_CASES = [(16, [37, 50, 9, 32], [37, 21, 1, 16], heads) for heads in _HEADS] + [
    pytest.param(64, [160, 150, 9, 128], [160, 71, 1, 64], heads,
                 marks=[] if heads[0] == 4 else pytest.mark.skipif(DEV != "cuda", reason="the TMA path's head groupings"))
    for heads in _HEADS]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page, ctx, ql, heads", _PAGED_CASES)
def test_prefill_with_cached_prefix(dtype, page, ctx, ql, heads):
    # ragged: a fresh prompt, a chunk after a cached prefix that ends mid-page, a one-token query, page-aligned.
    # On Hopper, 64-token pages take the bulk-copy (TMA) path and 16-token pages the gather path.
    hq, hk, d = heads
    q, kc, vc, meta = make_paged(ctx, ql, hq, hk, d, page=page, dtype=dtype, seed=hq * d)
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), meta, d**-0.5)
    q, kc, vc, bt, sl, qsl = to(DEV, q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc)
    out = paged_prefill(q, kc, vc, bt, sl, qsl, meta.max_query_len, d**-0.5)
    assert rel_err(out.cpu(), ref) < TOL[dtype]


def test_prefill_with_device_descriptors_on_a_new_thread():
    """The TMA path needs Triton's scratch allocator, which lives in a per-thread context: a server's engine loop
    on a thread that never warmed up once died of it. The kernel must run from any thread. (The interpreter
    emulates descriptors without scratch memory: this fails only on Hopper, in scripts/gpu_check.sh.)"""
    import threading

    q, kc, vc, meta = make_paged([130, 70], [130, 6], 4, 2, 64, page=64, dtype=torch.float16, seed=11)
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), meta, 0.125)
    args = to(DEV, q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc)
    paged_prefill(*args, meta.max_query_len, 0.125)  # the warm-up, on this thread
    result = {}

    def run():
        try:
            result["out"] = paged_prefill(*args, meta.max_query_len, 0.125)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert "error" not in result, result.get("error")
    assert rel_err(result["out"].cpu(), ref) < TOL[torch.float16]


@pytest.mark.skipif(DEV != "cuda", reason="long contexts: too slow for the interpreter; scripts/gpu_check.sh runs it")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page", [16, 64, 128])
def test_prefill_long_ragged_batch(dtype, page):
    # Many 128-row query tiles over many key tiles: on Hopper each persistent program of the Gluon kernel takes
    # several work items, its K/V ring wraps many times, and chunks follow cached prefixes that end mid-page. The
    # 16.5K context makes the kernel take its long-context settings (a two-deep ring, one K/V head per section).
    # The first row is a decode, left to the decode kernel: prefill starts at sequence 1 (int64 metadata, as the
    # engine stages it).
    ctx, ql = [40, 1500, 2000, 300, 16500, 64], [1, 1500, 700, 300, 77, 64]
    q, kc, vc, meta = make_paged(ctx, ql, 32, 8, 128, page=page, dtype=dtype, seed=page)
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), meta, 128**-0.5)
    out = torch.full_like(q, float("nan"))
    q, kc, vc, bt, sl, qsl, out = to(DEV, q, kc, vc, meta.block_tables.long(), meta.seq_lens.long(),
                                     meta.query_start_loc.long(), out)
    paged_prefill(q, kc, vc, bt, sl, qsl, meta.max_query_len, 128**-0.5, out=out, first_seq=1)
    out = out.cpu()
    assert out[0].isnan().all() and rel_err(out[1:], ref[1:]) < TOL[dtype]


def test_hopper_prefill_dispatch():
    """Which prefills the Gluon kernel takes (on a Hopper GPU; the device check is the caller's): 16-bit dtypes,
    head dims 64/128, pages of 16+ tokens that split or hold whole 128-key tiles, a dense pool, and more than 64
    query tokens. The rest go to the Triton kernel."""
    from slipstream.kernels import attention_sm90 as sm90

    def call(dtype=torch.bfloat16, d=128, page=64, q_len=100, dense=True):
        q = torch.empty(q_len, 8, d, dtype=dtype)
        pool = torch.empty(4, page, 2, d, dtype=dtype)
        return sm90.supported(q, pool if dense else pool[:, :, :1], q_len)

    assert call() and call(dtype=torch.float16) and call(d=64) and call(page=16) and call(page=256)
    assert not call(dtype=torch.float32) and not call(d=96) and not call(page=8) and not call(page=48)
    assert not call(q_len=64) and not call(dense=False)


def test_prefill_on_a_slice_of_the_batch():
    """The backend runs prefill on the batch's tail with absolute row offsets; rows before it stay untouched."""
    q, kc, vc, meta = make_paged([5, 30, 44], [1, 30, 12], 4, 2, 64, page=8, dtype=torch.float32, seed=3)
    ref = paged_attention_ref(q, kc, vc, meta, 0.125)
    out = torch.full_like(q, float("nan"))
    q, kc, vc, bt, sl, qsl, out = to(DEV, q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc, out)
    paged_prefill(q, kc, vc, bt, sl, qsl, 30, 0.125, out=out, first_seq=1)
    out = out.cpu()
    assert out[0].isnan().all() and rel_err(out[1:], ref[1:]) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [16, 64])
def test_prefill_attends_token_trees(dtype, page):
    """A token tree's rows see the context before the step, their ancestors and themselves; a prompt chunk beside them
    stays causal. Against masks built here from the parents (and the torch backend, which the CPU engine runs)."""
    from slipstream.runner.inputs import ancestor_masks

    parents = [-1, 0, 0, -1, 3, 1, 5, 2]  # after one real token: 0 -> (1 -> 5 -> 6, 2 -> 7); 3 -> 4
    ctx, ql = [20, 45, 46], [1, 30, 9]  # a decode, a chunk after 15 cached tokens, the tree after 37
    q, kc, vc, meta = make_paged(ctx, ql, 4, 2, 64, page=page, dtype=dtype, seed=7)
    meta.tree_rows = torch.tensor([-1] * 31 + ancestor_masks(1, parents))
    seen = torch.ones(9, 46, dtype=torch.bool)
    seen[:, 38:] = False  # (the context and the real token: every row)
    for r in range(9):  # row 0 the real token, row 1 + i draft i: itself and its ancestors
        node = r - 1
        seen[r, 37 + r] = True
        while node >= 0:
            seen[r, 38 + node] = True
            node = parents[node]
    table = meta.block_tables[2, : -(-46 // page)]
    k, v = (c[table].flatten(0, 1)[:46].float().transpose(0, 1) for c in (kc, vc))
    qt = q[31:].float().transpose(0, 1)
    want = torch.nn.functional.scaled_dot_product_attention(qt, k.repeat_interleave(2, 0), v.repeat_interleave(2, 0),
                                                            attn_mask=seen, scale=64**-0.5).transpose(0, 1)
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), meta, 64**-0.5)
    assert rel_err(ref[31:], want) < 1e-6
    causal = paged_attention_ref(q.float(), kc.float(), vc.float(), make_paged(ctx, ql, 4, 2, 64, page, dtype, 7)[3], 64**-0.5)
    assert rel_err(ref[:31], causal[:31]) < 1e-6 and rel_err(ref[31:], causal[31:]) > 1e-2  # (the mask matters)
    out = torch.zeros_like(q)
    q, kc, vc, bt, sl, qsl, tr, out = to(DEV, q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                         meta.tree_rows, out)
    paged_prefill(q, kc, vc, bt, sl, qsl, 30, 64**-0.5, out=out, first_seq=1, tree_rows=tr)
    assert rel_err(out[31:].cpu(), want) < TOL[dtype] and rel_err(out[1:31].cpu(), causal[1:31]) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq, hk, d", [(4, 4, 64), (8, 2, 128), (8, 1, 64), (16, 2, 128)])
@pytest.mark.parametrize("splits", [19, 4, 1])  # many (on a GPU, most idle); uneven ones; one, no reduction
def test_decode_split_kv(dtype, hq, hk, d, splits):
    ctx = [1, 16, 17, 95, 300]
    q, kc, vc, meta = make_paged(ctx, [1] * len(ctx), hq, hk, d, page=16, dtype=dtype, seed=d + hq)
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), meta, d**-0.5)
    q, kc, vc, bt, sl = to(DEV, q, kc, vc, meta.block_tables, meta.seq_lens)
    out = paged_decode(q, kc, vc, bt, sl, splits, d**-0.5)
    assert rel_err(out.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared_len", [0, 32, 528])  # off at run time; one partition; three, the last partial
def test_decode_with_shared_prefix(dtype, shared_len):
    """Cascade decode: the first pages of every table are sequence 0's, attended once for the whole batch."""
    ctx, page = [600, 530, 700, 545], 16
    q, kc, vc, meta = make_paged(ctx, [1] * len(ctx), 8, 2, 64, page=page, dtype=dtype, seed=shared_len)
    meta.block_tables[1:, : shared_len // page] = meta.block_tables[0, : shared_len // page]
    ref = paged_attention_ref(q.float(), kc.float(), vc.float(), meta, 0.125)
    q, kc, vc, bt, sl = to(DEV, q, kc, vc, meta.block_tables, meta.seq_lens)
    shared = torch.tensor([shared_len], dtype=torch.int64, device=DEV)
    out = paged_decode(q, kc, vc, bt, sl, 8, 0.125, shared=shared, shared_bound=1024)
    assert rel_err(out.cpu(), ref) < TOL[dtype]


def test_decode_grid_bound_exceeds_contexts():
    """As under a CUDA graph: the grid is sized for a long max_len; short contexts and a 0-length pad row."""
    ctx = [3, 40, 0]
    q, kc, vc, meta = make_paged([3, 40, 1], [1, 1, 1], 4, 1, 64, page=8, dtype=torch.float32, seed=9)
    meta.seq_lens = torch.tensor(ctx, dtype=torch.int32)
    meta.seq_lens_cpu = [3, 40, 1]
    ref = paged_attention_ref(q, kc, vc, meta, 0.125)
    q, kc, vc, bt, sl = to(DEV, q, kc, vc, meta.block_tables, meta.seq_lens)
    out = paged_decode(q, kc, vc, bt, sl, decode_splits(3, 1, 4096, 132), 0.125)
    assert rel_err(out[:2].cpu(), ref[:2]) < 1e-5
    with pytest.raises(ValueError, match="decode splits must be at least 1"):
        paged_decode(q, kc, vc, bt, sl, 0, 0.125)


def fp8_pool(kc, vc):
    """A 16/32-bit pool as an FP8 one: values [pages, page, Hk, D] and scales [pages, page, Hk] per row."""
    from slipstream.attention.backend import quantize_kv

    (k8, ks), (v8, vs) = (quantize_kv(c.flatten(0, 1)) for c in (kc, vc))
    return k8.view(kc.shape), v8.view(vc.shape), (ks.view(kc.shape[:3]), vs.view(vc.shape[:3]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["prefill", "decode", "decode_split", "cascade"])
def test_fp8_pool_attention(dtype, kind):
    """Every attention kernel on an FP8 pool (a scale per token and head) computes what the torch path computes on
    the same FP8 values (tight), and stays near attention over the unquantized keys and values."""
    hq, hk, d, page = 8, 2, 64, 16
    ctx, ql = {"prefill": ([37, 50, 9, 32], [37, 21, 1, 16]), "cascade": ([600, 530, 700, 545], [1] * 4)}.get(
        kind, ([600, 530, 17, 545], [1] * 4))
    q, kc, vc, meta = make_paged(ctx, ql, hq, hk, d, page=page, dtype=torch.float32, seed=len(kind))
    shared = 528
    if kind == "cascade":  # the first pages of every table are sequence 0's
        meta.block_tables[1:, : shared // page] = meta.block_tables[0, : shared // page]
    k8, v8, scales = fp8_pool(kc, vc)
    for b, c in enumerate(ctx):  # slots past each context hold NaN: a kernel that read them unmasked would show it
        last, used = meta.block_tables[b, (c - 1) // page], c % page or page
        k8[last, used:] = v8[last, used:] = float("nan")
        scales[0][last, used:] = scales[1][last, used:] = float("nan")
    want = paged_attention_ref(q, k8, v8, meta, d**-0.5, scales)  # the torch path on the FP8 pool
    exact = paged_attention_ref(q, kc, vc, meta, d**-0.5)
    q, k8, v8, bt, sl, qsl = to(DEV, q.to(dtype), k8, v8, meta.block_tables, meta.seq_lens, meta.query_start_loc)
    dev_scales = tuple(to(DEV, *scales))
    if kind == "prefill":
        out = paged_prefill(q, k8, v8, bt, sl, qsl, meta.max_query_len, d**-0.5, kv_scales=dev_scales)
    elif kind == "cascade":
        out = paged_decode(q, k8, v8, bt, sl, 8, d**-0.5, kv_scales=dev_scales,
                           shared=torch.tensor([shared], device=DEV), shared_bound=1024)
    else:
        out = paged_decode(q, k8, v8, bt, sl, 64 if kind == "decode_split" else 1, d**-0.5, kv_scales=dev_scales)
    assert rel_err(out.cpu(), want) < max(TOL[dtype], 1e-4)
    assert rel_err(out.cpu(), exact) < 0.05  # FP8 E4M3: 3 mantissa bits, a scale per row


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_add_rms_norm(dtype, with_residual):
    x, r, w = torch.randn(7, 576).to(dtype), torch.randn(7, 576).to(dtype), torch.rand(576).to(dtype) + 0.5
    out, res = fused_add_rms_norm(*to(DEV, x), *(to(DEV, r) if with_residual else [None]), *to(DEV, w), 1e-5)
    h = x.float() + (r.float() if with_residual else 0)
    assert rel_err(res.cpu(), h) < TOL[dtype] and rel_err(out.cpu(), rms_norm_ref(h, w.float(), 1e-5)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = torch.randn(5, 2 * 1536).to(dtype)
    gate, up = x.float().chunk(2, -1)
    out = silu_and_mul(*to(DEV, x))
    assert rel_err(out.cpu(), torch.nn.functional.silu(gate) * up) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq, hk, d, qk_norm, rotary_dim", [(4, 2, 64, False, 64), (8, 1, 128, True, 128), (2, 2, 64, True, 32),
                                                            (4, 2, 128, False, 64)])
def test_qk_norm_rope_store(dtype, hq, hk, d, qk_norm, rotary_dim):
    """RoPE over every dim, and partial (GLM-4.5: the first half of each head rotates, the rest passes)."""
    from slipstream.attention.backend import AttentionMetadata
    from slipstream.attention.torch_backend import TorchAttention
    from slipstream.kernels.rope import qk_norm_rope_store
    from slipstream.layers.rotary import RotaryEmbedding

    t, page, pages = 11, 4, 8
    rot = RotaryEmbedding(rotary_dim, 64, 10000.0, {})
    qkv = torch.randn(t, (hq + 2 * hk) * d).to(dtype)
    pos = torch.randint(0, 64, (t,))
    slots = torch.randperm(pages * page)[:t]
    qw, kw = (torch.rand(d) + 0.5, torch.rand(d) + 0.5) if qk_norm else (None, None)
    # reference: the torch path of the attention layer, in fp32
    q, k, v = qkv.float().split([hq * d, hk * d, hk * d], -1)
    q, k, v = q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)
    if qk_norm:
        q, k = rms_norm_ref(q, qw, 1e-6), rms_norm_ref(k, kw, 1e-6)
    q_ref, k_ref = rot(pos, q, k)
    if rotary_dim < d:  # the dims past rotary_dim pass unchanged
        assert torch.equal(q_ref[..., rotary_dim:], q[..., rotary_dim:]) and not torch.allclose(q_ref, q)
    kc_ref, vc_ref = torch.zeros(pages, page, hk, d), torch.zeros(pages, page, hk, d)
    ref_backend = TorchAttention()
    ref_backend.bind_kv([kc_ref], [vc_ref])
    ref_backend.store_kv(0, k_ref, v, AttentionMetadata(slots, None, None, None, [], [], 0, 0))
    kc, vc = torch.zeros(pages, page, hk, d, dtype=dtype, device=DEV), torch.zeros(pages, page, hk, d, dtype=dtype, device=DEV)
    norms = (qw.to(DEV), kw.to(DEV), 1e-6) if qk_norm else ()
    out = qk_norm_rope_store(qkv.to(DEV), pos.to(DEV), rot.cos_sin.to(DEV), slots.to(DEV), kc, vc, hq, hk, d, *norms)
    assert rel_err(out.cpu(), q_ref) < TOL[dtype]
    assert rel_err(kc.cpu(), kc_ref) < TOL[dtype] and rel_err(vc.cpu(), vc_ref) < TOL[dtype]
    # Into an FP8 pool: the rows and scales the torch path writes (a value may land one FP8 step off where the
    # kernel's 16-bit rotation and the reference's fp32 one round differently). The values only on the GPU: Triton's
    # interpreter converts float32 to float8 wrongly when rounding carries into the exponent (126.8 -> 64, not 128;
    # about 3% of random values), where the GPU converts in hardware.
    ref_k8, ref_v8 = torch.zeros(pages, page, hk, d, dtype=torch.float8_e4m3fn), torch.zeros(pages, page, hk, d, dtype=torch.float8_e4m3fn)
    ref_backend.bind_kv([ref_k8], [ref_v8], [torch.zeros(pages, page, hk), torch.zeros(pages, page, hk)])
    ref_backend.store_kv(0, k_ref, v, AttentionMetadata(slots, None, None, None, [], [], 0, 0))
    k8 = torch.zeros(pages, page, hk, d, dtype=torch.float8_e4m3fn, device=DEV)
    v8 = torch.zeros_like(k8)
    scales = (torch.zeros(pages, page, hk, device=DEV), torch.zeros(pages, page, hk, device=DEV))
    qk_norm_rope_store(qkv.to(DEV), pos.to(DEV), rot.cos_sin.to(DEV), slots.to(DEV), k8, v8, hq, hk, d, *norms,
                       kv_scales=scales)
    for got, ref, s, s_ref in ((k8, ref_k8, scales[0], ref_backend.scales[0]), (v8, ref_v8, scales[1], ref_backend.scales[1])):
        assert rel_err(s.cpu(), s_ref) < max(TOL[dtype], 1e-6)
        bound = max(2 * TOL[dtype], 0.01) if DEV == "cuda" else 0.2  # the interpreter: its conversion misses
        assert rel_err((got.float() * s[..., None]).cpu(), ref.float() * s_ref[..., None]) < bound


@pytest.mark.parametrize("dtype", DTYPES)
def test_gumbel_argmax_matches_the_torch_sampler(dtype):
    """Same hash, same draws: the fused kernel picks what argmax(logit/T - log E) picks in torch, reading the
    model's logits in their own dtype."""
    from slipstream.kernels.sampling import gumbel_argmax
    from slipstream.kernels.hash import exponential_noise

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 5000, generator=g) * 3).to(dtype)
    temp = torch.tensor([0.0, 0.5, 1.0, 1.3, 0.8, 0.0])
    seeds = torch.tensor([1, -2, 3, 2**62 + 5, -(2**63), 2**63 - 1])  # the kernel hashes in wrapping uint64
    pos = torch.tensor([0, 7, 7, 100, 3, 9])
    temp[5] = 0.9
    ref = torch.where(temp < 1e-5, logits.float().argmax(-1),
                      (logits.float() / temp.clamp_min(1e-5).unsqueeze(1) - exponential_noise(seeds, pos, 5000).log()).argmax(-1))
    out = gumbel_argmax(*to(DEV, logits, temp, seeds, pos))
    assert out.cpu().tolist() == ref.tolist()


@pytest.mark.parametrize("rows, vocab", [(1, 70000), (3, 5000), (300, 999)])
def test_split_argmax_matches_torch(rows, vocab):
    """Split over programs, then picked across splits: the same index as torch.argmax, ties included."""
    from slipstream.kernels.sampling import argmax

    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=g).half().float()  # fp16-rounded values: ties happen
    logits[0, [vocab // 3, vocab - 1]] = logits.max() + 1  # a tie across chunks: the lower index wins
    assert argmax(logits.to(DEV)).cpu().tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prologue", ["none", "rmsnorm", "rmsnorm+residual", "silu_mul"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5])
def test_gemv(dtype, prologue, bias, rows):
    """A projection of one row (batch-1 decode) or a few (a verifying step, a small batch) with its fused prologue
    against the unfused torch path; N and K are not multiples of the tiles."""
    from slipstream.kernels.matvec import GEMV_ROWS, gemv

    g = torch.Generator().manual_seed(len(prologue) + bias)
    n, k = 83, 200
    x = torch.randn(rows, 2 * k if prologue == "silu_mul" else k, generator=g)
    w, b = torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g)
    res, nw = torch.randn(rows, k, generator=g), 1 + 0.1 * torch.randn(k, generator=g)
    with_res = prologue == "rmsnorm+residual"
    if prologue == "silu_mul":
        a, ref_res = torch.nn.functional.silu(x[:, :k]) * x[:, k:], None
    elif prologue.startswith("rmsnorm"):
        ref_res = x + res if with_res else x
        a = rms_norm_ref(ref_res, nw, 1e-6)
    else:
        a, ref_res = x, None
    ref = a.double() @ w.double().T + (b.double() if bias else 0)
    xd, wd, bd, rd, nwd = to(DEV, x.to(dtype), w.to(dtype), b.to(dtype), res.to(dtype), nw.to(dtype))
    y, new_res = gemv(xd, wd, bd if bias else None, prologue=prologue.removesuffix("+residual"),
                      residual=rd if with_res else None, norm_weight=nwd)
    assert rel_err(y.cpu(), ref) < TOL[dtype] * 2
    if ref_res is not None:
        assert rel_err(new_res.cpu(), ref_res) < TOL[dtype]
    with pytest.raises(ValueError, match=f"1 to {GEMV_ROWS} rows"):
        gemv(torch.zeros(GEMV_ROWS + 1, k, dtype=dtype, device=DEV), wd)



def _one_row_tiles(monkeypatch, matvec, split, warps=4, stages=1):
    """The one-row GEMVs launched with K in `split` slices: under the interpreter its fixed tiles; on a GPU the kernels
    untuned, with tiles the autotuner could pick."""
    if matvec.INTERPRET:
        monkeypatch.setattr(matvec, "FIXED_SPLIT", dict(SPLIT_K=split))
        return
    monkeypatch.setattr(matvec, "_gemv", matvec._gemv_kernel)
    monkeypatch.setattr(matvec, "_gemv_int4", matvec._gemv_int4_kernel)
    monkeypatch.setattr(matvec, "FIXED_SPLIT", dict(BLOCK_N=16, BLOCK_K=256, SPLIT_K=split, num_warps=warps,
                                                   num_stages=stages))


@pytest.mark.parametrize("form", ["16-bit", "fp8", "int4"])
@pytest.mark.parametrize("split", [1, 3, 5])
def test_gemv_k_slices_add_in_order(monkeypatch, form, split):
    """The one-row GEMV with K in slices (the RMSNorm prologue with a residual, a bias): the reference's product, the
    residual written once, the same bits on a second call (each tile's last slice adds the slices' sums and sums of
    squares in slice order, then resets its count); 5 slices of K's 4 or 6 tiles leave some empty. On a GPU the
    slices race: 20 launches, the same bits."""
    from slipstream.kernels import matvec
    from slipstream.kernels._slices import tile_counts
    from slipstream.layers.quantization.fp8 import dequantize as fp8_dequantize, quantize_weight_per_channel
    from slipstream.layers.quantization.int4 import dequantize as int4_dequantize, quantize_rtn

    _one_row_tiles(monkeypatch, matvec, split)
    g = torch.Generator().manual_seed(split)
    n, k = 83, 384 if matvec.INTERPRET else 1536  # 6 K tiles of the interpreter's 64 columns, 6 of 256 on a GPU
    dtype = torch.float32 if DEV == "cpu" else torch.bfloat16
    x, res = torch.randn(1, k, generator=g), torch.randn(1, k, generator=g)
    w, b, nw = torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g), 1 + 0.1 * torch.randn(k, generator=g)
    if form == "fp8":
        wq, ws = quantize_weight_per_channel(w)
        kw, w = dict(weight_scale=ws.to(DEV)), fp8_dequantize(wq, ws, None, torch.float64)
    elif form == "int4":
        wq, ws, wo = quantize_rtn(w, 128)
        kw, w = dict(weight_scale=ws.to(DEV), weight_offset=wo.to(DEV), group=128), int4_dequantize(wq, ws, wo, torch.float64)
    else:
        wq, kw = w.to(dtype), {}
    ref = rms_norm_ref((x + res).double(), nw.double(), 1e-6) @ w.double().T + b.double()
    args = (x.to(dtype).to(DEV), wq.to(DEV), b.to(dtype).to(DEV))
    opts = dict(prologue="rmsnorm", residual=res.to(dtype).to(DEV), norm_weight=nw.to(dtype).to(DEV), **kw)
    y, new_res = matvec.gemv(*args, **opts)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(y.cpu().double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(new_res.cpu(), (x.to(dtype) + res.to(dtype)), rtol=0, atol=0)
    for _ in range(1 if DEV == "cpu" else 20):
        assert torch.equal(matvec.gemv(*args, **opts)[0], y)
    assert not tile_counts(y.device).any()


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("scale, outlier", [(1.0, True), (0.001, False)])
def test_gemv_folded_norm_in_fp16(rows, scale, outlier):
    """fp16 keeps the folded norm in range and precise. An outlier channel (x + residual = 3000) under a norm weight of
    40: w_norm * (x + residual) is 120000, past fp16's 65504, while the normalized input (about 565 there) is not (that
    gave inf). Tiny inputs under small norm weights (x about 0.001, w_norm about 0.05): scaling the product down to make
    room left it subnormal (8% error)."""
    from slipstream.kernels.matvec import gemv

    g = torch.Generator().manual_seed(rows)
    n, k = 64, 512
    x, w = scale * torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
    nw = (1 if outlier else 0.05) * (1 + 0.1 * torch.randn(k, generator=g))
    if outlier:
        x[:, 7], nw[7] = 3000.0, 40.0
    ref = rms_norm_ref(x.half().double(), nw.half().double(), 1e-6) @ w.half().double().T
    y, _ = gemv(*to(DEV, x.half(), w.half()), prologue="rmsnorm", norm_weight=nw.half().to(DEV))
    assert torch.isfinite(y).all() and rel_err(y.cpu(), ref) < TOL[torch.float16] * 2


@pytest.mark.parametrize("rows", [1, 5, 16, 17])
def test_fused_projections_take_the_gemv_up_to_its_rows(rows, monkeypatch):
    """norm -> gate-up -> SwiGLU -> down as a fused model runs it (the GEMV up to LAYER_GEMV_ROWS rows, the norm and
    activation kernels and a matmul past them) against the same layers unfused, in float32; the layers' limit raised
    to the kernel's, as it will be where the GPU measures the multi-row GEMV ahead of cuBLAS."""
    from slipstream import kernels

    monkeypatch.setattr(kernels, "LAYER_GEMV_ROWS", kernels.GEMV_ROWS)
    from slipstream.layers.linear import Linear, norm_linear, silu_mul_linear
    from slipstream.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(rows)
    h, inter = 64, 96
    x, res = torch.randn(rows, h, generator=g), torch.randn(rows, h, generator=g)
    outs = []
    for fused in (True, False):
        norm, up, down = RMSNorm(h, fused=fused), Linear(h, [inter, inter], fused=fused), Linear(inter, h, fused=fused)
        norm.weight.data = 1 + 0.1 * torch.randn(h, generator=torch.Generator().manual_seed(0))
        for lin in (up, down):
            lin.weight.data = torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(lin.in_features)) / lin.in_features**0.5
        assert up.runs_gemv(x) == (fused and rows <= kernels.LAYER_GEMV_ROWS)
        a, new_res = norm_linear(x.to(DEV), res.to(DEV), norm.to(DEV), up.to(DEV))
        outs.append((silu_mul_linear(a, down.to(DEV)).cpu(), new_res.cpu()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1])

HOPPER_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from slipstream.kernels.attention import _prefill_kernel as fn

# The engine stages lengths, offsets and block tables as int64.
types = dict(q_ptr="*bf16", k_cache="*bf16", v_cache="*bf16", out_ptr="*bf16", block_tables="*i64", seq_lens="*i64",
             q_start="*i64", scale_log2="fp32", k_scales="*bf16", v_scales="*bf16", tree_ptr="*i64")
fp8 = dict(types, k_cache="*fp8e4nv", v_cache="*fp8e4nv", k_scales="*fp32", v_scales="*fp32")
for page, bulk, scaled, tree, rows in ((64, True, False, False, 128), (16, False, False, False, 128),
                                       (64, False, True, False, 128), (64, True, False, True, 64), (64, False, True, True, 128)):
    # bulk copies (TMA) need whole tiles in a page, else the gather path; an FP8 pool with its scales gathers too;
    # token trees (their ancestor masks) in both, alone (64-row tiles) and beside a longer prompt chunk
    consts = dict(GROUP=4, HEAD_DIM=128, PAGE=page, BLOCK_M=rows, BLOCK_N=64, PRECISION="tf32", TMA=bulk, SCALED=scaled,
                  TREE=tree)
    sig = {n: "constexpr" if n in consts else (fp8 if scaled else types).get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
    assert ("cp.async.bulk.tensor" in kernel.asm["ptx"]) == bulk, f"TMA={bulk}: bulk tensor copies in the PTX?"

# The decode kernel on an FP8 pool: split and cascade, as a CUDA graph replays it.
from slipstream.kernels.attention import _decode_kernel as dec
dtypes = dict(fp8, q_ptr="*bf16", part_out="*fp32", part_lse="*fp32", shared_ptr="*i64")
for split in (False, True):
    consts = dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, PAGE=64, BLOCK_N=128, SPLIT=split, SHARED=split,
                  PRECISION="tf32", SCALED=True)
    sig = {n: "constexpr" if n in consts else dtypes.get(n, "i32") for n in dec.arg_names}
    src = ASTSource(dec, sig, constexprs={(dec.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))

# The fused q/k-norm + RoPE + KV store writing an FP8 pool (the query stays 16-bit): the GPU compiler refuses a name
# bound to pointers of two element types in the branches of a run-time `if`, which the interpreter lets through.
from slipstream.kernels.rope import _qk_norm_rope_store_kernel as st
sttypes = dict(qkv_ptr="*bf16", pos_ptr="*i64", cos_sin_ptr="*fp32", slot_ptr="*i64", q_out="*bf16",
               k_cache="*fp8e4nv", v_cache="*fp8e4nv", k_scales="*fp32", v_scales="*fp32", qw_ptr="*bf16",
               kw_ptr="*bf16", eps="fp32")
for norm, rotary in ((False, 128), (True, 64)):
    consts = dict(NUM_HEADS=16, NUM_KV_HEADS=8, HEAD_DIM=128, ROTARY_DIM=rotary, QK_NORM=norm, SCALED=True)
    sig = {n: "constexpr" if n in consts else sttypes.get(n, "i32") for n in st.arg_names}
    triton.compile(ASTSource(st, sig, constexprs={(st.arg_names.index(k),): v for k, v in consts.items()}),
                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1))

# The 4-bit GEMM and GEMV on integer codes, on FP4 E2M1 codes (NVFP4 / MXFP4 weights), and on GGUF's 8-bit integers.
from slipstream.kernels.int4 import _w4a16_kernel as w4
from slipstream.kernels.matvec import _gemv_grouped_kernel as ggv, _gemv_int4_kernel as i4v, _gemv_kernel as gv
for code, offset in ((0, True), (1, False), (2, False), (2, True)):
    q = "*i8" if code == 2 else "*u8"
    w4types = dict(x_ptr="*bf16", q_ptr=q, s_ptr="*fp32", o_ptr="*fp32", bias_ptr="*bf16", y_ptr="*bf16",
                   part_ptr="*fp32", count_ptr="*i32")
    gvtypes = dict(x_ptr="*bf16", res_ptr="*bf16", nw_ptr="*bf16", w_ptr=q, ws_ptr="*fp32", wo_ptr="*fp32",
                   b_ptr="*bf16", y_ptr="*bf16", res_out_ptr="*bf16", part_ptr="*fp32", count_ptr="*i32", eps="fp32")
    for sums, split, swap in ((code == 0, 4, True), (False, 1, False)):  # decode tiles in slices; many rows
        consts = dict(HAS_BIAS=False, PRECISION="tf32", CODE=code, OFFSET=offset, FINE=code > 0, SUMS=sums, BLOCK_M=16,
                      BLOCK_N=32, BLOCK_K=64, SPLIT_K=split, SWAP=swap, PDL=True)
        sig = {n: "constexpr" if n in consts else w4types.get(n, "i32") for n in w4.arg_names}
        triton.compile(ASTSource(w4, sig, constexprs={(w4.arg_names.index(k),): v for k, v in consts.items()}),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=4))
    # a few rows, through the tensor cores
    consts = dict(PROLOGUE=1, HAS_RES=True, HAS_BIAS=False, SCALE=3 + code + (code == 2 and offset), SCALE_BN=1,
                  SCALE_BK=16, PRECISION="tf32", NORM_ON_W=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, SPLIT_K=1)
    sig = {n: "constexpr" if n in consts else gvtypes.get(n, "i32") for n in gv.arg_names}
    triton.compile(ASTSource(gv, sig, constexprs={(gv.arg_names.index(k),): v for k, v in consts.items()}),
                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
    # one row: the 4-bit integers' word GEMV, the grouped GEMV for the other forms, each prologue and spans of 16
    # (NVFP4's groups) to 128 over the four forms
    gg = dict(gvtypes, q_ptr=q, s_ptr="*fp32", o_ptr="*fp32")
    prologue, span = ((1, 128), (2, 16), (0, 128), (1, 32))[code + (code == 2 and offset)]
    one = i4v if code == 0 else ggv
    consts = dict(PROLOGUE=prologue, HAS_RES=prologue == 1, HAS_BIAS=True, SPAN=span, BLOCK_N=32, BLOCK_K=256, PDL=True,
                  **(dict(SPLIT_K=2) if code == 0 else dict(SCALE=3 + code + (code == 2 and offset))))  # K in slices
    sig = {n: "constexpr" if n in consts else gg.get(n, "i32") for n in one.arg_names}
    ptx = triton.compile(ASTSource(one, sig, constexprs={(one.arg_names.index(k),): v for k, v in consts.items()}),
                         target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3)).asm["ptx"]
    # with PDL, the first weight lines are asked of L2 before the wait for the kernel before
    assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait"), "no weight prefetch before the wait"
# ... and the GEMV of a few rows on 16-bit and block-scaled FP8 weights, with the SwiGLU before it
for w, scale in (("*bf16", 0), ("*fp8e4nv", 2)):
    consts = dict(PROLOGUE=2, HAS_RES=False, HAS_BIAS=True, SCALE=scale, SCALE_BN=128, SCALE_BK=128, PRECISION="tf32",
                  NORM_ON_W=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1)
    sig = {n: "constexpr" if n in consts else dict(gvtypes, w_ptr=w).get(n, "i32") for n in gv.arg_names}
    triton.compile(ASTSource(gv, sig, constexprs={(gv.arg_names.index(k),): v for k, v in consts.items()}),
                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=4))
# ... and in fp16, the folded norm's weight on the weight tile (one row, K in slices, and a few rows)
fp16 = {k: "*fp16" for k in ("x_ptr", "res_ptr", "nw_ptr", "w_ptr", "b_ptr", "y_ptr", "res_out_ptr")}
for rows, bn, bk in ((1, 8, 512), (16, 32, 256)):
    consts = dict(PROLOGUE=1, HAS_RES=True, HAS_BIAS=False, SCALE=0, SCALE_BN=1, SCALE_BK=1, PRECISION="tf32",
                  NORM_ON_W=True, BLOCK_M=rows, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=4 if rows == 1 else 1, PDL=True)
    sig = {n: "constexpr" if n in consts else dict(gvtypes, **fp16).get(n, "i32") for n in gv.arg_names}
    ptx = triton.compile(ASTSource(gv, sig, constexprs={(gv.arg_names.index(k),): v for k, v in consts.items()}),
                         target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3)).asm["ptx"]
    assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait"), "no weight prefetch before the wait"


# The fused MoE grouped GEMM on FP8 experts (W8A16): scales per row and per 128 x 128 block, gate-up and down; and
# on 4-bit experts (W4A16): integer codes with offsets, FP4 codes, and a GGUF's bytes with and without offsets.
from slipstream.kernels.moe import _moe_gemm_kernel as mg
mgtypes = dict(a_ptr="*bf16", b_ptr="*fp8e4nv", c_ptr="*bf16", w_ptr="*fp32", s_ptr="*fp32", sorted_ptr="*i32",
               block_expert_ptr="*i32")
for scales, gated, code, offset in ((1, True, 0, False), (2, True, 0, False), (2, False, 0, False), (3, True, 0, True),
                                    (3, False, 1, False), (3, True, 2, True), (3, False, 2, False)):
    consts = dict(GATED=gated, WEIGHTED=not gated, A_PER_TOKEN=gated, SCALES=scales, SCALE_BN=128, SCALE_BK=128,
                  CODE=code, OFFSET=offset, FINE=code == 1, PRECISION="tf32", BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)
    mtypes = (dict(mgtypes, b_ptr="*i8" if code == 2 else "*u8", z_ptr="*fp32") if scales == 3
              else dict(mgtypes, z_ptr="*fp32"))
    sig = {n: "constexpr" if n in consts else mtypes.get(n, "i32") for n in mg.arg_names}
    triton.compile(ASTSource(mg, sig, constexprs={(mg.arg_names.index(k),): v for k, v in consts.items()}),
                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3))

# The MoE router kernel (DeepSeek-V3's grouped sigmoid routing with its bias) and the grouped GEMV of decode steps:
# gate-up and down, on 16-bit, per-row FP8 and 4-bit experts.
from slipstream.kernels.moe import _route_kernel as rk, _moe_gemv_kernel as mv
consts = dict(SIGMOID=True, HAS_BIAS=True, GROUPS=8, TOPK_GROUPS=4, TOP_K=8, RENORMALIZE=True, BLOCK_E=256, BLOCK_K=8)
sig = {n: "constexpr" if n in consts else dict(logits_ptr="*fp32", bias_ptr="*fp32", weights_ptr="*fp32",
                                              ids_ptr="*i32", scale="fp32").get(n, "i32") for n in rk.arg_names}
triton.compile(ASTSource(rk, sig, constexprs={(rk.arg_names.index(k),): v for k, v in consts.items()}),
               target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=1))
for w, scale, down in (("*bf16", 0, False), ("*bf16", 0, True), ("*fp8e4nv", 1, True), ("*fp8e4nv", 2, False),
                       ("*u8", 3, False), ("*u8", 4, True), ("*i8", 5, True), ("*fp16", 0, False)):
    act = "*fp16" if w == "*fp16" else "*bf16"  # (fp16: the folded norm's weight on the weight tile)
    consts = dict(DOWN=down, NORM=not down and scale == 0, NORM_ON_W=w == "*fp16", SCALE=scale,
                  SCALE_BN=128 if scale == 2 else 1, SCALE_BK=128, BLOCK_N=8, BLOCK_K=512, SPLIT_K=2 if down else 1)
    sig = {n: "constexpr" if n in consts else dict(x_ptr=act, w_ptr=w, ws_ptr="*fp32", wo_ptr="*fp32", ids_ptr="*i32",
                                                  rw_ptr="*fp32", nw_ptr=act, y_ptr=act, part_ptr="*fp32",
                                                  count_ptr="*i32", eps="fp32").get(n, "i32")
           for n in mv.arg_names}
    triton.compile(ASTSource(mv, sig, constexprs={(mv.arg_names.index(k),): v for k, v in consts.items()}),
                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))

# The Gluon kernel for bf16/fp16 on Hopper: loads by TMA, products by wgmma, registers moved between the loader and
# the two consumer warpgroups.
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from slipstream.kernels import attention_sm90 as sm90

# Compiles are reported (the server logs those after warm-up) without serializing a Gluon kernel's layouts, which
# Triton's JIT hooks do and fail on: that killed the H200 server's engine at its first late Gluon compile.
from slipstream.kernels._device import on_compile
reported = []
restore = on_compile(lambda kernel, seconds: reported.append(kernel))
fn = sm90._prefill_sm90_kernel
for page, stages in ((16, 3), (64, 2), (128, 3)):  # a key tile spans 8 pages, 2 pages, or one
    consts = dict(NUM_HEADS=32, GROUP=4, HEAD_DIM=128, PAGE=page, ROWS=sm90.HALF_M, BLOCK_N=sm90.BLOCK_N,
                  STAGES=stages,
                  Q_LAYOUT=gl.NVMMASharedLayout.get_default_for([sm90.HALF_M, 128], gl.bfloat16),
                  KV_LAYOUT=gl.NVMMASharedLayout.get_default_for([sm90.BLOCK_N, 128], gl.bfloat16))
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    src = GluonASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168)).asm["ptx"]
    for op in ("cp.async.bulk.tensor", "wgmma.mma_async", "setmaxnreg.inc"):
        assert op in ptx, f"page {page}: no {op} in the PTX"
restore()
assert len(reported) == 3 and all(r.startswith("_prefill_sm90_kernel(") and "STAGES=" in r for r in reported), reported
"""


def test_prefill_compiles_for_hopper():
    """What the interpreter cannot vet: the Triton prefill paths (16-bit and FP8 pools), the FP8 decode, the 4-bit and
    8-bit GEMM and GEMV (one row and a few), the fused MoE GEMM on FP8 and 4-bit experts, the MoE router and grouped
    GEMV and the Gluon prefill compile for sm_90 with the engine's argument types, and only the TMA Triton variant issues bulk
    tensor copies. ptxas ships with Triton, so this needs no GPU; it runs
    uninterpreted, in its own process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gumbel_argmax_reads_a_grammars_mask(dtype):
    """With a bitmask the fused draw is the torch sampler's over the allowed tokens only (greedy and sampled rows; a
    row allowing everything, one allowing a single token, one allowing tokens past the last full word)."""
    from slipstream.kernels.hash import exponential_noise
    from slipstream.kernels.sampling import gumbel_argmax
    from slipstream.layers.sampler import apply_token_mask

    g = torch.Generator().manual_seed(1)
    vocab = 5003
    logits = (torch.randn(5, vocab, generator=g) * 3).to(dtype)
    keep = torch.rand(5, vocab, generator=g) < 0.3
    keep[1] = True
    keep[2] = False
    keep[2, 4321] = True
    keep[3, :4992] = False  # only the last, partial word's tokens
    bits = torch.zeros(5, (vocab + 31) // 32 * 32, dtype=torch.int64)
    bits[:, :vocab] = keep.long()
    words = (bits.view(5, -1, 32) << torch.arange(32)).sum(-1)
    allowed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    temp = torch.tensor([0.0, 0.7, 1.0, 0.0, 1.2])
    seeds, pos = torch.tensor([3, 4, 5, 6, 7]), torch.tensor([0, 1, 2, 3, 4])
    masked = apply_token_mask(logits.float(), allowed)
    ref = torch.where(temp < 1e-5, masked.argmax(-1),
                      (masked / temp.clamp_min(1e-5).unsqueeze(1) - exponential_noise(seeds, pos, vocab).log()).argmax(-1))
    out = gumbel_argmax(*to(DEV, logits, temp, seeds, pos, allowed))
    assert out.cpu().tolist() == ref.tolist()
    assert out[2].item() == 4321 and out[3].item() >= 4992
