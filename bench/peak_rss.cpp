// peak_rss.cpp: runs a command and prints its peak resident set size in KiB (wait4's ru_maxrss), then
// exits with the command's status. The peak of a process includes what it had before exec, so a large
// parent (bench_merge or the Python test, with LibTorch and tensors loaded) cannot measure its child
// directly: this small program, without LibTorch, starts the command instead.
// Usage: peak_rss <program> [args...]
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: peak_rss <program> [args...]\n");
    return 2;
  }
  const pid_t pid = ::fork();
  if (pid < 0) return 2;
  if (pid == 0) {
    ::execv(argv[1], argv + 1);
    ::_exit(127);
  }
  int status = 0;
  struct rusage usage{};
  if (::wait4(pid, &status, 0, &usage) < 0) return 2;
  std::printf("%ld\n", usage.ru_maxrss);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
