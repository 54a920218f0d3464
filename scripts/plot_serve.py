"""Draw an online-serving comparison (request throughput, TTFT p99, TPOT p50 against request rate, one line per
engine) from a CSV with columns engine, rate, req_s, ttft_p99_ms, tpot_p50_ms (rate "inf" is drawn last).

usage: python3 scripts/plot_serve.py docs/serve_h200.csv docs/serve_h200.png "title"   (needs matplotlib)
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, dst, title = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""
rows = list(csv.DictReader(open(src)))
rates = list(dict.fromkeys(r["rate"] for r in rows))
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
for ax, key, label in zip(axes, ("req_s", "ttft_p99_ms", "tpot_p50_ms"),
                          ("request throughput (req/s)", "TTFT p99 (ms)", "TPOT p50 (ms)")):
    for engine in dict.fromkeys(r["engine"] for r in rows):
        pts = {r["rate"]: float(r[key]) for r in rows if r["engine"] == engine}
        ax.plot(range(len(rates)), [pts.get(x) for x in rates], marker="o", label=engine)
    ax.set_xticks(range(len(rates)), rates)
    ax.set_xlabel("request rate (req/s)")
    ax.set_title(label)
    if key != "req_s":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
axes[0].legend()
fig.suptitle(title)
fig.tight_layout()
fig.savefig(dst, dpi=110)
