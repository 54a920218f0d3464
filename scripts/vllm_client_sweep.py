"""vLLM's own `bench serve` client (the peer's code, unchanged) at several request rates in one process: vLLM is
imported once instead of once per rate (seconds each on a GPU machine). Prints vLLM's own result block per rate and
saves vLLM's result JSON as OUT_DIR/vllmclient-LABEL-RATE.json.

usage: python3 scripts/vllm_client_sweep.py LABEL OUT_DIR RATES -- [vllm bench serve arguments...]
  e.g. ... slipstream out "10 20 40 80 inf" -- --base-url http://127.0.0.1:8123 --model q3 --tokenizer DIR ...
"""
import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

label, out, rates = sys.argv[1:4]
rest = sys.argv[sys.argv.index("--") + 1 :]
for rate in rates.split():
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(rest + ["--request-rate", rate, "--save-result", "--result-dir", out,
                                     "--result-filename", f"vllmclient-{label}-{rate}.json"])
    print(f"==== {label}, vLLM's client, request rate {rate}", flush=True)
    main(args)
