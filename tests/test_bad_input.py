"""Bad input -> ValueError naming the field and the allowed range; other requests are unaffected."""
import json

import pytest

from slipstream import LLM, SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(n=0), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_p=2.0), "min_p"),
        (dict(logprobs=50), "logprobs"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(n=True), "n"),  # a bool is an int to Python, not a count
        (dict(max_tokens=True), "max_tokens"),
        (dict(seed=True), "seed"),
        (dict(skip_special_tokens="no"), "skip_special_tokens"),
        (dict(stop=5), "stop"),
        (dict(stop_token_ids=5), "stop_token_ids"),
        (dict(logit_bias={"a": 1}), "logit_bias"),
        (dict(logit_bias=[1, 2]), "logit_bias"),
    ],
)
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_requests_leave_others_untouched(fresh):
    eng = fresh.engine
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = fresh.generate("The capital of France is", params)[0].outputs[0].token_ids
    eng.add_request("good", "The capital of France is", params)
    eng.step()  # the good request is mid-flight when the bad ones arrive
    with pytest.raises(ValueError, match="prompt must not be empty"):
        eng.add_request("empty", "", params)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        eng.add_request("empty-ids", [], params)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request("long", [5] * 1000, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request("too-long", [5] * 2000, params)
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request("oov", [10**9], params)
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("good", "x", params)
    done = None
    while eng.has_unfinished():
        for out in eng.step():
            done = out
    assert done.request_id == "good" and done.outputs[0].token_ids == expected


def test_generate_validates_all_prompts_first(fresh):
    with pytest.raises(ValueError):
        fresh.generate(["fine", ""], SamplingParams(max_tokens=2))
    assert not fresh.engine.requests  # nothing was half-submitted


def test_prompt_forms_and_bad_prompts(fresh):
    """vLLM's prompt dicts are prompts (a dict was read as the text of its keys); other shapes are a clear error."""
    params = SamplingParams(temperature=0, max_tokens=4)
    ids = fresh.engine.tokenize("The capital of France is")
    want = fresh.generate(ids, params)[0].outputs[0].token_ids
    for prompt in ({"prompt_token_ids": ids}, {"prompt": "The capital of France is"}, tuple(ids)):
        assert fresh.generate(prompt, params)[0].outputs[0].token_ids == want
    assert [o.outputs[0].token_ids for o in fresh.generate([{"prompt_token_ids": ids}, "The capital of France is"], params)] == [want] * 2
    for bad, message in (({"prompt": "x", "multi_modal_data": {}}, "prompt dict"), (5, "prompts must be"),
                         ([1.5, 2], "prompts\\[0\\]"), ([["a"]], "prompts\\[0\\]")):
        with pytest.raises(ValueError, match=message):
            fresh.generate(bad, params)
    with pytest.raises(ValueError, match="sampling_params"):
        fresh.generate("x", {"max_tokens": 2})
    with pytest.raises(ValueError, match="must not be empty"):
        fresh.chat([])
    # OpenAI's text parts read as the text they hold; a final assistant turn can be continued
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}]
    assert fresh.apply_chat_template(parts) == fresh.apply_chat_template([{"role": "user", "content": "Name a colour."}])
    with pytest.raises(ValueError, match="text parts"):
        fresh.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    # as the server: only an assistant's message may come without content
    for bad, message in (([{"role": "user"}], "a user message needs content"),
                         ([{"role": "system", "content": None}, {"role": "user", "content": "Hi"}], "a system message"),
                         (["Hi"], "each message is a dict")):
        with pytest.raises(ValueError, match=message):
            fresh.chat(bad)
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert len(fresh.apply_chat_template(turn, add_generation_prompt=False)) < len(fresh.apply_chat_template(turn))
    assert not fresh.engine.requests


