"""Greedy decoding with HF transformers, one prompt at a time (no padding), with raw per-step logprobs."""
from __future__ import annotations

import torch


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> tuple[list[int], list[float]]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=sorted(eos_ids) or None,
        pad_token_id=0,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs
