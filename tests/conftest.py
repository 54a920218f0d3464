import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU through the interpreter (fp16/fp32 only)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from slipstream import LLM
from slipstream.loader import embedded_model_path

# Under pytest-xdist the cores are shared by its workers: no more torch threads in all than cores, in the workers and
# in the processes their tests start (OpenMP threads that outnumber the cores spin and wait on each other: a chat test
# that takes 18 s alone took 225 s beside another worker).
_threads = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
torch.set_num_threads(_threads)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))

# pytest-xdist (scripts/test.sh: --dist loadfile --no-loadscope-reorder) hands whole files to its workers in this
# order, longest first, so that no worker starts a long file while the others run out of work (by default it orders
# files by their number of tests, and the file of most seconds, with 14 tests, started late). Seconds of each file on
# the 2-core CI machine, four workers (`--durations=0`, commit 3ec8513): 282, 186, 165, 143, 91, 61, 61, 58, 55, 46, 43.
SLOW_FILES_FIRST = ("test_tensor_parallel.py", "test_speculative.py", "test_kernels.py", "test_serve_process.py",
                    "test_async_scheduling.py", "test_moe.py", "test_server.py", "test_structured.py",
                    "test_smollm_equivalence.py", "test_fp8.py", "test_tools.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: a file's own order is kept)


def assert_no_leak(llm: LLM) -> None:
    """Every page is free once the prefix cache lets go of what it holds (and nothing is running)."""
    eng = llm.engine
    assert not eng.requests and not eng.scheduler.running and not eng.scheduler.waiting
    bm = eng.block_manager
    bm.check_consistency()
    cache = eng.core.prefix_cache
    if cache is not None:
        assert cache.num_evictable_blocks == len(cache.nodes), "a cached page is still referenced by a finished sequence"
        cache.clear()
        assert not cache.nodes
    assert bm.num_used_blocks == 0, f"{bm.num_used_blocks} blocks leaked"


@pytest.fixture(scope="session")
def gguf_path() -> str:
    return embedded_model_path()


@pytest.fixture(scope="session")
def hf_smollm(gguf_path):
    """HF transformers' own GGUF loader: an independent reference for our dequantization and Q/K permutation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def smollm(gguf_path) -> LLM:
    """The embedded model with a default-size pool (tests that need pressure build their own engine)."""
    return LLM(gguf_path, dtype="float32", device="cpu", max_model_len=1024)


@pytest.fixture
def fresh(smollm):
    """Hand out the shared engine and check it leaks nothing afterwards."""
    yield smollm
    assert_no_leak(smollm)


def gemv_prologue_ref(x, k, norm_weight, prologue):
    """What a fused GEMV's prologue makes of its one-row input: SwiGLU of [gate | up], RMSNorm, or x itself."""
    if prologue == "silu_mul":
        return torch.nn.functional.silu(x[:, :k]) * x[:, k:]
    if prologue == "rmsnorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_weight
    return x
