// tiedlora/distributed/launch.h: the process group a launcher started this process in (target
// tiedlora::distributed, over tiedlora::llm): NCCL through PyTorch's c10d for CUDA processes (launched by
// torchrun), OpenMPI for CPU processes (launched by mpirun). The Trainer needs only the ProcessGroup
// interface (tiedlora/llm/distributed.h), so a program that trains in one process links tiedlora::llm alone
// and never MPI or NCCL. docs/distributed.md says why these two engines and what is reduced when.
//
//   auto group = tiedlora::distributed::init_from_environment(options);  // a world of 1 when not launched
//   train_options.process_group = group;                                  // the Trainer shards and reduces
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "tiedlora/llm/distributed.h"

namespace tiedlora::distributed {

/// What the launcher put in the environment. torchrun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
/// MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE, TORCHELASTIC_RESTART_COUNT. mpirun (OpenMPI):
/// OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE. Neither: a world of 1.
struct LaunchEnvironment {
  enum class Launcher { none, torchrun, mpirun };
  Launcher launcher = Launcher::none;
  int rank = 0, world_size = 1, local_rank = 0, local_world_size = 1;
  std::string master_addr;   ///< torchrun: the store's host
  int master_port = 0;       ///< torchrun: the store's port
  bool agent_store = false;  ///< torchrun's agent hosts the store: every rank connects as a client
  int restart_count = 0;     ///< torchrun's restarts so far (a fresh store prefix each time)

  /// Reads the environment; a malformed or inconsistent variable (RANK beyond WORLD_SIZE, a port that is
  /// not a number) is a ConfigError naming it.
  static LaunchEnvironment from_environment();
  const char* launcher_name() const;
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

}  // namespace tiedlora::distributed
