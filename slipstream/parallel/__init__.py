"""Tensor parallelism: each of N ranks holds a slice of every layer and they meet in collectives.

`shard.py`: which slice a rank holds (`Shard`) and the collectives the layers call; `workers.py`: the processes of
ranks 1..N-1, started by the engine, which run each step rank 0 broadcasts.
"""
