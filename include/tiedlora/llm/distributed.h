// tiedlora/llm/distributed.h: data-parallel training on an existing collective engine: NCCL through PyTorch's
// c10d for CUDA processes (launched by torchrun), OpenMPI for CPU processes (launched by mpirun). LibTorch
// has no C++ DistributedDataParallel; the Trainer needs only what this file offers: an all-reduce (sum) and a
// broadcast of flat tensors, each bounded by a timeout, so a dead or hung rank ends the run with an error
// instead of a hang. docs/distributed.md says why these two engines and what is reduced when.
//
//   auto group = tiedlora::distributed::init_from_environment(options);  // a world of 1 when not launched
//   train_options.process_group = group;                                  // the Trainer shards and reduces
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "tiedlora/core/error.h"

namespace tiedlora::distributed {

/// What the launcher put in the environment. torchrun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
/// MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE, TORCHELASTIC_RESTART_COUNT. mpirun (OpenMPI):
/// OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE. Neither: a world of 1.
struct LaunchEnvironment {
  enum class Launcher { none, torchrun, mpirun };
  Launcher launcher = Launcher::none;
  int rank = 0, world_size = 1, local_rank = 0, local_world_size = 1;
  std::string master_addr;  ///< torchrun: the store's host
  int master_port = 0;      ///< torchrun: the store's port
  bool agent_store = false; ///< torchrun's agent hosts the store: every rank connects as a client
  int restart_count = 0;    ///< torchrun's restarts so far (a fresh store prefix each time)

  /// Reads the environment; a malformed or inconsistent variable (RANK beyond WORLD_SIZE, a port that is
  /// not a number) is a ConfigError naming it.
  static LaunchEnvironment from_environment();
  const char* launcher_name() const;
};

/// The collectives the Trainer uses. Tensors are flat and contiguous, on the CPU or on the group's device;
/// every rank calls the same collectives in the same order with tensors of the same size and dtype (as in
/// torch.distributed). `what` names the operation in a timeout's error ("the gradients of step 12").
class ProcessGroup {
 public:
  virtual ~ProcessGroup() = default;
  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  bool is_main() const { return rank_ == 0; }
  /// "local" (a world of 1), "mpi" or "nccl".
  virtual std::string backend() const = 0;
  /// Sums `tensor` over the ranks, in place.
  virtual void all_reduce_sum(at::Tensor& tensor, const std::string& what) = 0;
  /// Rank `root`'s `tensor` into every rank's, in place.
  virtual void broadcast(at::Tensor& tensor, int root, const std::string& what) = 0;
  /// Ends every process of the job now (after an error on this rank that the others cannot see: they would
  /// otherwise wait in their next collective until its timeout). A world of 1 only returns.
  virtual void abort(int exit_code) = 0;

 protected:
  ProcessGroup(int rank, int world_size) : rank_(rank), world_size_(world_size) {}

 private:
  int rank_, world_size_;
};

/// A collective did not finish within the timeout: another rank died, hangs, or is far behind.
class Timeout : public Error {
 public:
  using Error::Error;
};

struct DistributedOptions {
  /// "cpu" or "cuda": CUDA processes use NCCL on device LOCAL_RANK; CPU processes use OpenMPI.
  std::string device = "cpu";
  /// Longest wait of one collective (and of the store's rendezvous) before a Timeout.
  std::chrono::milliseconds timeout = std::chrono::minutes(10);
};

/// The process group the launcher's environment describes: OpenMPI for CPU processes under mpirun; NCCL for
/// CUDA processes under torchrun (or its variables set by hand), even one; otherwise a world of 1 when there is
/// one process. A combination that cannot be served (several CPU processes under torchrun, CUDA processes
/// under mpirun, a build without MPI or NCCL) is a ConfigError with the command that works.
std::shared_ptr<ProcessGroup> init_from_environment(const DistributedOptions& options = {});

/// A world of 1: every collective returns its input.
std::shared_ptr<ProcessGroup> single_process();

/// Rank `root`'s text on every rank.
std::string broadcast_text(ProcessGroup& group, const std::string& text, int root, const std::string& what);
/// Every rank's text, in rank order, on every rank (two all-reduces: lengths, then the bytes).
std::vector<std::string> all_gather_text(ProcessGroup& group, const std::string& text, const std::string& what);

/// The contiguous share [begin, end) of `count` items of rank `rank` in a world of `world_size`: the first
/// count % world_size ranks take one more.
std::pair<int64_t, int64_t> shard_range(int64_t count, int rank, int world_size);

}  // namespace tiedlora::distributed
