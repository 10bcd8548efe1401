#!/usr/bin/env python3
"""Data-parallel tiedlora_finetune on the real model (SmolLM2-135M-Instruct), 2 CPU processes under mpirun
(OpenMPI, the CPU route of docs/distributed.md) against 1 process with the same global batch:
  - the same per-step losses, gradient norms and validation losses (1e-5 relative), the same final adapter
    (1e-5), the same exact-match predictions, rank 0 alone logging (the world size in the header) and writing;
  - a run stopped after step 2 resumes with another world size (2 -> 1 and 1 -> 2) to the same end;
  - a killed rank ends the run within a bounded time, leaves only finished checkpoints and no adapter, and
    --resume-latest then completes the run;
  - a hung (stopped) rank makes rank 0 stop with the collective's timeout error within that timeout;
  - CPU processes under torchrun, and a global batch smaller than the world, are refused with a hint."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import unittest

import torch
from safetensors.torch import load_file

ARGS = None
COMMON = ["--model", "smollm2", "--steps", "4", "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-3",
          "--warmup-steps", "2", "--eval-every", "2", "--max-new-tokens", "8", "--progress", "off", "--log-every", "1",
          "--seed", "5", "--method", "tied-abuv"]
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           # containers often forbid the cross-memory attach of OpenMPI's shared-memory transport
           OMPI_MCA_btl_vader_single_copy_mechanism="none")


def common(**changes):
    """COMMON with some options' values changed (steps=8: --steps 8)."""
    argv = list(COMMON)
    for name, value in changes.items():
        argv[argv.index("--" + name.replace("_", "-")) + 1] = str(value)
    return argv


def data(split):
    return os.path.join(ARGS.work, "task", f"{split}.jsonl")


def out(name):
    return os.path.join(ARGS.work, name)


def data_args(test=True):
    return ["--train", data("train"), "--validation", data("validation")] + (["--test", data("test")] if test else [])


def one(*argv):
    """One process with the two cores of this machine."""
    return subprocess.run([ARGS.finetune, *argv, "--threads", "2"], capture_output=True, text=True, timeout=600, env=ENV)


def mpi_command(n, *argv):
    return [ARGS.mpirun, "-np", str(n), ARGS.finetune, *argv]


def two(*argv):
    return subprocess.run(mpi_command(2, *argv), capture_output=True, text=True, timeout=600, env=ENV)


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def adapter(folder):
    return load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))


def relative(a, b):
    return abs(a - b) / max(abs(a), 1e-12)


def read(path):
    with open(path) as f:
        return f.read()


