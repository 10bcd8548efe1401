#!/usr/bin/env python3
"""Data-parallel fine-tuning on the CPU: the same tiedlora_finetune run (SmolLM2-135M-Instruct, the demo task
of scripts/make_task_data.py, the same global batch and steps) as N processes x 1 thread under mpirun against 1
process x N threads, alternated over --repeats rounds on the same machine. Reports each configuration's
training throughput (real, non-padding tokens per second of training steps, from summary.json), its ratio to the
1-process run, and whether both ended with the same losses (they must: same global batch).

Usage: <venv>/bin/python bench/bench_data_parallel.py --finetune build/tools/tiedlora_finetune \
           --work build/bench_data_parallel [--processes 2] [--steps 12] [--batch-size 8] [--repeats 2]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMPI_MCA_btl_vader_single_copy_mechanism="none")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetune", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--mpirun", default="mpirun")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--method", default="tied-abuv")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    task = os.path.join(args.work, "task")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_task_data.py"), "--out", task], check=True,
                   capture_output=True)
    common = ["--model", "smollm2", "--train", os.path.join(task, "train.jsonl"), "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--method", args.method, "--lr", "1e-3", "--progress", "off",
              "--overwrite"]
    n = args.processes
    configs = {
        f"1 process x {n} threads": lambda out: [args.finetune, *common, "--threads", str(n), "--output", out],
        f"{n} processes x 1 thread (mpi)": lambda out: [args.mpirun, "-np", str(n), args.finetune, *common, "--threads", "1",
                                                        "--output", out],
    }
    speeds = {name: [] for name in configs}
    losses = {}
    for round_ in range(args.repeats):
        for i, (name, command) in enumerate(configs.items()):
            out = os.path.join(args.work, f"run{i}")
            subprocess.run(command(out), check=True, capture_output=True, text=True, env=ENV)
            with open(os.path.join(out, "summary.json")) as f:
                speeds[name].append(json.load(f)["tokens_per_second"])
            with open(os.path.join(out, "metrics.jsonl")) as f:
                losses[name] = [json.loads(line)["loss"] for line in f if '"loss"' in line]
            print(f"round {round_ + 1}: {name}: {speeds[name][-1]:.1f} real tokens/s", file=sys.stderr)
    base = statistics.median(next(iter(speeds.values())))
    reference = next(iter(losses.values()))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.method}, global batch "
          f"{args.batch_size}, {args.steps} steps, {args.repeats} rounds (median)\n")
    print("| configuration | real tokens/s | ratio | runs | largest loss difference (relative) |")
    print("|---|---:|---:|---|---:|")
    for name, values in speeds.items():
        worst = max(abs(a - b) / abs(a) for a, b in zip(reference, losses[name]))
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / base:.2f}x | "
              f"{', '.join(f'{v:.1f}' for v in values)} | {worst:.1e} |")


if __name__ == "__main__":
    main()
