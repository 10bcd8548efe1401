// util/signals.h: installing a signal handler the way a long operation should (merge, training).
#pragma once

#include <csignal>

namespace tiedlora::util {

using SignalHandler = void (*)(int);

/// Installs `handler` for `signal` and returns the previous handler; a signal the process ignores
/// (SIGHUP under nohup, SIGINT in a background job) stays ignored.
inline SignalHandler install_unless_ignored(int signal, SignalHandler handler) {
  const SignalHandler previous = std::signal(signal, handler);
  if (previous == SIG_IGN) std::signal(signal, SIG_IGN);
  return previous;
}

}  // namespace tiedlora::util
