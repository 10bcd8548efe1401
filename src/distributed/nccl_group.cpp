// nccl_group.cpp: CUDA processes reduce with NCCL through PyTorch's own c10d::ProcessGroupNCCL (the engine
// torch.distributed uses), rendezvousing on c10d's TCPStore at MASTER_ADDR:MASTER_PORT. Under torchrun the
// agent already serves that store (TORCHELASTIC_USE_AGENT_STORE=True), so every rank is a client; without
// the agent, rank 0 serves it, as torch.distributed's env:// does. Collectives block with a timeout
// (TORCH_NCCL_BLOCKING_WAIT), so a hung rank ends in an error naming the operation, not in a hang.
#include <cstdlib>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "distributed/backends.h"

namespace tiedlora::distributed::detail {

namespace {

class NcclGroup final : public ProcessGroup {
 public:
  NcclGroup(const LaunchEnvironment& env, std::chrono::milliseconds timeout)
      : ProcessGroup(env.rank, env.world_size), timeout_(timeout) {
    const int devices = static_cast<int>(c10::cuda::device_count());
    if (env.local_rank >= devices) {
      throw ConfigError("distributed (nccl): local rank " + std::to_string(env.local_rank) + " but " +
                        std::to_string(devices) + " CUDA devices (hint: --nproc-per-node at most the GPUs of a node)");
    }
    device_ = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank));
    c10::cuda::set_device(device_.index());
    ::setenv("TORCH_NCCL_BLOCKING_WAIT", "1", /*overwrite=*/0);
    c10d::TCPStoreOptions store_options;
    store_options.port = static_cast<std::uint16_t>(env.master_port);
    // As torch.distributed's env:// and torchrun's workers: every rank knows the world and waits for it.
    store_options.isServer = !env.agent_store && env.rank == 0;
    store_options.numWorkers = static_cast<std::size_t>(env.world_size);
    store_options.waitWorkers = true;
    store_options.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, store_options);
    // A fresh key space per torchrun restart: keys of a failed attempt never meet the next one's.
    auto prefixed =
        c10::make_intrusive<c10d::PrefixStore>("tiedlora/attempt_" + std::to_string(env.restart_count), store);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    group_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, env.rank, env.world_size, options);
  }

  ~NcclGroup() override {
    try {
      group_->shutdown();  // what destroy_process_group() does: the communicators end cleanly
    } catch (...) {        // nothing to do about it at exit
    }
  }

  std::string backend() const override { return "nccl"; }

  void all_reduce_sum(at::Tensor& tensor, const std::string& what) override {
    run(tensor, what, "all-reduce", [&](std::vector<at::Tensor>& tensors) {
      c10d::AllreduceOptions options;
      options.reduceOp = c10d::ReduceOp::SUM;
      return group_->allreduce(tensors, options);
    });
  }

  void broadcast(at::Tensor& tensor, int root, const std::string& what) override {
    run(tensor, what, "broadcast", [&](std::vector<at::Tensor>& tensors) {
      c10d::BroadcastOptions options;
      options.rootRank = root;
      return group_->broadcast(tensors, options);
    });
  }

  void abort(int exit_code) override {
    // torchrun's agent stops the other workers when this one exits with an error.
    std::_Exit(exit_code);
  }

 private:
  template <class Collective>
  void run(at::Tensor& tensor, const std::string& what, const char* operation, Collective&& collective) {
    // NCCL works on this rank's GPU: a CPU tensor (the small texts and counters) travels there and back.
    std::vector<at::Tensor> tensors{tensor.device() == device_ ? tensor : tensor.to(device_)};
    c10::intrusive_ptr<c10d::Work> work = collective(tensors);
    bool completed = false;
    try {
      completed = work->wait(timeout_);
    } catch (const std::exception& e) {
      const std::string detail = e.what();
      if (detail.find("imeout") != std::string::npos || detail.find("timed out") != std::string::npos) {
        throw Timeout(timeout_message(rank(), operation, what, timeout_) + " [" + detail + "]");
      }
      throw Error(failure_message(rank(), operation, what, detail));
    }
    if (!completed) throw Error(failure_message(rank(), operation, what, "aborted"));
    if (!tensor.is_same(tensors.front())) tensor.copy_(tensors.front());
  }

  std::chrono::milliseconds timeout_;
  at::Device device_{at::kCUDA};
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> group_;
};

}  // namespace

std::shared_ptr<ProcessGroup> make_nccl_group(const LaunchEnvironment& env, std::chrono::milliseconds timeout) {
  return std::make_shared<NcclGroup>(env, timeout);
}

}  // namespace tiedlora::distributed::detail
