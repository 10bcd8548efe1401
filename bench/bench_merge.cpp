// bench_merge.cpp: `tiedlora merge-weights` on a checkpoint of more than 1 GB made here: wall time, MB/s,
// and peak resident memory of the merging process against the largest tensor's size (the streaming merge
// should need a few times the largest tensor, not the model).
//
// Run: build/bench/bench_merge [scratch folder, default /tmp/tiedlora_bench_merge] [GB, default 1.2]
// It writes a base checkpoint (two shards) and a rank-16 LoRA adapter on every projection, runs the
// tool under peak_rss (wait4 of a small parent gives its peak RSS), and prints a Markdown table. A run of
// `tiedlora inspect --header-only` on the adapter gives the baseline RSS of the tool with LibTorch loaded.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "tiedlora/formats/adapter.h"
#include "tiedlora/formats/files.h"
#include "tiedlora/formats/safetensors.h"

namespace {

struct ChildResult {
  int status = -1;
  double seconds = 0;
  double peak_rss_mb = 0;
};

// Runs `argv` under peak_rss (bench/peak_rss.cpp): a child forked from this process would count this
// process's own memory (LibTorch, the generated checkpoint) as its peak, from before its exec.
ChildResult run_child(const std::vector<std::string>& argv, const std::string& output) {
  std::vector<std::string> command = {TIEDLORA_PEAK_RSS_PATH};
  command.insert(command.end(), argv.begin(), argv.end());
  std::vector<char*> args;
  for (const auto& a : command) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const auto start = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int out = ::open(output.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(out, STDOUT_FILENO);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  ChildResult result;
  ::waitpid(pid, &result.status, 0);
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::ifstream in(output);
  std::string line, last;
  while (std::getline(in, line)) last = line;
  result.peak_rss_mb = last.empty() ? 0 : std::stod(last) / 1024.0;  // peak_rss prints KiB
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/tmp/tiedlora_bench_merge";
  const double gigabytes = argc > 2 ? std::stod(argv[2]) : 1.2;
  const std::string cli = TIEDLORA_CLI_PATH;
  tiedlora::formats::remove_tree(dir);
  ::mkdir(dir.c_str(), 0755);
  const std::string base = dir + "/base", adapter = dir + "/adapter", out = dir + "/merged";

  // Base: N projections of 4096 x 1792 fp32 (29 MB each) plus an unadapted embedding, in two shards.
  const int64_t rows = 4096, cols = 1792, rank = 16;
  const uint64_t tensor_bytes = rows * cols * 4;
  const int layers = static_cast<int>(gigabytes * 1e9 / tensor_bytes);
  std::vector<tiedlora::formats::TensorSpec> specs;
  specs.push_back({"model.embed_tokens.weight", tiedlora::formats::SafetensorsDtype::F32, {8000, 1024}});
  for (int i = 0; i < layers; ++i) {
    specs.push_back(
        {"model.layers." + std::to_string(i) + ".proj.weight", tiedlora::formats::SafetensorsDtype::F32, {rows, cols}});
  }
  uint64_t total = 0, largest = 0;
  for (const auto& s : specs) {
    total += s.nbytes();
    largest = std::max(largest, s.nbytes());
  }
  at::manual_seed(0);
  tiedlora::formats::write_sharded_safetensors_streaming(
      base, specs, [](const tiedlora::formats::TensorSpec& s) { return at::randn(s.shape); }, total / 2 + 1);
  std::ofstream(base + "/config.json") << R"({"model_type": "llama"})";

  tiedlora::AdapterConfig config;
  config.rank = rank;
  config.alpha = 2 * rank;
  std::vector<std::pair<std::string, at::Tensor>> adapter_tensors;
  for (int i = 0; i < layers; ++i) {
    const std::string p = "base_model.model.model.layers." + std::to_string(i) + ".proj";
    adapter_tensors.emplace_back(p + ".lora_A.weight", at::randn({rank, cols}) * 0.02);
    adapter_tensors.emplace_back(p + ".lora_B.weight", at::randn({rows, rank}) * 0.02);
    config.target_modules.push_back("model.layers." + std::to_string(i) + ".proj");
  }
  tiedlora::write_adapter_folder(adapter, config, adapter_tensors);

  const ChildResult baseline = run_child({cli, "inspect", "--header-only", adapter}, dir + "/inspect.out");
  const ChildResult merge = run_child(
      {cli, "merge-weights", "--base", base, "--adapter", adapter, "--out", out, "--quiet"}, dir + "/merge.out");
  if (baseline.status != 0 || merge.status != 0) {
    std::fprintf(stderr, "bench_merge: a child failed (inspect %d, merge %d)\n", baseline.status, merge.status);
    return 1;
  }
  const double mb = total / 1e6;
  std::printf(
      "| checkpoint | tensors | largest tensor | wall time | throughput | peak RSS | RSS of the tool idle | (peak - "
      "idle) / largest |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
  std::printf("| %.0f MB fp32, %d adapted | %zu | %.1f MB | %.2f s | %.0f MB/s | %.0f MB | %.0f MB | %.1f |\n", mb,
              layers, specs.size(), largest / 1e6, merge.seconds, mb / merge.seconds, merge.peak_rss_mb,
              baseline.peak_rss_mb, (merge.peak_rss_mb - baseline.peak_rss_mb) / (largest / 1e6));
  tiedlora::formats::remove_tree(dir);
  return 0;
}
