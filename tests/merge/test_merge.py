#!/usr/bin/env python3
"""`tiedlora merge-weights`, `export-lora` and `inspect` against PEFT and transformers.

Reads the reference folders of tests/reference/make_adapter_reference.py and the adapters tests/test_adapter.cpp
saved (cpp_llama_lora, cpp_llama_tied), runs the tool, and checks:
- merged weights equal PEFT's merge_and_unload: fp32 within 1e-6 relative; bf16 within one ulp, and at least as
  close to the float64 truth as PEFT's;
- transformers loading our merged checkpoint gives the logits of PEFT running the unmerged adapter;
- PEFT loads our LoRA and our exported Tied-LoRA adapters;
- streaming output details: shards and index, copied non-weight files, atomicity, --force, errors.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import unittest

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ARGS = None


def ref(name):
    return os.path.join(ARGS.reference, "adapters", name)


def work(name):
    path = os.path.join(ARGS.work, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


def tiedlora(*argv, check=True):
    run = subprocess.run([ARGS.tiedlora, *argv], capture_output=True, text=True, timeout=300)
    if check and run.returncode != 0:
        raise AssertionError(f"tiedlora {' '.join(argv)} failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    return run


def tensors_of(folder):
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(load_file(f))
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


def float64_truth(base_folder, adapter_folder):
    """W + dW for every adapted weight, in float64, from the stored (rounded) base weights and adapter."""
    config = json.load(open(os.path.join(adapter_folder, "adapter_config.json")))
    adapter = load_file(os.path.join(adapter_folder, "adapter_model.safetensors"))
    base = tensors_of(base_folder)
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / r ** 0.5 if config.get("use_rslora") else alpha / r
    truth = {}
    for name, a in adapter.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name[len("base_model.model."):-len(".lora_A.weight")]
        b = adapter[name.replace("lora_A", "lora_B")]
        delta = scale * b.double() @ a.double()
        w = base[module + ".weight"].double()
        truth[module + ".weight"] = w + (delta.T if config.get("fan_in_fan_out") else delta)
    return truth


class MergeAgainstPeft(unittest.TestCase):
    def assert_fp32_close(self, ours, peft):
        self.assertEqual(set(ours), set(peft))
        for name in peft:
            self.assertEqual(ours[name].dtype, peft[name].dtype, name)
            scale = peft[name].double().abs().max().item() or 1.0
            err = (ours[name].double() - peft[name].double()).abs().max().item()
            self.assertLessEqual(err, 1e-6 * scale, name)

    def test_fp32_lora_gpt2_conv1d_llama_sharded_patterns_and_vera(self):
        cases = [("gpt2_base", "gpt2_lora"), ("llama_base", "llama_lora"),
                 ("llama_base", "llama_lora_rank_pattern"), ("llama_base", "llama_vera")]
        for base, adapter in cases:
            with self.subTest(adapter=adapter):
                out = work(adapter + "_merged")
                tiedlora("merge-weights", "--base", ref(base), "--adapter", ref(adapter), "--out", out, "--quiet")
                self.assert_fp32_close(tensors_of(out), tensors_of(ref(adapter + "_peft_merged")))

    def test_bf16_within_one_ulp_and_no_further_from_float64_than_peft(self):
        out = work("llama_lora_bf16_merged")
        tiedlora("merge-weights", "--base", ref("llama_base_bf16"), "--adapter", ref("llama_lora"), "--out", out)
        ours, peft = tensors_of(out), tensors_of(ref("llama_lora_bf16_peft_merged"))
        truth = float64_truth(ref("llama_base_bf16"), ref("llama_lora"))
        self.assertEqual(set(ours), set(peft))
        for name, t in truth.items():
            o, p = ours[name], peft[name]
            self.assertEqual(o.dtype, torch.bfloat16)
            # one ulp of bf16 at each element's magnitude
            ulp = torch.ldexp(torch.ones_like(p.double()), torch.frexp(p.double()).exponent - 8)
            self.assertTrue(bool(((o.double() - p.double()).abs() <= ulp).all()), name)
            ours_err = (o.double() - t).abs()
            peft_err = (p.double() - t).abs()
            self.assertLessEqual(ours_err.max().item(), peft_err.max().item() + 1e-12, name)
            self.assertLessEqual(ours_err.mean().item(), peft_err.mean().item() + 1e-12, name)

    def test_dtype_conversion_rounds_the_fp32_merge_once(self):
        out = work("llama_lora_to_bf16")
        tiedlora("merge-weights", "--base", ref("llama_base"), "--adapter", ref("llama_lora"), "--out", out,
                 "--dtype", "bf16", "--quiet")
        ours, fp32 = tensors_of(out), tensors_of(ref("llama_lora_peft_merged"))
        for name, t in fp32.items():
            self.assertEqual(ours[name].dtype, torch.bfloat16)
            self.assertTrue(torch.equal(ours[name], t.to(torch.bfloat16)) or
                            (ours[name].float() - t).abs().max().item() <= 2 ** -8 * t.abs().max().item(), name)

    def test_transformers_on_our_merge_equals_peft_on_the_adapter(self):
        ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(5))
        for base, adapter in [("gpt2_base", "gpt2_lora"), ("llama_base", "llama_lora"), ("llama_base", "llama_vera")]:
            with self.subTest(adapter=adapter):
                out = work(adapter + "_merged_for_logits")
                tiedlora("merge-weights", "--base", ref(base), "--adapter", ref(adapter), "--out", out, "--quiet")
                merged = AutoModelForCausalLM.from_pretrained(out).eval()
                peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ref(base)), ref(adapter)).eval()
                expected = logits(peft, ids)
                self.assertLessEqual((logits(merged, ids) - expected).abs().max().item(), 1e-5 * expected.abs().max().item())


class OurAdaptersInPeft(unittest.TestCase):
    """Adapters written by tiedlora (tests/test_adapter.cpp) loaded by PEFT."""

    def check_peft_equals_our_merge(self, adapter_folder, merge_adapter_folder, base="llama_base"):
        out = work(os.path.basename(merge_adapter_folder) + "_merged")
        tiedlora("merge-weights", "--base", ref(base), "--adapter", merge_adapter_folder, "--out", out, "--quiet")
        ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(6))
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ref(base)), adapter_folder).eval()
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        expected = logits(peft, ids)
        self.assertLessEqual((logits(merged, ids) - expected).abs().max().item(), 1e-5 * expected.abs().max().item())
        peft_merged = {k: v for k, v in peft.merge_and_unload().state_dict().items()}
        ours = tensors_of(out)
        for name, t in ours.items():
            scale = t.abs().max().item() or 1.0
            self.assertLessEqual((t - peft_merged[name]).abs().max().item(), 1e-6 * scale, name)

    def test_peft_loads_our_lora(self):
        self.check_peft_equals_our_merge(ref("cpp_llama_lora"), ref("cpp_llama_lora"))

    def test_peft_loads_our_exported_tied_lora_and_it_equals_merging_the_tied_adapter(self):
        exported = work("tied_exported_by_cli")
        tiedlora("export-lora", "--adapter", ref("cpp_llama_tied"), "--out", exported)
        config = json.load(open(os.path.join(exported, "adapter_config.json")))
        self.assertEqual(config["peft_type"], "LORA")
        self.assertEqual(config["lora_alpha"], config["r"])
        # PEFT runs the exported LoRA; our merge uses the tied adapter directly.
        self.check_peft_equals_our_merge(exported, ref("cpp_llama_tied"))

    def test_gpt2_conv1d_tied_adapter_exports_with_fan_in_fan_out(self):
        exported = work("gpt2_tied_exported_by_cli")
        tiedlora("export-lora", "--adapter", ref("cpp_gpt2_tied"), "--out", exported)
        self.assertTrue(json.load(open(os.path.join(exported, "adapter_config.json")))["fan_in_fan_out"])
        self.check_peft_equals_our_merge(exported, ref("cpp_gpt2_tied"), base="gpt2_base")


class MergeBehaviour(unittest.TestCase):
    def test_sharded_output_with_index_and_copied_files(self):
        out = work("sharded")
        tiedlora("merge-weights", "--base", ref("llama_base"), "--adapter", ref("llama_lora"), "--out", out,
                 "--max-shard-size", "30KB", "--quiet")
        index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
        shards = sorted(set(index["weight_map"].values()))
        self.assertGreater(len(shards), 1)
        self.assertEqual(sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "model-*.safetensors"))), shards)
        total = sum(t.numel() * t.element_size() for t in tensors_of(out).values())
        self.assertEqual(index["metadata"]["total_size"], total)
        for name in ["config.json", "generation_config.json"]:
            self.assertEqual(open(os.path.join(out, name), "rb").read(), open(ref("llama_base/" + name), "rb").read())
        # transformers reads the sharded output
        AutoModelForCausalLM.from_pretrained(out)

    def test_existing_output_needs_force_and_nothing_is_left_behind(self):
        out = work("force")
        tiedlora("merge-weights", "--base", ref("gpt2_base"), "--adapter", ref("gpt2_lora"), "--out", out, "--quiet")
        run = tiedlora("merge-weights", "--base", ref("gpt2_base"), "--adapter", ref("gpt2_lora"), "--out", out, check=False)
        self.assertEqual(run.returncode, 1)
        self.assertIn("already exists", run.stderr)
        self.assertIn("--force", run.stderr)
        tiedlora("merge-weights", "--base", ref("gpt2_base"), "--adapter", ref("gpt2_lora"), "--out", out, "--force", "--quiet")
        leftovers = [p for p in os.listdir(ARGS.work) if ".tmp-" in p or ".old" in p]
        self.assertEqual(leftovers, [])

    def test_nan_in_the_adapter_writes_nothing(self):
        bad = work("nan_adapter")
        shutil.copytree(ref("llama_lora"), bad)
        tensors = load_file(os.path.join(bad, "adapter_model.safetensors"))
        key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
        tensors[key][0, 0] = float("nan")
        from safetensors.torch import save_file
        save_file(tensors, os.path.join(bad, "adapter_model.safetensors"))
        out = work("nan_merged")
        run = tiedlora("merge-weights", "--base", ref("llama_base"), "--adapter", bad, "--out", out, check=False)
        self.assertEqual(run.returncode, 1)
        self.assertIn("model.layers.1.mlp.down_proj", run.stderr)
        self.assertIn("NaN", run.stderr)
        self.assertFalse(os.path.exists(out))
        self.assertEqual([p for p in os.listdir(ARGS.work) if ".tmp-" in p], [])

    def test_wrong_base_model_is_refused_before_writing(self):
        out = work("wrong_base")
        run = tiedlora("merge-weights", "--base", ref("llama_base"), "--adapter", ref("gpt2_lora"), "--out", out, check=False)
        self.assertEqual(run.returncode, 1)
        self.assertIn("does not exist in the base checkpoint", run.stderr)
        self.assertIn("maybe wrong base model", run.stderr)
        self.assertFalse(os.path.exists(out))

    def test_inspect_lists_tensors_and_adapter_config(self):
        out = json.loads(tiedlora("inspect", ref("llama_lora")).stdout)
        self.assertEqual(out["adapter_config"]["peft_type"], "LORA")
        self.assertEqual(out["adapter_layers"], 6)
        names = {t["name"] for f in out["files"] for t in f["tensors"]}
        self.assertIn("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", names)
        out = json.loads(tiedlora("inspect", ref("llama_base")).stdout)
        self.assertEqual(len(out["files"]), 3)
        run = tiedlora("inspect", os.path.join(ARGS.work, "missing"), check=False)
        self.assertEqual(run.returncode, 1)


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiedlora", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--work", required=True)
    ARGS, rest = parser.parse_known_args()
    os.makedirs(ARGS.work, exist_ok=True)
    torch.manual_seed(0)
    result = unittest.main(argv=[sys.argv[0], "-v", *rest], exit=False).result
    sys.exit(0 if result.wasSuccessful() else 1)


if __name__ == "__main__":
    main()