def test_generate_takes_more_prompts_than_the_queue(gguf_path):
    """Offline, a batch larger than max_waiting goes in as the queue drains (it failed part-way, leaving its first
    requests queued and every later call refused as overloaded)."""
    llm = LLM(gguf_path, dtype="float32", device="cpu", max_model_len=256, max_waiting=3)
    outs = llm.generate((f"{i} + {i} =" for i in range(7)), SamplingParams(temperature=0, max_tokens=2))
    assert [o.prompt for o in outs] == [f"{i} + {i} =" for i in range(7)] and all(o.finished for o in outs)
    assert llm.generate("1 + 1 =", SamplingParams(max_tokens=1))[0].finished
    assert not llm._inbox and not llm.engine.has_unfinished()


def test_generate_while_a_stream_is_open_leaves_the_stream_whole(fresh):
    """`generate` stepped the engine and took (and dropped) an open stream's outputs, or failed on them (KeyError)."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    it = fresh.stream("Count from one to ten:", params)
    first = next(it)
    other = fresh.generate("Hello", SamplingParams(temperature=0, max_tokens=20))[0]
    assert other.finished and other.outputs[0].token_ids
    rest = list(it)
    deltas = [first, *rest]
    assert "".join(o.outputs[0].delta_text for o in deltas) == rest[-1].outputs[0].text
    assert sum(len(o.outputs[0].delta_token_ids) for o in deltas) == 30
    assert not fresh._inbox


def test_unknown_model_path():
    with pytest.raises(ValueError, match="does not exist"):
        LLM("/nonexistent/model")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        LLM(str(tmp_path))


@pytest.mark.parametrize("heads, kv, message", [(4, 3, "num_key_value_heads must divide num_attention_heads (4)"),
                                                (3, 3, "head_dim must be even")])
def test_inconsistent_attention_shapes_are_named(heads, kv, message):
    """A config (or a GGUF's metadata) whose heads do not fit is named as such, not as a shape error further on."""
    from slipstream.config import ModelConfig

    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 256, "intermediate_size": 512,
           "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": kv}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_hf(cfg)


def test_unknown_engine_option():
    with pytest.raises(ValueError, match="unknown engine option 'max_batch'"):
        LLM(None, max_batch=3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(enforce_eager="yes"), "enforce_eager must be true or false, got 'yes'"),  # (ran eagerly before: "yes" is true)
    (dict(speculative_config={"method": "ngram", "adaptive": "no"}), "speculative_config.adaptive must be true or false"),
    (dict(max_num_seqs=2.5), "max_num_seqs must be an integer, got 2.5"),
    (dict(max_num_seqs=True), "max_num_seqs must be an integer, got True"),
    (dict(kv_cache_bytes="1GB"), "kv_cache_bytes must be an integer or None, got '1GB'"),
    (dict(gpu_memory_utilization="0.5"), "gpu_memory_utilization must be a number, got '0.5'"),
    (dict(dtype=16), "dtype must be a string, got 16"),
])
def test_engine_options_of_the_wrong_type(kwargs, message):
    """An engine option of the wrong type is named before anything loads (truthy strings passed as bools)."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM(None, **kwargs)


def test_paths_are_taken_for_path_options(tmp_path):
    """A path (os.PathLike) where an option names a file or directory is taken as its text."""
    from slipstream.config import EngineConfig

    config = EngineConfig.from_options(None, tokenizer=tmp_path, speculative_method="ngram")
    assert config.tokenizer == str(tmp_path)


def test_warm_up_leaves_nothing_behind(fresh):
    fresh.engine.warm_up()
    assert not fresh.engine.requests  # the `fresh` fixture then checks that every block is free


def test_gpu_warm_up_steps_finish_and_hit_the_cache(fresh):
    """The steps only a GPU warms up with (they compile kernel variants; here on the CPU, which skips them) finish
    every request, free every page (checked by `fresh`), and the repeated heads do hit the prefix cache: two hits of
    two pages each, the prefills over a cached head that would otherwise compile inside the first such request."""
    from slipstream.sampling_params import StructuredOutputs

    core = fresh.engine.core
    bs = core.config.cache.block_size
    before = core.prefix_cache.stats.hit_tokens
    core._warm_up_on_gpu(2 * bs + 3, StructuredOutputs(choice=(core._plain_word(),)))
    assert not core.requests
    assert core.prefix_cache.stats.hit_tokens - before >= 2 * 2 * bs
    core._forget_warm_up()
