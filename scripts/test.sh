#!/usr/bin/env bash
# The test suite (CPU; Triton kernels run under TRITON_INTERPRET=1 in their own tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m pip install -q "torch==2.13.0" -e ".[test]"  # pytest, hypothesis, triton (for the interpreter), ...
# The tests run in up to four pytest-xdist workers, a test file to a worker (its module fixtures load once), the
# longest files first (tests/conftest.py): on 2 cores
# the suite took 12.6 min where one process took 23.2 (most tests wait on subprocesses, servers and sockets part of the time)
workers=$(python3 -c 'import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))')
python3 -m pytest -q -n "$workers" --dist loadfile --no-loadscope-reorder tests "$@"
