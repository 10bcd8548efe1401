// operator_profile.h: where the time of a training step goes, by operator (tiedlora_finetune
// --profile-step): LibTorch's Kineto profiler around one step, its events reduced to self time per operator.
#pragma once

#include <chrono>
#include <string>

namespace tiedlora::tools {

class OperatorProfile {
 public:
  /// `on_gpu`: the step runs on a GPU, whose kernels are asynchronous; the table then says that it shows
  /// host time (launches, and waits in whichever operator synchronises), not kernel time.
  explicit OperatorProfile(bool on_gpu = false) : on_gpu_(on_gpu) {}
  /// A profile still running (the run ended before its step did) is stopped and dropped.
  ~OperatorProfile();
  OperatorProfile(const OperatorProfile&) = delete;
  OperatorProfile& operator=(const OperatorProfile&) = delete;

  /// Starts recording the operators this thread runs (and the autograd engine runs for it).
  void start();
  /// Stops, and gives a Markdown table: each operator's calls, self time (its time less that of the
  /// operators it called) and share of the wall time since start(), the `top` largest, then the rest;
  /// matrix products and attention also as groups.
  std::string stop(size_t top = 24);
  bool running() const { return running_; }

 private:
  bool on_gpu_;
  bool running_ = false;
  std::chrono::steady_clock::time_point started_;
};

}  // namespace tiedlora::tools
