// tiedlora/llm/distributed.h: the process group the Trainer trains over (data parallelism): a rank, a world
// size and the two collectives it needs, an all-reduce (sum) and a broadcast of flat tensors, each bounded by
// a timeout, so a dead or hung rank ends the run with an error instead of a hang. A world of 1
// (single_process) needs no engine; the engines (NCCL through PyTorch's c10d for CUDA processes, OpenMPI for
// CPU processes) and init_from_environment are the distributed component's (tiedlora/distributed/launch.h,
// target tiedlora::distributed), so linking tiedlora::llm never pulls in MPI or NCCL. LibTorch has no C++
// DistributedDataParallel; docs/distributed.md says why these two engines and what is reduced when.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "tiedlora/core/error.h"

namespace tiedlora::distributed {

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
