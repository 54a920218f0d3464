"""Structured output: constraints compiled to token-level grammars (xgrammar), one matcher per sequence.

A constraint (`StructuredOutputs`) becomes a grammar over characters (`grammar_of`, cheap and tokenizer-free: the
front end calls it to refuse a bad schema or regex before the request is queued), then a compiled grammar over
this model's tokens (`Grammars.compile`, on a worker thread and cached by the constraint's text, so a request
waiting for its grammar holds up no one and a repeated schema compiles once). Each sequence walks the compiled
grammar with its own matcher: before a draw the matcher writes the set of tokens that keep the output inside the
language as a bitmask (bit t of word t // 32 set: token t allowed), which the sampler applies on the device; after
the draw the token advances the matcher. When the language is complete the mask allows only the stop tokens.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from slipstream.runner.host_gate import HostGate
from slipstream.sampling_params import StructuredOutputs

# JSON is generated compact (no free whitespace between tokens): a small model given free whitespace can spend its
# whole budget on newlines, and compact output parses the same.
_JSON = dict(any_whitespace=False)
CACHE_SIZE = 512  # compiled grammars kept per engine
FILL_SWITCH_INTERVAL_S = 0.0005  # the interpreter's switch interval while masks fill on a thread (see Grammars)
_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[06:36:50] /project/cpp/x.cc:94: " before xgrammar's message
_REGEX_SPECIAL = re.compile(r"([\\^$.|?*+()\[\]{}/-])")


def _choice_regex(choices: tuple[str, ...]) -> str:
    # re.escape also escapes spaces and other plain characters, which xgrammar's regex dialect warns about
    return "(" + "|".join(_REGEX_SPECIAL.sub(r"\\\1", c) for c in choices) + ")"


def grammar_of(so: StructuredOutputs) -> Any:
    """The constraint as an xgrammar Grammar; ValueError naming the problem if it is not a valid one. Parsed once
    per distinct constraint text: the front end validates a request, the input check and the compiler ask again,
    and agents repeat their schemas (a large schema takes milliseconds, on the server's event loop)."""
    if so.json is not None:  # property order is kept: it is the order the output writes them in
        return _parsed("json", so.json if isinstance(so.json, str) else json.dumps(so.json))
    if so.json_object:
        return _parsed("json", '{"type": "object"}')
    if so.regex is not None:
        return _parsed("regex", so.regex)
    if so.choice is not None:
        return _parsed("regex", _choice_regex(so.choice))
    return _parsed("grammar", so.grammar)


@functools.lru_cache(maxsize=CACHE_SIZE)  # a refused text raises and is not kept
def _parsed(kind: str, text: str) -> Any:
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(text, **_JSON)
        return xgr.Grammar.from_regex(text) if kind == "regex" else xgr.Grammar.from_ebnf(text)
    except (RuntimeError, ValueError, TypeError) as e:
        name = "json schema" if kind == "json" else kind
        raise ValueError(f"structured_outputs holds an invalid {name}: {_XGR_PREFIX.sub('', str(e)).strip()}") from None


class Grammars:
    """Compiles constraints for one model (tokenizer, vocabulary, stop tokens) and makes matchers for them."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], pin_memory: bool = False,
                 gate: HostGate | None = None) -> None:
        self.vocab_size = vocab_size  # the model's: the width of the masks the sampler applies
        # Masks in page-locked memory (given a GPU): a copy from pageable memory may wait for the device to reach it,
        # which would hold the host until the step's forward has run.
        self.pin_memory = pin_memory
        # With a gate (a GPU), `masks_later` fills masks on a thread while the device waits for them behind it
        self.gate = gate
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slipstream-masks") if gate else None
        if gate is not None:
            # The filling thread needs the GIL to start, between its two calls and to open the gate; while the engine's
            # thread runs Python, each of those waits up to the switch interval (5 ms by default, as long as a step):
            # the mask would come after the step it was meant to overlap (scripts/fill_thread_probe.py).
            sys.setswitchinterval(min(sys.getswitchinterval(), FILL_SWITCH_INTERVAL_S))
        self._pinned: list[torch.Tensor | None] = [None, None]
        self._turn = 0
        # The grammar sees the tokenizer's ids (and the stop tokens); a model's rows past them (padding) are refused
        # here. xgrammar would refuse them one by one in every row it fills: a 49,152-token tokenizer under a
        # 151,936-row head took 10x as long per row (0.16 ms vs 0.016, scripts/grammar_costs.py).
        self.grammar_vocab = min(vocab_size, max(len(tokenizer), max(stop_token_ids, default=-1) + 1))
        self._tokenizer, self._stop = tokenizer, sorted(stop_token_ids)
        self._compiler: Any = None  # built on first use: models that never see a constraint never pay for it
        self._cache: OrderedDict[str, Future] = OrderedDict()  # least recently used first
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slipstream-grammar")
        # Rows fill in parallel in xgrammar's threads (they release the GIL): half the host's cores, at most 8.
        self._batch = xgr.BatchGrammarMatcher(max_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))

    def compile(self, so: StructuredOutputs) -> Future:
        """A future of the compiled grammar; the same future for every request with an equal constraint."""
        key = so.key
        fut = self._cache.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = self._cache[key] = self._pool.submit(self._compile, so)
            if len(self._cache) > CACHE_SIZE:  # schemas are client input: keep the most recent ones only
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return fut

    def _compile(self, so: StructuredOutputs) -> Any:
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.grammar_vocab, stop_token_ids=self._stop)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler.compile_grammar(grammar_of(so))

    def matcher(self, compiled: Any) -> Matcher:
        return Matcher(xgr.GrammarMatcher(compiled))

    def masks(self, num_rows: int, rows: list[tuple[int, Matcher, list[int]]]) -> Bitmask:
        """A host bitmask of `num_rows` rows, every token allowed except in `rows`: (row, matcher, drafts ahead),
        where the row holds what the matcher allows after the drafts (drafts being verified in this step). The
        matchers are left where they were. With `pin_memory` the words live in a staging buffer that a later call
        overwrites: `widen` them to the device at once."""
        out = self._words(num_rows).fill_(-1)
        # A sequence with drafts has a row per draft, all from its one matcher moved along the drafts: those rows
        # fill in order. Every other row is its matcher's only one: they fill together, in parallel.
        seen: dict[int, int] = {}
        for _, m, _ in rows:
            seen[id(m)] = seen.get(id(m), 0) + 1
        alone = [(r, m) for r, m, ahead in rows if seen[id(m)] == 1 and not ahead and not m.done]
        if alone:
            self._batch.batch_fill_next_token_bitmask([m._m for _, m in alone], out, indices=[r for r, _ in alone])
        for r, m, ahead in rows:
            if seen[id(m)] > 1 or ahead:
                taken = m.take(ahead)
                m.fill(out, r)
                m.undo(taken)
        return Bitmask(out, sorted({r for r, _, _ in rows}), self.grammar_vocab, self.vocab_size)

    def masks_later(self, num_rows: int, rows: list[tuple[int, Matcher, list[int]]]) -> tuple[Bitmask, Future]:
        """`masks` for rows without drafts, filled on a thread (needs a gate): the bitmask at once, its words still
        being written, and the fill's future. The device reads the words behind the gate, which the fill opens when
        done (or failed). The matchers are the fill's until the future is done. The lists are made here: the thread
        runs only calls that release the GIL (a memset and xgrammar's fill), so the engine's Python keeps running."""
        assert all(not ahead for _, _, ahead in rows), "rows with drafts fill in order: use masks"
        out, ticket = self._words(num_rows), self.gate.next_ticket()
        live = [(r, m._m) for r, m, _ in rows if not m.done]
        matchers, indices = [m for _, m in live], [r for r, _ in live]

        def fill() -> None:
            try:
                with torch.inference_mode():  # (the words may be an inference tensor: the runner asked in that mode)
                    out.fill_(-1)
                if matchers:
                    self._batch.batch_fill_next_token_bitmask(matchers, out, indices=indices)
            finally:
                self.gate.open(ticket)

        future = self._filler.submit(fill)
        return Bitmask(out, sorted({r for r, _, _ in rows}), self.grammar_vocab, self.vocab_size, self.gate, ticket), future

    def _words(self, num_rows: int) -> torch.Tensor:
        gw = (self.grammar_vocab + 31) // 32
        return self._staged(num_rows, gw) if self.pin_memory else torch.empty((num_rows, gw), dtype=torch.int32)

    def _staged(self, num_rows: int, words: int) -> torch.Tensor:
        """Rows of a page-locked buffer kept across steps (a new one each step is a page-locked allocation, which
        can wait on the device). Two alternate, and one is written again only two calls later: the engine reads a
        step's tokens, after its draw has consumed the mask's upload, before it fills the next step's masks."""
        self._turn ^= 1
        buf = self._pinned[self._turn]
        if buf is None or buf.shape[0] < num_rows:
            buf = self._pinned[self._turn] = torch.empty((max(num_rows, 256), words), dtype=torch.int32, pin_memory=True)
        return buf[:num_rows]


@dataclass(frozen=True)
class Bitmask:
    """A step's allowed tokens as the grammars wrote them: `words` [rows, ceil(grammar vocabulary / 32)] int32 on the
    host, bit t % 32 of word t // 32 set = token t allowed, every bit set in rows no grammar holds. The model's ids
    past the grammar's vocabulary (a head padded beyond its tokenizer) are refused in the `held` rows by `widen`, on
    the device: widening on the host meant edits of 5 MB a step under 256 constrained streams and a head of 151,936
    rows, and a transfer three times the size."""

    words: torch.Tensor
    held: list[int]  # the rows a grammar holds
    grammar_vocab: int
    vocab_size: int
    gate: HostGate | None = None  # the words are still being written: the device waits for `ticket` to read them
    ticket: int = 0

    def __reduce__(self) -> tuple:
        # Sent to the other tensor-parallel ranks: the rows alone (pickling a view of the staging buffer would send
        # the whole buffer, 5 MB for 256 rows of a 151,936-token vocabulary, every constrained step).
        return Bitmask, (self.words.clone(), self.held, self.grammar_vocab, self.vocab_size)

    @property
    def padded(self) -> bool:
        """The model's vocabulary runs past the grammar's: `widen` refuses those ids in the held rows."""
        return self.vocab_size > self.grammar_vocab

    def widen(self, device: torch.device, held: torch.Tensor | None = None) -> torch.Tensor:
        """The mask over the model's vocabulary, on `device`: [rows, ceil(vocab_size / 32)]. `held`: `self.held`
        already on the device (a step stages it with its other small inputs; a tensor made here from the list
        would be a synchronous copy)."""
        if self.gate is not None:
            self.gate.wait(self.ticket)
        words = self.words.to(device, non_blocking=True)
        if not self.padded:
            return words
        total, gw = (self.vocab_size + 31) // 32, words.shape[1]
        out = torch.empty((words.shape[0], total), dtype=torch.int32, device=device)
        out[:, :gw] = words
        # Each row's words past the grammar's: none allowed in a held row, all in the others, set by ops that only
        # queue work. (`out[rows, gw:] = 0` held the host: that line was 37% of the engine core's samples in a
        # constrained run, py-spy, H100, lease AX, as if it waited for the gate and the step's forward.)
        pad = torch.full((words.shape[0], 1), -1, dtype=torch.int32, device=device)
        if self.held:
            rows = torch.tensor(self.held, dtype=torch.long, device=device) if held is None else held
            pad.index_fill_(0, rows, 0)
        out[:, gw:] = pad
        if self.grammar_vocab % 32:  # and the ids past the grammar's in its last word
            out[:, gw - 1 : gw] &= pad | ((1 << (self.grammar_vocab % 32)) - 1)
        return out


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, m: Any) -> None:
        self._m = m

    def advance(self, token: int) -> bool:
        """Take a drawn token; False if the grammar does not allow it (the mask makes that impossible)."""
        return self._m.accept_token(token)

    @property
    def done(self) -> bool:
        """The output is a complete sentence of the language and the stop token was taken."""
        return self._m.is_terminated()

    def take(self, ahead: list[int]) -> int:
        """Advance through `ahead` as far as the grammar allows; how many were taken (`undo` them after)."""
        taken = 0
        for t in ahead:
            if self._m.is_terminated() or not self._m.accept_token(t):
                break  # a draft the grammar refuses (or one after the stop token) is never accepted, nor rows after it
            taken += 1
        return taken

    def fill(self, out: torch.Tensor, row: int) -> None:
        """Write into out[row] the tokens the grammar allows next. Past the stop token (a draft took it) nothing
        follows: the row is never kept, and it is left as it was."""
        if not self._m.is_terminated():
            self._m.fill_next_token_bitmask(out, row)

    def undo(self, taken: int) -> None:
        if taken:
            self._m.rollback(taken)
