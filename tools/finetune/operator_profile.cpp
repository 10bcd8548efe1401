// operator_profile.cpp: see operator_profile.h.
#include "finetune/operator_profile.h"

#include <algorithm>
#include <cstdlib>
#include <map>
#include <vector>

#include <fmt/format.h>
#include <torch/csrc/autograd/profiler_kineto.h>

namespace tiedlora::tools {
namespace {

namespace profiler = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

struct OperatorTime {
  int64_t calls = 0;
  uint64_t self_ns = 0;
};

bool is_matrix_product(const std::string& name) {
  for (const char* op : {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}) {
    if (name == op) return true;
  }
  return false;
}

bool is_attention(const std::string& name) { return name.find("attention") != std::string::npos; }

}  // namespace

OperatorProfile::~OperatorProfile() {
  if (!running_) return;
  try {
    profiler::disableProfiler();
  } catch (...) {  // a destructor must not throw; the profile is dropped anyway
  }
}

void OperatorProfile::start() {
  // Kineto logs an ERROR line on a machine without a GPU (it probes for one); its own variable, unless the
  // user set it, keeps the output to what matters.
  ::setenv("KINETO_LOG_LEVEL", "5", /*overwrite=*/0);
  const ProfilerConfig config(ProfilerState::KINETO);
  const std::set<ActivityType> activities{ActivityType::CPU};
  profiler::prepareProfiler(config, activities);
  profiler::enableProfiler(config, activities);
  running_ = true;
  started_ = std::chrono::steady_clock::now();
}

std::string OperatorProfile::stop(size_t top) {
  const auto result = profiler::disableProfiler();
  running_ = false;
  const double wall_ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - started_).count();
  // Self time: an operator's span less the spans of the operators it called (nested spans on its thread).
  std::map<uint64_t, std::vector<const profiler::KinetoEvent*>> by_thread;
  for (const auto& e : result->events()) {
    if (e.deviceType() == c10::DeviceType::CPU && e.endNs() > e.startNs()) by_thread[e.startThreadId()].push_back(&e);
  }
  std::map<std::string, OperatorTime> totals;
  for (auto& [thread, events] : by_thread) {
    std::sort(events.begin(), events.end(), [](const auto* a, const auto* b) {
      return a->startNs() != b->startNs() ? a->startNs() < b->startNs() : a->endNs() > b->endNs();
    });
    std::vector<std::pair<const profiler::KinetoEvent*, uint64_t>> open;  // event, time of its children
    auto close = [&] {
      const auto [event, children] = open.back();
      open.pop_back();
      auto& t = totals[event->name()];
      t.calls += 1;
      t.self_ns += event->durationNs() - std::min(children, event->durationNs());
      if (!open.empty()) open.back().second += event->durationNs();
    };
    for (const auto* e : events) {
      while (!open.empty() && open.back().first->endNs() <= e->startNs()) close();
      open.emplace_back(e, 0);
    }
    while (!open.empty()) close();
  }
  std::vector<std::pair<std::string, OperatorTime>> rows(totals.begin(), totals.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.self_ns > b.second.self_ns; });
  uint64_t matmul_ns = 0, attention_ns = 0, profiled_ns = 0;
  for (const auto& [name, t] : rows) {
    profiled_ns += t.self_ns;
    if (is_matrix_product(name)) matmul_ns += t.self_ns;
    if (is_attention(name)) attention_ns += t.self_ns;
  }
  auto share = [&](uint64_t ns) { return fmt::format("{:.1f} %", 100.0 * static_cast<double>(ns) / wall_ns); };
  std::string out =
      fmt::format("One training step, {:.0f} ms wall time, by operator (self time{}):\n\n", wall_ns / 1e6,
                  on_gpu_ ? " on the host: GPU kernels run asynchronously, so this is launch time, and the "
                            "waits land in whichever operator synchronises"
                          : "");
  out += "| operator | calls | self time | share of the step |\n|---|---:|---:|---:|\n";
  uint64_t rest_ns = 0;
  int64_t rest_calls = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& [name, t] = rows[i];
    if (i < top) {
      out += fmt::format("| {} | {} | {:.1f} ms | {} |\n", name, t.calls, static_cast<double>(t.self_ns) / 1e6,
                         share(t.self_ns));
    } else {
      rest_ns += t.self_ns;
      rest_calls += t.calls;
    }
  }
  if (rest_calls > 0) {
    out += fmt::format("| {} other operators | {} | {:.1f} ms | {} |\n", rows.size() - top, rest_calls,
                       static_cast<double>(rest_ns) / 1e6, share(rest_ns));
  }
  const uint64_t outside =
      wall_ns > static_cast<double>(profiled_ns) ? static_cast<uint64_t>(wall_ns) - profiled_ns : 0;
  out += fmt::format("| (outside any operator) | | {:.1f} ms | {} |\n", static_cast<double>(outside) / 1e6,
                     share(outside));
  out += fmt::format("\nGroups: matrix products (mm, addmm, bmm, baddbmm) {}, attention kernels {}.\n",
                     share(matmul_ns), share(attention_ns));
  return out;
}

}  // namespace tiedlora::tools
