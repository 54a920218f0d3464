"""While a stream decodes, a long prompt's prefill is cut into chunks sized from the measured cost of a token
(--max-decode-stall), so the stream keeps getting tokens; the cost is measured around the whole step, including
on a CPU where launching a step is computing it."""
import random

from conftest import assert_no_leak
from slipstream import SamplingParams


def test_long_prompt_prefills_in_chunks_while_a_stream_decodes(fresh):
    eng = fresh.engine
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(10, 1000) for _ in range(n)]  # noqa: E731
    fresh.generate([ids(300)], SamplingParams(max_tokens=1))  # a prefill-sized step: the cost per token is measured
    assert eng.core._prefill_budget() is not None and eng.core._prefill_budget() < 900
    eng.add_request("stream", ids(16), SamplingParams(max_tokens=400, ignore_eos=True))
    for _ in range(3):
        eng.step()
    eng.add_request("long", ids(900), SamplingParams(max_tokens=1, ignore_eos=True))
    stream_steps, done = 0, False
    while not done:
        for out in eng.step():
            if out.request_id == "stream":
                stream_steps += 1
            done = done or (out.request_id == "long" and out.finished)
    assert stream_steps >= 3, f"the stream got tokens in only {stream_steps} steps while the long prompt prefilled"
    eng.abort_request("stream")
    assert_no_leak(fresh)
