"""The command line as a new user meets it: errors before anything loads, `--version`, `python -m slipstream`, and
`slipstream chat` driven through a pseudo-terminal (Ctrl-C stops a reply, slash commands, old turns dropped to fit
max_model_len, Ctrl-D quits)."""
import os
import pty
import select
import subprocess
import sys
import time

import pytest


def _run(*args, timeout=60):
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "slipstream", *args], capture_output=True, text=True, timeout=timeout)
    return p, time.perf_counter() - start


# The bad-option cases run in one child process, through cli.main one after another (each its own stderr): a process
# each, importing torch and transformers, cost about 3.5 s of CPU apiece on the 2-core CI machine.
_PROBE = """
import contextlib, io, json, logging, sys, traceback
from slipstream import cli
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli.main(args)
            code = 0
        except SystemExit as e:
            code = e.code
        except Exception:
            traceback.print_exc()
            code = 1
    logging.getLogger("slipstream").handlers.clear()  # (main adds its stderr handler on every call)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad_option_runs() -> dict:
    import json

    cases = [args for args, _ in BAD_OPTIONS]
    p = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cases)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return {tuple(args): result for args, result in zip(cases, json.loads(p.stdout.splitlines()[-1]))}


BAD_OPTIONS = [
    (["generate", "hi", "--top-p", "2"], "--top-p must be in (0, 1]"),
    (["generate", "hi", "--max-tokens", "-1"], "--max-tokens must be an integer >= 1"),
    (["generate", "hi", "--block-size", "0"], "--block-size must be >= 1"),
    (["generate", "hi", "--max-model-len", "0"], "--max-model-len"),
    (["generate", "hi", "--max-model-len", "100000"], "--max-model-len 100000 is more than the 8192 positions"),
    (["generate", "hi", "--gpu-memory-utilization", "5"], "--gpu-memory-utilization must be in (0, 1]"),
    (["generate", "hi", "--attention-backend", "triton", "--device", "cpu"], "--attention-backend 'triton' needs a cuda"),
    (["serve", "--tensor-parallel-size", "3", "--nnodes", "2"], "--nnodes must be >= 1 and divide"),
    (["serve", "--port", "99999"], "--port must be in [0, 65535]"),
    (["serve", "--grace-period", "-1"], "--grace-period must be >= 0"),
    (["chat", "--temperature", "-1"], "--temperature"),
    (["generate", "hi", "--model", "/does/not/exist"], "does not exist"),
    (["train-draft", "--prompts", "/does/not/exist.txt", "--out", "/tmp/never"], "cannot be read"),
    (["train-draft", "--prompts", "p.txt", "--out", "/tmp/never", "--epochs", "0"], "--epochs must be >= 1"),
    (["bench", "speculative", "--workload", "chat"], "--dataset"),
    (["quantize", "--out", "/tmp/never", "--format", "awq", "--group-size", "0"], "--group-size must be a positive"),
    (["quantize", "--out", "/tmp/never", "--format", "nvfp4", "--algorithm", "gptq"], "--algorithm does not apply"),
    (["quantize", "--out", "/tmp/never", "--scheme", "block", "--group-size", "64"], "--group-size does not apply"),
    (["quantize", "--out", "/tmp/never", "--format", "awq", "--scheme", "block"], "--scheme does not apply"),
    (["quantize", "--out", "/etc/hostname", "--format", "awq"], "is a file, not a directory"),
    (["quantize", "--out", "/tmp/never", "--format", "nvfp4", "--device", "cuda"], "--device: where calibration runs"),
    (["quantize", "--out", "/tmp/never", "--calibration-data", "c.txt"], "--calibration-data: nothing calibrates"),
    (["quantize", "--out", "/tmp/never", "--algorithm", "gptq", "--calibration-data", "/does/not/exist.txt"],
     "--calibration-data: prompts file"),
    (["quantize", "--out", "/tmp/never", "--act-order"], "--act-order is GPTQ's: it needs --algorithm gptq"),
    (["bench", "quality", "--max-tokens", "0"], "--max-tokens must be a positive multiple of --stride"),
    (["bench", "quality", "--max-tokens", "256"], "--max-tokens must be a positive multiple of --stride, got 256"),
    (["bench", "quality", "--window", "0"], "--window must be >= 2"),
    (["bench", "speculative", "--num-prompts", "-1"], "--num-prompts must be >= 1, got -1"),
    (["serve", "--served-model-name", " "], "--served-model-name must not be empty"),
    (["bench", "speculative", "--output-len", "0"], "--output-len must be >= 1, got 0"),
    (["bench", "speculative", "--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["bench", "quality", "--stride", "-1"], "--stride must be in [1, --window - 1]"),
    (["bench", "quality", "--window", "256", "--stride", "256"], "--stride must be in [1, --window - 1], got 256"),
    (["serve", "/no/such/model"], "model path '/no/such/model' does not exist"),  # (before the server starts)
    (["serve", "a.gguf", "--model", "b.gguf"], "the model is named twice: 'a.gguf' and --model 'b.gguf'"),
    # a misspelt option: the command's own usage, and the option meant (the top-level usage, without either, before)
    (["generate", "--max-tokns", "5", "hi"], "slipstream generate: error: unrecognized arguments: --max-tokns hi (did "
                                             "you mean --max-tokens?)"),
    (["serve", "--prot", "8000"], "slipstream serve: error: unrecognized arguments: --prot (did you mean --port?)"),
    (["bench", "latency", "--batch-sizee", "4"], "slipstream bench latency: error: unrecognized arguments: "
                                                 "--batch-sizee 4 (did you mean --batch-size?)"),
    (["generate", "hi", "--zzz"], "unrecognized arguments: --zzz\n"),
]


@pytest.mark.parametrize("args, message", BAD_OPTIONS)
def test_bad_options_fail_before_loading(args, message, bad_option_runs):
    """One line naming the flag, before anything loads (no start-up progress line)."""
    code, err = bad_option_runs[tuple(args)]
    assert code == 2 and message in err, err
    assert "Traceback" not in err
    # a missing model, or one with fewer positions, is found as loading starts
    assert "[slipstream] loading" not in err or "--model" in args or "100000" in args


def test_ctrl_c_while_generating_ends_quietly():
    """SIGINT (Ctrl-C) while the model loads or generates: status 130 and no traceback."""
    import signal

    p = subprocess.Popen([sys.executable, "-m", "slipstream", "generate", "Write a long story.", "--max-tokens", "2000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        p.stderr.readline()  # the first start-up line: loading has begun
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    # 130, or killed by SIGINT (which a shell reports as 130): CPython ends that way when the interrupt also ended
    # code it ran through PyRun_* (extension modules' initializers do) while loading
    assert p.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err


def test_a_ctrl_c_lost_in_a_weakref_callback_is_raised_at_the_next_checkpoint():
    """Python reports an exception raised inside a weakref callback as ignored and goes on: a Ctrl-C whose handler ran
    there (importlib's module locks have one; hit while loading imported transformers) was lost, and `generate` ran to
    its last token. The CLI's handler remembers the press and its checkpoints raise it again; the lost exception's
    report (a traceback on the terminal) is left out, other reports are not."""
    import signal
    import weakref

    from slipstream.cli import CtrlC, check_ctrl_c

    handler, reported = CtrlC(), []
    previous, hook = signal.signal(signal.SIGINT, handler), sys.unraisablehook
    sys.unraisablehook = CtrlC.unraisable(reported.append)
    try:
        check_ctrl_c()  # not pressed: nothing

        class Held:
            pass

        held = Held()
        ref = weakref.ref(held, lambda _: handler(signal.SIGINT, None))
        del held  # the callback runs here; its KeyboardInterrupt goes to sys.unraisablehook, not to this frame
        assert ref() is None and reported == []
        with pytest.raises(KeyboardInterrupt):
            check_ctrl_c()
        held = Held()
        ref = weakref.ref(held, lambda _: 1 / 0)
        del held
        assert [u.exc_type for u in reported] == [ZeroDivisionError]
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    for content in (b"", b"hello, not a model\n"):
        bad = tmp_path / "model.gguf"
        bad.write_bytes(content)
        p, _ = _run("generate", "hi", "--model", str(bad), "--quiet")
        assert p.returncode != 0 and f"{str(bad)!r} is not a GGUF file" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr


def test_device_and_gpu_bench_checked_first():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the messages under test are those of a CPU-only machine")
    for command in (("generate", "hi"), ("serve",)):
        p, _ = _run(*command, "--device", "cuda")
        assert p.returncode == 2 and "no CUDA GPU" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p, _ = _run("bench", "latency")
    assert p.returncode == 2 and "NVIDIA GPU" in p.stderr and "Traceback" not in p.stderr
    p, _ = _run("tune", "moe", "--model", "qwen3-30b-a3b")
    assert p.returncode == 2 and "NVIDIA GPU" in p.stderr and "Traceback" not in p.stderr


def test_version_and_module_entry_point():
    p, _ = _run("--version")
    assert p.returncode == 0 and p.stdout.startswith("slipstream ")
    p, _ = _run("--help")
    assert p.returncode == 0 and "quantize" in p.stdout


class Terminal:
    """A child process on a pseudo-terminal: keys in, screen text out."""

    def __init__(self, argv):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execv(sys.executable, [sys.executable, *argv])
        self.seen = ""

    def read_until(self, text, timeout=120.0):
        end = time.time() + timeout
        while text not in self.seen:
            left = end - time.time()
            if left <= 0:
                raise AssertionError(f"waited for {text!r}; the screen shows:\n{self.seen[-2000:]}")
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096).decode(errors="replace")
                except OSError:
                    break
                self.seen += chunk
        if text not in self.seen:
            raise AssertionError(f"the program ended before {text!r}:\n{self.seen[-2000:]}")
        i = self.seen.index(text) + len(text)
        before, self.seen = self.seen[:i], self.seen[i:]
        return before

    def send(self, keys):
        os.write(self.fd, keys.encode())

    def wait(self, timeout=30.0):
        end = time.time() + timeout
        while time.time() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                if select.select([self.fd], [], [], 0.2)[0]:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:
                pass
        os.kill(self.pid, 9)
        raise AssertionError(f"the program did not end:\n{self.seen[-2000:]}")


def test_chat_keys_commands_and_long_conversations(gguf_path):
    term = Terminal(["-m", "slipstream", "chat", "--model", gguf_path, "--device", "cpu", "--max-tokens", "48",
                     "--max-model-len", "256", "--temperature", "0"])
    term.read_until("[slipstream] KV cache:")  # start-up progress lines
    term.read_until("[slipstream] ready in")
    term.read_until("> ")
    term.send("Write a long poem about the sea.\r")
    term.read_until("Write a long poem about the sea.")
    time.sleep(0.3)  # let the reply begin
    term.send("\x03")  # Ctrl-C: stop the reply, not the program
    term.read_until("[stopped]")
    term.read_until("> ")
    term.send("/reset\r")
    term.read_until("[conversation cleared]")
    term.read_until("> ")
    # A SIGINT that lands after input() draws the prompt but before readline waits on the terminal is seen only at
    # the next key (CPython checks signals when that wait is interrupted): give the wait time to begin.
    time.sleep(0.5)
    term.send("\x03")  # once at the prompt: a hint; the chat goes on
    term.read_until("Ctrl-C again to quit")
    term.read_until("> ")
    for i in range(5):  # more exchanges than 256 tokens hold: the oldest go, the chat goes on
        term.send(f"Tell me fact number {i} about the moon.\r")
        out = term.read_until("tokens in")
        term.read_until("> ")
        if "oldest exchange" in out:
            break
    else:
        raise AssertionError("the conversation outgrew max_model_len without dropping old turns")
    term.send("/help\r")
    term.read_until("/system")
    term.read_until("> ")
    term.send("/system Answer in one word.\r")
    term.read_until("[system prompt set; conversation cleared]")
    term.read_until("> ")
    term.send("\x04")  # Ctrl-D at the prompt: quit cleanly
    assert term.wait() == 0


def test_chat_exit_command(gguf_path):
    p = subprocess.run([sys.executable, "-m", "slipstream", "chat", "--model", gguf_path, "--device", "cpu", "--quiet"],
                       input="/exit\n/reset\n", capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert "[conversation cleared]" not in p.stderr  # nothing after /exit was read


def test_gguf_tokenizer_is_converted_once(gguf_path, tmp_path, monkeypatch):
    """The GGUF tokenizer is converted on the first start and read from the cache afterwards, unchanged."""
    from slipstream.loader import load_tokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = load_tokenizer(gguf_path)
    entries = list((tmp_path / "slipstream" / "tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    start = time.perf_counter()
    again = load_tokenizer(gguf_path)
    assert time.perf_counter() - start < 3.0  # conversion takes seconds; reading the cache a fraction of one
    text = "The capital of France is Paris.\n\n日本語 🙂"
    assert again.encode(text) == first.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        first.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def test_readme_names_every_engine_option():
    """The README's option list and the CLI's flags come from one table: every option is documented."""
    from pathlib import Path

    from slipstream.config import ENGINE_OPTIONS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [name for name in ENGINE_OPTIONS if f"`{name}`" not in readme]
    assert not missing, f"README does not name the engine options {missing}"


def test_gpus_without_bf16_get_fp16_and_a_clear_error(monkeypatch):
    """Compute capability below 8.0 (a T4, a V100) has no bf16 arithmetic: `auto` picks fp16 there and an explicit
    bfloat16 is refused naming the capability, instead of failing inside a Triton kernel."""
    import json
    from importlib import resources

    import torch

    from slipstream.config import ModelConfig
    from slipstream.runner import device

    cfg = ModelConfig.from_hf(json.loads(resources.files("slipstream.configs").joinpath("qwen3-0.6b.json").read_text()))
    assert cfg.dtype == "bfloat16"
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    assert device.resolve_dtype("auto", cfg, gpu) == torch.float16
    with pytest.raises(ValueError, match="compute capability 8.0 or newer .* 7.5"):
        device.resolve_dtype("bfloat16", cfg, gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert device.resolve_dtype("auto", cfg, gpu) == torch.bfloat16
    assert device.resolve_dtype("auto", cfg, torch.device("cpu")) == torch.float32


def test_weights_progress_only_on_a_watched_terminal(monkeypatch):
    """The loading bar is drawn on an interactive stderr with INFO logging, and nowhere else; items pass through."""
    import io
    import logging

    from slipstream.loader.progress import progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    logger = logging.getLogger("slipstream")
    before = logger.level
    try:
        logger.setLevel(logging.INFO)
        for stream, drawn in ((Tty(), True), (io.StringIO(), False)):
            monkeypatch.setattr(sys, "stderr", stream)
            assert list(progress(iter("abc"), 3)) == ["a", "b", "c"]
            assert ("3/3 tensors" in stream.getvalue()) == drawn
        monkeypatch.setattr(sys, "stderr", Tty())
        logger.setLevel(logging.WARNING)  # --quiet
        assert list(progress(iter("ab"), 2)) == ["a", "b"] and sys.stderr.getvalue() == ""
    finally:
        logger.setLevel(before)


def test_profile_counts_each_kernels_time_past_the_ones_before():
    """--profile gpu's second table: a kernel placed early (PDL) and waiting through its predecessor's tail is counted
    only past it; a kernel inside another's span adds nothing; gaps are not busy time; the times add to the busy time."""
    from slipstream.bench.common import exposed_times

    times, busy = exposed_times([("b", 2.0, 13.0), ("a", 0.0, 10.0), ("c", 20.0, 25.0), ("d", 21.0, 24.0),
                                 ("b", 30.0, 31.0)])
    assert times == {"a": [1, 10.0], "b": [2, 4.0], "c": [1, 5.0], "d": [1, 0.0]}
    assert busy == 19.0 == sum(t for _, t in times.values())
