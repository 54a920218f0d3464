"""Summarize py-spy's raw (collapsed-stack) output per process: samples, and the functions holding the most
samples, inclusive (anywhere on the stack) and by leaf (where the time is spent).

usage: python3 scripts/pyspy_summary.py PYSPY_RAW.txt [TOP]
"""
import collections
import re
import sys

path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 12
per_proc: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
leaf: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
total: collections.Counter = collections.Counter()
for line in open(path):
    stack, _, count = line.rstrip("\n").rpartition(" ")
    frames = stack.split(";")
    procs = [f for f in frames if f.startswith("process ")]
    name = re.sub(r'^process \d+:"(.{0,60}).*', r"\1", procs[-1]) if procs else "?"
    funcs = [re.sub(r" \(([^:]*/)?([^/]*):\d+\)$", r" (\2)", f) for f in frames if not f.startswith("process ")]
    n = int(count)
    total[name] += n
    for f in set(funcs):
        per_proc[name][f] += n
    if funcs:
        leaf[name][funcs[-1]] += n
for name, n in total.most_common():
    print(f"== {name}: {n} samples")
    print("  inclusive:")
    for f, c in per_proc[name].most_common(top):
        print(f"    {100 * c / n:5.1f}%  {f}")
    print("  leaf:")
    for f, c in leaf[name].most_common(top):
        print(f"    {100 * c / n:5.1f}%  {f}")
