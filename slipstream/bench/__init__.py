"""Benchmarks users run themselves: `slipstream bench latency|throughput|kernels|prefix|serve`.

Each prints a short table — our figure, the hardware limit measured in the same run, and a peer where one is
measured in the same process — and writes the full results as JSON."""
