"""The model runner: a plain-data `Step` in (runner/batch.py), per sequence 0..k+1 sampled tokens out.

Rooms, one job each: `device` (where and in what dtype), `kv_pool` (sizing the paged KV pool and handing it to
the attention backend), `inputs` (a step's small tensors, staged in one upload), `cuda_graphs` (captured
forwards per query length), `sampling` (per-row sampling tensors); `model_runner` only orchestrates them.
The runner never imports the engine: a step is plain data that could be sent to a worker process.
"""
