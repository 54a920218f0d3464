"""Qwen2 (qkv bias, untied), Qwen3 (q/k norm, tied, head_dim != hidden/heads), Llama 3 (llama3 rope scaling) and
the Mixture-of-Experts models (Qwen3-MoE with a dense layer, Mixtral, Qwen2-MoE with its gated shared expert, GLM-4.5
with partial RoPE and DeepSeek-V3 routing)
with small random weights saved as an HF directory; HF transformers builds the reference from the same files.
The engine runs the prompts together, with chunked prefill and at least one preemption."""
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM, Glm4MoeConfig, LlamaConfig, MixtralConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2MoeConfig, Qwen3Config,
    Qwen3MoeConfig,
)

from conftest import assert_no_leak
from hf_reference import hf_greedy
from slipstream import LLM, SamplingParams

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "qwen2": Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0, **COMMON),
    "qwen3": Qwen3Config(num_key_value_heads=1, head_dim=32, tie_word_embeddings=True, rope_theta=1e6, **COMMON),
    "llama3": LlamaConfig(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=500000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **COMMON),
    # top-2 of 8 renormalized; layer 1 is dense (mlp_only_layers)
    "qwen3_moe": Qwen3MoeConfig(num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                                moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1],
                                tie_word_embeddings=False, rope_theta=1e6, **COMMON),
    "mixtral": MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, **COMMON),
    # top-3 of 6 without renormalization, a shared expert behind a sigmoid gate; layer 0 is dense
    "qwen2_moe": Qwen2MoeConfig(num_key_value_heads=2, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=40,
                                shared_expert_intermediate_size=96, norm_topk_prob=False, mlp_only_layers=[0],
                                rope_theta=1e6, **COMMON),
    # sigmoid scores with a selection bias, the best 2 of 4 groups, top-3 of 8 renormalized and scaled, a shared
    # expert; half of each head rotates; q/k norm and q/k/v bias; layer 0 dense
    "glm4_moe": Glm4MoeConfig(num_key_value_heads=2, head_dim=32, n_routed_experts=8, num_experts_per_tok=3,
                              moe_intermediate_size=40, n_shared_experts=1, n_group=4, topk_group=2,
                              routed_scaling_factor=2.5, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
                              **COMMON),
}


def make_model_dir(path, config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # larger than HF's default init so that greedy choices are far from ties
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # matrices, and the stacked [E, ...] expert weights
                p.normal_(0.0, 0.25)
            elif "bias" in name:
                p.normal_(0.0, 0.5)
            else:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # selection-only bias (DeepSeek-V3 routing)
                b.normal_(0.0, 0.5)
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", unk_token="t0").save_pretrained(path)
    return model


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_random_weights_match_hf(tmp_path, arch):
    hf = make_model_dir(tmp_path, CONFIGS[arch])
    assert json.loads((tmp_path / "config.json").read_text())["architectures"]
    llm = LLM(str(tmp_path), dtype="float32", device="cpu", block_size=8, num_blocks=24, max_model_len=128,
              max_num_batched_tokens=32)
    g = torch.Generator().manual_seed(1)
    lengths, max_tokens = [5, 37, 12, 60, 3, 21], [20, 8, 30, 15, 25, 11]
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m, logprobs=0, ignore_eos=True) for m in max_tokens])
    assert llm.engine.stats.num_preemptions >= 1
    for p, m, out in zip(prompts, max_tokens, outs):
        ref, ref_lps = hf_greedy(hf, p, m, set())
        o = out.outputs[0]
        assert o.token_ids == ref
        ours = [lp[t] for lp, t in zip(o.logprobs, o.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, ref_lps)) < 1e-3
    assert_no_leak(llm)
