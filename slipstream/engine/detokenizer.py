"""Incremental detokenization.

Decoding one token at a time is wrong for byte-level BPE (a character can span tokens) and for tokenizers that
merge spaces with the previous token. We decode a small sliding window twice — with and without the newest
tokens — and release only the suffix that is new, holding back text that ends in an incomplete UTF-8 character.
"""
from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 6  # tokens of left context: enough to settle spaces and multi-token characters


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Feed one generated token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        # Keep the window short so each step decodes O(1) tokens.
        if self.prefix_offset > 4 * _CONTEXT_TOKENS:
            drop = self.prefix_offset - _CONTEXT_TOKENS
            self.ids = self.ids[drop:]
            self.prefix_offset -= drop
            self.read_offset -= drop
        return full[len(prefix) :]

    def decode_all(self, token_ids: list[int]) -> str:
        """The text `step` would have released over these tokens, in one decode (for non-streaming requests)."""
        assert self.read_offset == len(self.ids), "decode_all is for a detokenizer that was never stepped"
        context = self._decode(self.ids)
        return self._decode(self.ids + token_ids)[len(context) :]
