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
    if os.path.islink(path):
        os.unlink(path)
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
                 ("llama_base", "llama_lora_rank_pattern"), ("llama_base", "llama_lora_python_patterns"),
                 ("llama_base", "llama_vera")]
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


def copy_of(name, label):
    path = work(label)
    shutil.copytree(ref(name), path)
    return path


def tree_digest(path):
    """File names and contents below `path`, to show an input was not touched."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


def dead_pid():
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def save_adapter_tensors(folder, tensors):
    from safetensors.torch import save_file
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))


class OutputsAndInputs(unittest.TestCase):
    """--force never destroys an input; outputs follow the umask; killed runs leave nothing for good."""

    def test_out_that_is_contains_or_lies_inside_an_input_is_refused_before_anything_is_touched(self):
        base = copy_of("llama_base", "guard_base")
        adapter = copy_of("llama_lora", "guard_adapter")
        holder = work("guard_holder")
        os.makedirs(holder)
        shutil.copytree(ref("llama_lora"), os.path.join(holder, "adapter"))
        before = {p: tree_digest(p) for p in (base, adapter, holder)}
        cases = [
            (["merge-weights", "--base", base, "--adapter", adapter, "--out", base, "--force"], " is the base model"),
            (["merge-weights", "--base", base, "--adapter", adapter, "--out", adapter + "/", "--force"], " is the adapter folder"),
            (["merge-weights", "--base", base, "--adapter", os.path.join(holder, "adapter"), "--out", holder, "--force"],
             "contains the adapter folder"),
            (["merge-weights", "--base", base, "--adapter", adapter, "--out", os.path.join(base, "merged"), "--force"],
             "lies inside the base model"),
            (["merge-weights", "--base", os.path.join(base, "..", os.path.basename(base)), "--adapter", adapter, "--out",
              base + "/./", "--force"], " is the base model"),
            (["export-lora", "--adapter", adapter, "--out", adapter, "--force"], " is the adapter folder"),
            (["export-lora", "--adapter", os.path.join(holder, "adapter"), "--out", holder, "--force"], "contains the adapter folder"),
        ]
        for argv, expected in cases:
            with self.subTest(argv=" ".join(argv[:1] + argv[-3:])):
                run = tiedlora(*argv, check=False)
                self.assertEqual(run.returncode, 1, run.stdout + run.stderr)
                self.assertIn(expected, run.stderr)
                self.assertIn("hint", run.stderr)
                for path, digest in before.items():
                    self.assertEqual(tree_digest(path), digest, f"{path} was changed")
        # A symbolic link to an input is the input.
        link = work("guard_link")
        os.symlink(base, link)
        run = tiedlora("merge-weights", "--base", base, "--adapter", adapter, "--out", link, "--force", check=False)
        self.assertEqual(run.returncode, 1)
        self.assertIn("is the base model", run.stderr)
        self.assertEqual(tree_digest(base), before[base])

    def test_output_folders_follow_the_umask(self):
        for umask, folder_mode in [(0o022, 0o755), (0o027, 0o750), (0o002, 0o775)]:
            with self.subTest(umask=oct(umask)):
                out = work(f"umask_{umask:o}")
                exported = work(f"umask_export_{umask:o}")
                for argv in (["merge-weights", "--base", ref("llama_base"), "--adapter", ref("llama_lora"), "--out", out,
                              "--quiet"], ["export-lora", "--adapter", ref("cpp_llama_tied"), "--out", exported]):
                    run = subprocess.run([ARGS.tiedlora, *argv], capture_output=True, text=True, timeout=300,
                                         preexec_fn=lambda: os.umask(umask))
                    self.assertEqual(run.returncode, 0, run.stderr)
                for folder in (out, exported):
                    self.assertEqual(os.stat(folder).st_mode & 0o777, folder_mode, folder)
                    for name in os.listdir(folder):
                        # Written files get a plain creation's mode; copies of the base's files no more than it.
                        source = os.path.join(ref("llama_base"), name)
                        copied = folder == out and os.path.exists(source) and not name.endswith(
                            (".safetensors", ".index.json"))
                        limit = os.stat(source).st_mode & 0o666 if copied else 0o666
                        self.assertEqual(os.stat(os.path.join(folder, name)).st_mode & 0o777, limit & ~umask, name)

    def test_links_leading_outside_the_base_are_not_followed_and_copies_never_widen_access(self):
        def base_copy(folder):
            os.makedirs(folder)
            for name in os.listdir(ref("llama_base")):
                shutil.copy(os.path.join(ref("llama_base"), name), os.path.join(folder, name))
            with open(os.path.join(folder, "private.json"), "w") as f:
                f.write('{"private": true}')
            os.chmod(os.path.join(folder, "private.json"), 0o600)
            os.symlink("config.json", os.path.join(folder, "linked_config.json"))  # inside: followed
            os.symlink(secret, os.path.join(folder, "tokenizer_extra.json"))  # outside: skipped

        root = work("links")
        os.makedirs(root)
        secret = os.path.join(root, "secret.key")
        with open(secret, "w") as f:
            f.write("do not copy")
        os.chmod(secret, 0o600)
        plain = os.path.join(root, "base")
        base_copy(plain)
        # A Hugging Face cache snapshot: its files are links to ../../blobs, inside the model's cache folder.
        repository = os.path.join(root, "hub", "models--org--tiny")
        snapshot = os.path.join(repository, "snapshots", "0123abc")
        base_copy(snapshot)
        os.makedirs(os.path.join(repository, "blobs"))
        os.replace(os.path.join(snapshot, "generation_config.json"), os.path.join(repository, "blobs", "f00d"))
        os.symlink("../../blobs/f00d", os.path.join(snapshot, "generation_config.json"))
        for base in (plain, snapshot):
            out = os.path.join(root, "out_" + os.path.basename(base))
            run = subprocess.run([ARGS.tiedlora, "merge-weights", "--base", base, "--adapter", ref("llama_lora"),
                                  "--out", out, "--quiet"], capture_output=True, text=True, timeout=300,
                                 preexec_fn=lambda: os.umask(0o002))
            self.assertEqual(run.returncode, 0, run.stderr)
            self.assertFalse(os.path.lexists(os.path.join(out, "tokenizer_extra.json")), base)
            self.assertIn("not copied: tokenizer_extra.json: a link to " + os.path.realpath(secret), run.stderr)
            self.assertEqual(os.stat(os.path.join(out, "private.json")).st_mode & 0o777, 0o600, base)
            self.assertEqual(os.stat(os.path.join(out, "config.json")).st_mode & 0o777, 0o664 & os.stat(
                os.path.join(ref("llama_base"), "config.json")).st_mode, base)
            for name in ("linked_config.json", "generation_config.json"):
                path = os.path.join(out, name)
                self.assertFalse(os.path.islink(path), name)
                self.assertEqual(open(path, "rb").read(), open(os.path.join(ref("llama_base"), name.replace(
                    "linked_", "")), "rb").read(), name)
            self.assertFalse(any("do not copy" in open(os.path.join(out, n), errors="replace").read()
                                 for n in os.listdir(out) if n.endswith(".json")))

    def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(self):
        import socket
        host = socket.gethostname().replace("/", "_").replace("-", "_")
        out = work("stale_out")
        dead = f"{out}.tmp-{host}-{dead_pid()}-42"
        live = f"{out}.tmp-{host}-{os.getpid()}-43"
        other_host = f"{out}.tmp-otherhost-{dead_pid()}-44"
        for folder in (dead, live, other_host):
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            with open(os.path.join(folder, "model.safetensors"), "wb") as f:
                f.write(b"\0" * 4096)
        run = tiedlora("merge-weights", "--base", ref("llama_base"), "--adapter", ref("llama_lora"), "--out", out, "--quiet")
        self.assertFalse(os.path.exists(dead))
        self.assertIn(f"removed {dead}", run.stderr)
        self.assertTrue(os.path.exists(live), "a temporary folder of a running process was removed")
        self.assertTrue(os.path.exists(other_host), "a folder of another host's process was removed")
        shutil.rmtree(live)
        shutil.rmtree(other_host)
        # Killed between moving the old output aside and moving the new one in: the old output comes back.
        aside = f"{out}.tmp-{host}-{dead_pid()}-old-45"
        os.rename(out, aside)
        run = tiedlora("merge-weights", "--base", ref("llama_base"), "--adapter", ref("llama_lora"), "--out", out,
                       "--quiet", check=False)
        self.assertEqual(run.returncode, 1)
        self.assertIn(f"restored {out}", run.stderr)
        self.assertIn("already exists", run.stderr)
        self.assertTrue(os.path.exists(os.path.join(out, "config.json")))
        self.assertFalse(os.path.exists(aside))

    def test_sighup_and_sigterm_remove_the_temporary_folder(self):
        import signal
        import time
        base, adapter = large_checkpoint()
        for sig in (signal.SIGHUP, signal.SIGTERM):
            with self.subTest(signal=sig.name):
                out = work(f"killed_{sig.name}")
                child = subprocess.Popen([ARGS.tiedlora, "merge-weights", "--base", base, "--adapter", adapter, "--out",
                                          out, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                deadline = time.time() + 120
                while not glob.glob(out + ".tmp-*") and child.poll() is None and time.time() < deadline:
                    time.sleep(0.01)
                self.assertIsNone(child.poll(), "the merge ended before its temporary folder was seen")
                child.send_signal(sig)
                _, err = child.communicate(timeout=120)
                self.assertEqual(child.returncode, 1, err)
                self.assertIn("interrupted by signal", err)
                self.assertFalse(os.path.exists(out))
                self.assertEqual(glob.glob(out + ".tmp-*"), [])


LARGE = {}


def large_checkpoint():
    """A generated 24 x (4096 x 1792) fp32 checkpoint (705 MB) and a rank-16 LoRA on every tensor."""
    if LARGE:
        return LARGE["base"], LARGE["adapter"]
    from safetensors.torch import save_file
    base, adapter = work("large_base"), work("large_adapter")
    os.makedirs(base)
    os.makedirs(adapter)
    g = torch.Generator().manual_seed(1)
    save_file({f"model.layers.{i}.proj.weight": torch.randn(4096, 1792, generator=g) for i in range(24)},
              os.path.join(base, "model.safetensors"), metadata={"format": "pt"})
    json.dump({"model_type": "llama"}, open(os.path.join(base, "config.json"), "w"))
    tensors = {}
    for i in range(24):
        p = f"base_model.model.model.layers.{i}.proj"
        tensors[p + ".lora_A.weight"] = torch.randn(16, 1792, generator=g) * 0.02
        tensors[p + ".lora_B.weight"] = torch.randn(4096, 16, generator=g) * 0.02
    save_adapter_tensors(adapter, tensors)
    json.dump({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["proj"]},
              open(os.path.join(adapter, "adapter_config.json"), "w"))
    LARGE.update(base=base, adapter=adapter)
    return base, adapter


def peak_rss_mb(argv):
    """The tool's peak RSS (wait4), measured by bench/peak_rss.cpp: a child forked from this Python
    process would count this process's memory from before its exec."""
    run = subprocess.run([ARGS.peak_rss, ARGS.tiedlora, *argv], capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise AssertionError(f"tiedlora {' '.join(argv)} failed: {run.stderr}")
    return int(run.stdout.strip().splitlines()[-1]) / 1024.0


class MergeMemory(unittest.TestCase):
    def test_peak_rss_stays_a_few_times_the_largest_tensor(self):
        base, adapter = large_checkpoint()
        largest_mb = 4096 * 1792 * 4 / 2 ** 20
        idle = peak_rss_mb(["inspect", "--header-only", adapter])
        out = work("large_merged")
        peak = peak_rss_mb(["merge-weights", "--base", base, "--adapter", adapter, "--out", out, "--quiet"])
        self.assertGreater(idle, 50, "the idle tool's RSS looks wrong (LibTorch alone is larger)")
        shutil.rmtree(out)
        ratio = (peak - idle) / largest_mb
        print(f"merge peak RSS {peak:.0f} MB, idle tool {idle:.0f} MB, (peak - idle) / largest tensor = {ratio:.1f}")
        self.assertLessEqual(ratio, 4.0, f"the merge holds {ratio:.1f}x the largest tensor above the idle tool")


class AdapterChecks(unittest.TestCase):
    """target_modules against the tensors both ways, one non-finite policy, messages naming the way out."""

    def test_target_modules_must_select_the_adapter_layers_and_only_them(self):
        adapter = copy_of("llama_lora", "targets_other")
        config = json.load(open(os.path.join(adapter, "adapter_config.json")))
        config["target_modules"] = ["x_proj"]
        json.dump(config, open(os.path.join(adapter, "adapter_config.json"), "w"))
        out = work("targets_other_merged")
        run = tiedlora("merge-weights", "--base", ref("llama_base"), "--adapter", adapter, "--out", out, check=False)
        self.assertEqual(run.returncode, 1)
        self.assertIn("target_modules ['x_proj'] does not select layer", run.stderr)
        self.assertFalse(os.path.exists(out))
        # The other way: target_modules selects a base layer the adapter has no weights for.
        adapter = copy_of("llama_lora", "targets_missing_layer")
        tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
        for suffix in ("lora_A.weight", "lora_B.weight"):
            del tensors[f"base_model.model.model.layers.1.self_attn.v_proj.{suffix}"]
        save_adapter_tensors(adapter, tensors)
        run = tiedlora("merge-weights", "--base", ref("llama_base"), "--adapter", adapter, "--out", out, check=False)
        self.assertEqual(run.returncode, 1)
        self.assertIn("selects the base layer 'model.layers.1.self_attn.v_proj' but the adapter holds no weights",
                      run.stderr)
        self.assertFalse(os.path.exists(out))

    def test_non_finite_adapters_are_refused_by_every_command_and_counted_by_inspect(self):
        adapter = copy_of("cpp_llama_tied", "nan_tied")
        tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
        name = sorted(n for n in tensors if n.endswith(".lora_v"))[0]
        tensors[name][0] = float("nan")
        tensors[name][1] = float("inf")
        save_adapter_tensors(adapter, tensors)
        exported = work("nan_tied_exported")
        run = tiedlora("export-lora", "--adapter", adapter, "--out", exported, check=False)
        self.assertEqual(run.returncode, 1)
        self.assertIn(f"tensor '{name}' holds 2 NaN or Inf", run.stderr)
        self.assertFalse(os.path.exists(exported))
        run = tiedlora("inspect", adapter)
        report = json.loads(run.stdout)
        self.assertEqual(report["non_finite"], 2)
        counts = {t["name"]: t["non_finite"] for f in report["files"] for t in f["tensors"]}
        self.assertEqual(counts[name], 2)
        self.assertEqual(sum(counts.values()), 2)
        self.assertIn("NaN or Inf", run.stderr)
        self.assertNotIn("non_finite", json.loads(tiedlora("inspect", "--header-only", adapter).stdout))

    def test_export_into_an_existing_folder_names_force(self):
        out = work("export_exists")
        tiedlora("export-lora", "--adapter", ref("cpp_llama_tied"), "--out", out)
        run = tiedlora("export-lora", "--adapter", ref("cpp_llama_tied"), "--out", out, check=False)
        self.assertEqual(run.returncode, 1)
        self.assertIn("already exists", run.stderr)
        self.assertIn("--force", run.stderr)
        tiedlora("export-lora", "--adapter", ref("cpp_llama_tied"), "--out", out, "--force")


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiedlora", required=True)
    parser.add_argument("--peak-rss", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--work", required=True)
    ARGS, rest = parser.parse_known_args()
    os.makedirs(ARGS.work, exist_ok=True)
    torch.manual_seed(0)
    result = unittest.main(argv=[sys.argv[0], "-v", *rest], exit=False).result
    sys.exit(0 if result.wasSuccessful() else 1)


if __name__ == "__main__":
    main()
