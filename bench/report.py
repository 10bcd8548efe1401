#!/usr/bin/env python3
"""Turn Google Benchmark JSON from bench_lora_layer into a Markdown table with ratios to the frozen layer.

Usage: build/bench/bench_lora_layer --benchmark_format=json --benchmark_repetitions=5 \
           --benchmark_report_aggregates_only=true > bench.json
       python3 bench/report.py bench.json [baseline.json]
Benchmark names are <shape>/<fwd|fwd_bwd>/<variant>; each variant's time is divided by the frozen
variant's time at the same shape and pass. Where present: `two_active` against the frozen layer plus both
adapters' own costs (lora + tied_abuv - frozen; at most 1 meets the target), and `mixed_rows` against
`lora` on every row. With a baseline JSON (the same benchmark built from another commit, run in the same
session), a second table gives each variant's time over the baseline's.
"""
import json
import sys
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    # With --benchmark_repetitions the medians are used; otherwise the single runs.
    has_aggregates = any(b.get("run_type") == "aggregate" for b in data["benchmarks"])
    times = defaultdict(dict)
    for bench in data["benchmarks"]:
        if has_aggregates and bench.get("aggregate_name") != "median":
            continue
        shape, passes, variant = bench["run_name"].split("/")[:3]
        times[(shape, passes)][variant] = bench["real_time"]  # milliseconds
    return data, has_aggregates, times


def main(path, baseline=None):
    data, has_aggregates, times = load(path)
    variants = [v for v in ["frozen", "peft_eager", "lora", "tied_abuv", "two_active", "mixed_rows"]
                if all(v in row for row in times.values())]
    context = data.get("context", {})
    print(f"Machine: {context.get('num_cpus')} CPUs at {context.get('mhz_per_cpu')} MHz, "
          f"date {context.get('date')}" + (", median of repetitions" if has_aggregates else ""))
    print()
    print("| shape | pass | " + " | ".join(f"{v} ms" for v in variants) + " | " +
          " | ".join(f"{v} / frozen" for v in variants[1:]) + " |")
    print("|---|---|" + "---:|" * (2 * len(variants) - 1))
    for (shape, passes), row in times.items():
        base = row["frozen"]
        cells = [f"{row[v]:.3f}" for v in variants] + [f"{row[v] / base:.3f}" for v in variants[1:]]
        print(f"| {shape} | {passes} | " + " | ".join(cells) + " |")
    if "two_active" in variants and "mixed_rows" in variants:
        print()
        print("| shape | pass | two_active / (lora + tied_abuv - frozen) | mixed_rows / lora |")
        print("|---|---|---:|---:|")
        for (shape, passes), row in times.items():
            budget = row["lora"] + row["tied_abuv"] - row["frozen"]
            print(f"| {shape} | {passes} | {row['two_active'] / budget:.3f} | {row['mixed_rows'] / row['lora']:.3f} |")
    if baseline:
        _, _, old = load(baseline)
        common = [v for v in variants if all(v in row for row in old.values())]
        print()
        print(f"Against the baseline ({baseline}): time here / time there")
        print()
        print("| shape | pass | " + " | ".join(common) + " |")
        print("|---|---|" + "---:|" * len(common))
        for key, row in times.items():
            if key in old:
                print(f"| {key[0]} | {key[1]} | " + " | ".join(f"{row[v] / old[key][v]:.3f}" for v in common) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
