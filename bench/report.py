#!/usr/bin/env python3
"""Turn Google Benchmark JSON from bench_lora_layer into a Markdown table with ratios to the frozen layer.

Usage: build/bench/bench_lora_layer --benchmark_format=json --benchmark_repetitions=5 \
           --benchmark_report_aggregates_only=true > bench.json
       python3 bench/report.py bench.json
Benchmark names are <shape>/<fwd|fwd_bwd>/<variant>; each variant's time is divided by the frozen
variant's time at the same shape and pass.
"""
import json
import sys
from collections import defaultdict


def main(path):
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
    variants = ["frozen", "peft_eager", "lora", "tied_abuv"]
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


if __name__ == "__main__":
    main(sys.argv[1])
