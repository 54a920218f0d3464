"""MTP drafting (`speculative_method="mtp"`): a random GLM-4.5 (partial RoPE, DeepSeek-V3 routing) whose checkpoint
holds an MTP module after its layers, named as published checkpoints name it. HF transformers' own MTP model
(`MtpModel`, loaded from the same file) is the reference for the drafts the engine proposes; the engine's output with
MTP drafting equals its output without, under chunked prefill, preemption, the prefix cache, seeded sampling,
penalties and n > 1."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_no_leak
from slipstream import LLM
from slipstream.config import EngineConfig
from test_eagle3 import check_output_unchanged, drafts_in_graphs_equal_eager, drafts_seen


def add_mtp_module(path, hf, seed=5) -> None:
    """Append a random MTP module to the checkpoint at `path` (HF model `hf`): layer L's tensors as DeepSeek-V3 and
    GLM-4.5 store them, with copies of the embedding and head that a reader must not take in."""
    L, h = hf.config.num_hidden_layers, hf.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(path / "model.safetensors"))
    block = {k.replace(f"layers.{L - 1}.", f"layers.{L}."): v for k, v in tensors.items() if f"layers.{L - 1}." in k}
    for name, t in block.items():  # the block: a MoE layer like the model's last, with weights of its own
        if t.dim() >= 2:
            block[name] = torch.randn(t.shape, generator=g) * 0.25
        elif name.endswith("norm.weight"):
            block[name] = torch.rand(t.shape, generator=g) + 0.5
        else:  # biases, the router's selection bias
            block[name] = torch.randn(t.shape, generator=g) * 0.5
    m = f"model.layers.{L}."
    block.update({m + "enorm.weight": torch.rand(h, generator=g) + 0.5, m + "hnorm.weight": torch.rand(h, generator=g) + 0.5,
                  m + "eh_proj.weight": torch.randn(h, 2 * h, generator=g) * 0.25,
                  m + "shared_head.norm.weight": torch.rand(h, generator=g) + 0.5,
                  m + "embed_tokens.weight": torch.zeros_like(tensors["model.embed_tokens.weight"]),
                  m + "shared_head.head.weight": torch.zeros_like(tensors["lm_head.weight"])})
    save_file({**tensors, **block}, str(path / "model.safetensors"), metadata={"format": "pt"})


def hf_mtp(path, monkeypatch):
    """(the model, its MTP module) as transformers loads them from `path`."""
    from transformers import Glm4MoeForCausalLM
    from transformers.modeling_layers import MtpModel

    # transformers finds a GLM-4.5 checkpoint's MTP tensors by the full-size models' layer numbers (46, 92)
    monkeypatch.setattr(Glm4MoeForCausalLM, "_keys_to_ignore_on_load_unexpected", [r"model\.layers\.3\..*"])
    main = Glm4MoeForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return main, MtpModel.from_pretrained(main, device_map={"": "cpu"}).eval()


def reference_drafts(main, mtp, tokens: list[int], k: int) -> list[int]:
    """Greedy drafts after `tokens` (whose last token the model drew): the module over every position but the last
    (the model's final state at p beside token p + 1, dense causal attention), then chained on its own output."""
    with torch.no_grad():
        h = main(torch.tensor([tokens]), output_hidden_states=True).hidden_states[-1][0]  # final, normed
        inputs, g, drafts = list(tokens[1:]), h[:-1], []
        for _ in range(k):
            positions = torch.arange(1, len(inputs) + 1)[None]  # transformers places the module one position on
            o = mtp.forward_layer(0, g[None], positions, None, input_ids=torch.tensor([inputs]))[0]
            drafts.append(int(mtp._project_to_logits(o[-1]).argmax()))
            inputs.append(drafts[-1])
            g = torch.cat([g, o[-1:]])
    return drafts


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    from test_random_arch_equivalence import CONFIGS, make_model_dir

    path = tmp_path_factory.mktemp("glm")
    hf = make_model_dir(path, CONFIGS["glm4_moe"])
    add_mtp_module(path, hf)
    return path


@pytest.mark.parametrize("ladder", [False, True], ids=["eager", "graph-path"])
def test_drafts_equal_transformers_mtp(glm, monkeypatch, ladder):
    import transformers.modeling_layers as layers

    if not hasattr(getattr(layers, "MtpModel", None), "forward_layer"):
        pytest.skip("this transformers has no MtpModel that runs one module step (forward_layer)")
    main, mtp = hf_mtp(glm, monkeypatch)
    written = load_file(str(glm / "model.safetensors"))
    assert torch.equal(mtp.layers[0].eh_proj.weight, written["model.layers.3.eh_proj.weight"])  # it read our tensors
    llm = LLM(str(glm), dtype="float32", device="cpu", max_model_len=256, block_size=16, max_num_batched_tokens=24,
              speculative_method="mtp", num_speculative_tokens=3, speculative_adaptive=False)
    head = llm.engine.core.proposer.runner
    assert head.kv.model.num_layers == 1 and head.kv.bytes_per_block * 3 == llm.engine.runner.kv.bytes_per_block  # one layer's KV
    for tokens, drafts in drafts_seen(llm, monkeypatch, ladder):
        assert drafts == reference_drafts(main, mtp, tokens, len(drafts)), tokens
    assert_no_leak(llm)


def test_mtp_never_changes_the_output(glm):
    check_output_unchanged(str(glm), speculative_config={"method": "mtp", "num_speculative_tokens": 2})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_mtp_chain_in_cuda_graphs(glm, monkeypatch):
    drafts_in_graphs_equal_eager(str(glm), monkeypatch, speculative_method="mtp")


def test_mtp_needs_a_module(tmp_path):
    from test_random_arch_equivalence import CONFIGS, make_model_dir

    make_model_dir(tmp_path, CONFIGS["qwen3"])
    with pytest.raises(ValueError, match="has none"):
        LLM(str(tmp_path), dtype="float32", device="cpu", max_model_len=128, speculative_method="mtp")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig.from_options(None, speculative_method="mtp", tensor_parallel_size=2)