class DataParallel(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        shutil.rmtree(ARGS.work, ignore_errors=True)  # every run starts from nothing an earlier build left
        os.makedirs(ARGS.work)
        subprocess.run([sys.executable, ARGS.make_data, "--out", os.path.join(ARGS.work, "task"), "--train", "64",
                        "--validation", "8", "--test", "6"], check=True, capture_output=True)
        cls.one = one(*COMMON, *data_args(), "--eval-before", "--output", out("one"), "--overwrite")
        cls.two = two(*COMMON, *data_args(), "--eval-before", "--output", out("two"), "--overwrite")
        for name, run in (("1 process", cls.one), ("2 processes", cls.two)):
            if run.returncode != 0:
                raise AssertionError(f"{name}: exit {run.returncode}\n{run.stdout}\n{run.stderr}")

    def assert_same_run(self, reference, other, first_step=1):
        """Per-step numbers within 1e-5 relative; the final adapters within 1e-5."""
        ref = {(m["step"], "validation_loss" in m): m for m in metrics(reference)}
        got = {(m["step"], "validation_loss" in m): m for m in metrics(other)}
        self.assertEqual(sorted(k for k in ref if k[0] >= first_step), sorted(k for k in got if k[0] >= first_step))
        worst = 0.0
        for key, m in got.items():
            if key[0] < first_step:
                continue
            for field in ("loss", "grad_norm", "lr", "validation_loss"):
                if field in m:
                    worst = max(worst, relative(ref[key][field], m[field]))
                    self.assertLess(relative(ref[key][field], m[field]), 1e-5, f"step {key[0]} {field}")
            for field in ("tokens", "target_tokens"):
                if field in m:
                    self.assertEqual(ref[key][field], m[field], f"step {key[0]} {field}")
        a, b = adapter(reference), adapter(other)
        self.assertEqual(sorted(a), sorted(b))
        largest = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"{other} against {reference}: per-step numbers within {worst:.2e} relative, adapter within {largest:.2e}")
        self.assertLess(largest, 1e-5)

    def test_two_processes_follow_one_step_for_step(self):
        self.assert_same_run(out("one"), out("two"))
        for name in ("predictions_before.jsonl", "predictions_after.jsonl"):
            self.assertEqual(read(os.path.join(out("one"), name)), read(os.path.join(out("two"), name)), name)
        summary = json.loads(read(os.path.join(out("two"), "summary.json")))
        self.assertEqual((summary["world_size"], summary["backend"]), (2, "mpi"))
        self.assertEqual(summary["after"]["examples"], 6)

    def test_rank_zero_alone_logs(self):
        lines = self.two.stdout.splitlines()
        self.assertRegex(lines[0], r"world 2 \(mpi, 1 thread\(s\) per process\)")
        self.assertRegex(self.one.stdout.splitlines()[0], r"world 1 \(local, 2 thread\(s\)\)")
        for step in range(1, 5):
            self.assertEqual(sum(line.startswith(f"step {step}/4 ") for line in lines), 1, self.two.stdout)
        self.assertEqual(self.two.stderr.strip(), "")

    def test_resume_with_another_world_size(self):
        for name, stop, resume in (("two_then_one", two, one), ("one_then_two", one, two)):
            folder = out(name)
            stopped = stop(*COMMON, *data_args(test=False), "--output", folder, "--overwrite", "--stop-at-step", "2")
            self.assertEqual(stopped.returncode, 130, stopped.stderr)
            resumed = resume(*COMMON, *data_args(test=False), "--output", folder, "--resume-latest")
            self.assertEqual(resumed.returncode, 0, resumed.stdout + resumed.stderr)
            self.assertIn("resumed from", resumed.stdout)
            self.assert_same_run(out("one"), folder)

    def rank_pid(self, folder, rank):
        """The pid of rank `rank` of the mpirun job writing `folder` (found by its environment)."""
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = read(f"/proc/{pid}/cmdline")
                with open(f"/proc/{pid}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
            except OSError:
                continue
            if folder in cmdline and f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
                return int(pid)
        return None

    def start_and_wait_for_step(self, folder, step, *extra):
        shutil.rmtree(folder, ignore_errors=True)  # an earlier run's metrics must not count
        job = subprocess.Popen(mpi_command(2, *common(steps=8), *data_args(test=False),
                                           "--output", folder, "--overwrite", "--checkpoint-every", "1", *extra),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        deadline = time.time() + 300
        while time.time() < deadline and job.poll() is None:
            path = os.path.join(folder, "metrics.jsonl")
            if os.path.exists(path) and any(m.get("step", 0) >= step for m in metrics(folder)):
                return job
            time.sleep(0.05)
        job.kill()
        self.fail(f"the job did not reach step {step}: {job.communicate()}")

    def signal_rank_one_after_step_two(self, folder, timeout, sig):
        """Runs 8 steps on 2 processes, sends `sig` to rank 1 once step 2 is logged, and waits for the job:
        (job, stdout, stderr, seconds from the signal to the job's end). Rank 1 is killed afterwards if it is
        still there (a stopped process)."""
        job = self.start_and_wait_for_step(folder, 2, "--dist-timeout", str(timeout))
        pid = self.rank_pid(folder, 1)
        self.assertIsNotNone(pid, "rank 1 not found")
        os.kill(pid, sig)
        signalled_at = time.time()
        try:
            stdout, stderr = job.communicate(timeout=120)
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        elapsed = time.time() - signalled_at
        print(f"{signal.Signals(sig).name} to rank 1: the job ended {elapsed:.1f} s later, exit {job.returncode}")
        return job, stdout, stderr, elapsed

    def test_killed_rank_ends_the_run_and_resume_continues(self):
        folder = out("killed")
        job, stdout, stderr, elapsed = self.signal_rank_one_after_step_two(folder, 20, signal.SIGKILL)
        self.assertNotEqual(job.returncode, 0)
        self.assertLess(elapsed, 30)
        self.assertRegex(stderr + stdout, r"rank 1 .*(signal 9|Killed)", stderr)
        self.assertFalse(os.path.exists(os.path.join(folder, "adapter")))
        self.assertFalse(os.path.exists(os.path.join(folder, "summary.json")))
        finished = [n for n in os.listdir(os.path.join(folder, "checkpoints")) if ".tmp" not in n]
        self.assertTrue(finished)
        for name in finished:
            self.assertEqual(sorted(os.listdir(os.path.join(folder, "checkpoints", name))),
                             ["state.safetensors", "trainer_state.json"])
        resumed = two(*common(steps=8), *data_args(test=False), "--output", folder,
                      "--checkpoint-every", "1", "--resume-latest")
        self.assertEqual(resumed.returncode, 0, resumed.stdout + resumed.stderr)
        steps = [m["step"] for m in metrics(folder) if "loss" in m]
        self.assertEqual(steps, list(range(1, 9)))
        self.assertTrue(os.path.exists(os.path.join(folder, "adapter", "adapter_model.safetensors")))

    def test_hung_rank_ends_the_run_with_the_timeout_error(self):
        folder = out("hung")
        job, stdout, stderr, elapsed = self.signal_rank_one_after_step_two(folder, 10, signal.SIGSTOP)
        self.assertNotEqual(job.returncode, 0)
        self.assertLess(elapsed, 10 + 20)
        # The collective rank 0 waits in: the step's gradients, or the validation loss if rank 1 stopped there.
        self.assertRegex(stderr, r"tiedlora_finetune rank 0: error: rank 0: the all-reduce of the (gradients of step \d+|"
                                 r"validation loss) did not finish within 10\.0 s")
        self.assertFalse(os.path.exists(os.path.join(folder, "adapter")))

    def test_refusals(self):
        small = two(*common(batch_size=1), *data_args(test=False), "--output", out("small"), "--overwrite")
        self.assertNotEqual(small.returncode, 0)  # mpirun's code after MPI_Abort
        self.assertIn("--batch-size 1 is the global micro-batch, smaller than the 2 processes", small.stderr)
        torchrun = subprocess.run([ARGS.torchrun, "--standalone", "--nproc-per-node", "2", "--no-python", ARGS.finetune,
                                   *COMMON, *data_args(test=False), "--output", out("torchrun"), "--overwrite"],
                                  capture_output=True, text=True, timeout=300, env=ENV)
        self.assertNotEqual(torchrun.returncode, 0)
        self.assertIn("CPU processes reduce with OpenMPI, so launch them with mpirun", torchrun.stderr)


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--finetune", required=True)
    parser.add_argument("--mpirun", required=True)
    parser.add_argument("--torchrun", required=True)
    parser.add_argument("--make-data", required=True)
    parser.add_argument("--work", required=True)
    ARGS, rest = parser.parse_known_args()
    torch.set_num_threads(1)
    unittest.main(argv=[sys.argv[0], "-v", *rest])


if __name__ == "__main__":
    main()
