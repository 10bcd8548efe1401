#!/usr/bin/env python3
"""`tiedlora params` end to end: the paper's counts for a Llama-2-7B-shaped fused QKV (docs/method.md), GPT-2
groups, and clear errors with exit code 1 for bad input."""
import argparse
import json
import os
import subprocess
import sys
import unittest

ARGS = None

LLAMA2_7B = {
    "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000, "rope_theta": 10000.0,
}
GPT2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257}


def write(name, obj):
    path = os.path.join(ARGS.work, name)
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def tiedlora(*argv):
    return subprocess.run([ARGS.tiedlora, *argv], capture_output=True, text=True, timeout=60)


class ParamsCommand(unittest.TestCase):
    def params(self, config, *extra):
        run = tiedlora("params", "--config", config, *extra)
        self.assertEqual(run.returncode, 0, run.stderr)
        return json.loads(run.stdout)

    def test_paper_counts_llama2_7b_fused_qkv(self):
        config = write("llama2_7b.json", LLAMA2_7B)
        expected = {"lora": 4194304, "tied-ab": 131072, "tied-uv": 393472, "tied-abuv": 524544}
        for method, count in expected.items():
            out = self.params(config, "--targets", "qkv_proj", "--method", method, "--rank", "8", "--fused-qkv")
            self.assertEqual(out["trainable_parameters"], count, method)
            self.assertEqual(out["lora_parameters"], 4194304)
            self.assertEqual(len(out["groups"]), 1)
            group = out["groups"][0]
            self.assertEqual((group["layers"], group["in_features"], group["out_features"]), (32, 4096, 12288))
        out = self.params(config, "--targets", "qkv_proj", "--method", "tied-abuv", "--rank", "8", "--fused-qkv")
        self.assertAlmostEqual(out["ratio_to_lora"], 0.12506, places=5)

    def test_gpt2_folder_and_all_linear(self):
        folder = os.path.join(ARGS.work, "gpt2")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(GPT2, f)
        out = self.params(folder, "--targets", "all-linear", "--method", "tied-ab", "--rank", "4")
        names = [g["name"] for g in out["groups"]]
        self.assertEqual(names, ["transformer.h.*.attn.c_attn", "transformer.h.*.attn.c_proj",
                                 "transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj"])
        # tied-ab: one A (r x in) and one B (out x r) per group.
        self.assertEqual(out["trainable_parameters"], 4 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768)))

    def test_errors_are_one_clear_line_and_exit_code_1(self):
        config = write("llama2_7b.json", LLAMA2_7B)
        cases = [
            (["--targets", "q_prj"], "target 'q_prj' matches no module"),
            (["--targets", "q_proj", "--method", "tied-au"], "neither B nor v"),
            (["--targets", "q_proj", "--method", "magic"], "unknown adapter method 'magic'"),
            (["--targets", "q_proj", "--rank", "0"], "--rank must be positive"),
        ]
        for extra, needle in cases:
            run = tiedlora("params", "--config", config, *extra)
            self.assertEqual(run.returncode, 1, (extra, run.stdout, run.stderr))
            self.assertIn(needle, run.stderr)
            self.assertTrue(run.stderr.startswith("tiedlora: error: "), run.stderr)
        run = tiedlora("params", "--config", os.path.join(ARGS.work, "missing.json"), "--targets", "q_proj")
        self.assertEqual(run.returncode, 1)
        self.assertIn("missing.json: cannot open", run.stderr)
        bad = os.path.join(ARGS.work, "truncated.json")
        with open(bad, "w") as f:
            f.write('{"model_type": "llama", "hidden_')
        run = tiedlora("params", "--config", bad, "--targets", "q_proj")
        self.assertEqual(run.returncode, 1)
        self.assertIn("truncated.json: not valid JSON", run.stderr)


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiedlora", required=True)
    parser.add_argument("--work", required=True)
    ARGS, rest = parser.parse_known_args()
    os.makedirs(ARGS.work, exist_ok=True)
    result = unittest.main(argv=[sys.argv[0], "-v", *rest], exit=False).result
    sys.exit(0 if result.wasSuccessful() else 1)


if __name__ == "__main__":
    main()
