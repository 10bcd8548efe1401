// backends.h: the process groups behind tiedlora::distributed::init_from_environment, each in its own file
// so that only a build with that engine compiles it (mpi_group.cpp: OpenMPI; nccl_group.cpp: c10d's NCCL).
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "tiedlora/distributed/launch.h"

namespace tiedlora::distributed::detail {

std::shared_ptr<ProcessGroup> make_mpi_group(const LaunchEnvironment& env, std::chrono::milliseconds timeout);
std::shared_ptr<ProcessGroup> make_nccl_group(const LaunchEnvironment& env, std::chrono::milliseconds timeout);

/// "rank R: the all-reduce of WHAT did not finish within S s ..." (both engines word it the same).
std::string timeout_message(int rank, const char* operation, const std::string& what,
                            std::chrono::milliseconds timeout);
/// "rank R: the all-reduce of WHAT failed: REASON".
std::string failure_message(int rank, const char* operation, const std::string& what, const std::string& reason);

}  // namespace tiedlora::distributed::detail
