"""examples/finetune.cpp end to end: the short example fine-tunes SmolLM2-135M-Instruct for a few steps on the
demo task and writes an adapter that the library's own reader accepts, with the loss falling.

Usage: test_finetune_example.py --example build/examples/finetune_example --model <SmolLM2 GGUF>
       --make-data scripts/make_task_data.py --work <scratch>
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import unittest

ARGS = None


class FinetuneExample(unittest.TestCase):
    def test_trains_and_saves_an_adapter(self):
        self.assertTrue(os.path.isfile(ARGS.model), f"no SmolLM2 GGUF at '{ARGS.model}' (scripts/bootstrap installs it)")
        task = os.path.join(ARGS.work, "task")
        subprocess.run([sys.executable, ARGS.make_data, "--out", task, "--train", "48", "--validation", "4",
                        "--test", "8"], check=True)
        out = os.path.join(ARGS.work, "run")
        shutil.rmtree(out, ignore_errors=True)  # a fresh run folder: what an earlier build left is not this run's
        run = subprocess.run([ARGS.example, ARGS.model, os.path.join(task, "train.jsonl"),
                              os.path.join(task, "test.jsonl"), out, "6"], capture_output=True, text=True, timeout=540)
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        self.assertRegex(run.stdout, r"exact match before training: \d+\.\d%")
        self.assertRegex(run.stdout, r"exact match after training: \d+\.\d%")
        self.assertIn("trained 6 steps", run.stdout)
        with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
            config = json.load(f)
        self.assertEqual(config["peft_type"], "TIEDLORA")
        self.assertTrue(os.path.getsize(os.path.join(out, "adapter", "adapter_model.safetensors")) > 0)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
        self.assertEqual(len(losses), 6)
        self.assertTrue(all(0 < loss < 100 for loss in losses), losses)
        # The adapter trained: v starts at zero (the zero of tied-abuv's delta) and moved on every layer.
        from safetensors.numpy import load_file
        tensors = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
        v = {name: t for name, t in tensors.items() if name.endswith(".lora_v")}
        self.assertEqual(len(v), 3 * 30, sorted(tensors)[:6])  # q, k, v projections of SmolLM2's 30 layers
        self.assertTrue(all(abs(t).max() > 0 for t in v.values()), "a layer's v stayed at zero")
        # Bad arguments get a usage line, not a crash.
        usage = subprocess.run([ARGS.example], capture_output=True, text=True)
        self.assertEqual(usage.returncode, 2)
        self.assertIn("usage:", usage.stderr)


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--example", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--make-data", required=True)
    parser.add_argument("--work", required=True)
    ARGS, rest = parser.parse_known_args()
    os.makedirs(ARGS.work, exist_ok=True)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
