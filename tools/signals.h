// tools/signals.h: the programs' Ctrl-C policy. The library installs no signal handler: its long operations
// (merge_checkpoint, Trainer::run) take a stop_requested callback, and the programs answer it from here.
//
// Policy: the first SIGINT, SIGTERM or SIGHUP asks the running operation to stop cleanly (the trainer
// checkpoints, the merge removes its temporary folder); a second one ends the process the default way. A
// signal the process ignores (SIGHUP under nohup, SIGINT in a background job) stays ignored. The previous
// handlers come back when the object is destroyed, so Ctrl-C after training interrupts as usual.
#pragma once

#include <signal.h>

#include <csignal>

namespace tiedlora::tools {

class StopOnSignals {
 public:
  StopOnSignals() {
    received_ = 0;  // before the handlers: a signal from now on counts
    for (int i = 0; i < kSignals; ++i) {
      struct sigaction action{};
      action.sa_handler = on_signal;
      sigemptyset(&action.sa_mask);
      action.sa_flags = SA_RESTART;  // as std::signal on glibc: a write to a pipe is not cut short by Ctrl-C
      sigaction(kHandled[i], &action, &previous_[i]);
      if (previous_[i].sa_handler == SIG_IGN) sigaction(kHandled[i], &previous_[i], nullptr);
    }
  }
  ~StopOnSignals() {
    for (int i = 0; i < kSignals; ++i) sigaction(kHandled[i], &previous_[i], nullptr);
  }
  StopOnSignals(const StopOnSignals&) = delete;
  StopOnSignals& operator=(const StopOnSignals&) = delete;

  /// The signal received (0: none yet).
  static int received() { return received_; }
  /// For the operations' stop_requested callbacks.
  static bool requested() { return received_ != 0; }

 private:
  static constexpr int kSignals = 3;
  static constexpr int kHandled[kSignals] = {SIGINT, SIGTERM, SIGHUP};

  static void on_signal(int signal) {
    if (received_) {  // the second signal: end now, the default way
      std::signal(signal, SIG_DFL);
      std::raise(signal);
      return;
    }
    received_ = signal;
  }

  // A program has one set of handlers, so one flag: a process-wide state that belongs to the program.
  static inline volatile std::sig_atomic_t received_ = 0;
  struct sigaction previous_[kSignals];
};

}  // namespace tiedlora::tools
