// mpi_group.cpp: CPU processes launched by mpirun reduce with OpenMPI. Every collective is non-blocking and
// polled against a deadline, so a hung rank turns into a Timeout instead of a hang (MPI has no timeout of
// its own); a dead rank is mpirun's to report: it ends the job when a process dies.
#include <chrono>
#include <thread>

#include <ATen/ATen.h>
#include <mpi.h>

#include "distributed/backends.h"

namespace tiedlora::distributed::detail {

namespace {

MPI_Datatype mpi_type(const at::Tensor& t, const std::string& what) {
  switch (t.scalar_type()) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kLong: return MPI_INT64_T;
    case at::kInt: return MPI_INT32_T;
    case at::kByte: return MPI_UINT8_T;
    default:
      throw ConfigError("distributed (mpi): " + what + ": dtype " + std::string(c10::toString(t.scalar_type())) +
                        " is not reduced (float32, float64, int32, int64, uint8 are)");
  }
}

std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  return std::string(text, static_cast<size_t>(length));
}

class MpiGroup final : public ProcessGroup {
 public:
  MpiGroup(const LaunchEnvironment& env, std::chrono::milliseconds timeout)
      : ProcessGroup(env.rank, env.world_size), timeout_(timeout) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      int provided = 0;
      MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);  // collectives from one thread only
      owns_mpi_ = true;
      if (provided < MPI_THREAD_FUNNELED) {  // LibTorch's own threads exist beside the one that calls MPI
        throw ConfigError("distributed (mpi): the MPI library does not allow MPI_THREAD_FUNNELED");
      }
    }
    MPI_Comm_dup(MPI_COMM_WORLD, &comm_);
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);  // errors become exceptions naming the operation
    int rank = 0, size = 0;
    MPI_Comm_rank(comm_, &rank);
    MPI_Comm_size(comm_, &size);
    if (rank != env.rank || size != env.world_size) {
      throw ConfigError("distributed (mpi): MPI says rank " + std::to_string(rank) + " of " + std::to_string(size) +
                        ", the environment rank " + std::to_string(env.rank) + " of " + std::to_string(env.world_size));
    }
  }
  ~MpiGroup() override {
    if (broken_) {
      // A collective is still pending on this rank; finalising would wait for it forever.
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    MPI_Comm_free(&comm_);
    if (owns_mpi_) MPI_Finalize();
  }

  std::string backend() const override { return "mpi"; }

  void all_reduce_sum(at::Tensor& tensor, const std::string& what) override {
    check(tensor, what);
    MPI_Request request;
    wait(MPI_Iallreduce(MPI_IN_PLACE, tensor.data_ptr(), static_cast<int>(tensor.numel()), mpi_type(tensor, what),
                        MPI_SUM, comm_, &request),
         request, "all-reduce", what);
  }

  void broadcast(at::Tensor& tensor, int root, const std::string& what) override {
    check(tensor, what);
    MPI_Request request;
    wait(MPI_Ibcast(tensor.data_ptr(), static_cast<int>(tensor.numel()), mpi_type(tensor, what), root, comm_, &request),
         request, "broadcast", what);
  }

  void abort(int exit_code) override { MPI_Abort(MPI_COMM_WORLD, exit_code); }

 private:
  void check(const at::Tensor& tensor, const std::string& what) const {
    if (broken_) throw Error("distributed (mpi): " + what + ": an earlier collective failed on this rank");
    if (!tensor.device().is_cpu() || !tensor.is_contiguous()) {
      throw ConfigError("distributed (mpi): " + what + ": a contiguous CPU tensor expected");
    }
    if (tensor.numel() > std::numeric_limits<int>::max())
      throw ConfigError("distributed (mpi): " + what + " is too large");
  }

  // Polls the request until it completes or the deadline passes. The sleep between polls starts short (a
  // collective of small adapter gradients takes microseconds) and grows to a millisecond, so a rank waiting
  // for a slower one leaves its core to the computation.
  void wait(int started, MPI_Request& request, const char* operation, const std::string& what) {
    if (started != MPI_SUCCESS) {
      broken_ = true;
      throw Error(failure_message(rank(), operation, what, mpi_error_text(started)));
    }
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    auto pause = std::chrono::microseconds(1);
    for (;;) {
      int done = 0;
      const int code = MPI_Test(&request, &done, MPI_STATUS_IGNORE);
      if (code != MPI_SUCCESS) {
        broken_ = true;
        throw Error(failure_message(rank(), operation, what, mpi_error_text(code)));
      }
      if (done) return;
      if (std::chrono::steady_clock::now() > deadline) {
        broken_ = true;
        throw Timeout(timeout_message(rank(), operation, what, timeout_));
      }
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(1000));
    }
  }

  std::chrono::milliseconds timeout_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  bool owns_mpi_ = false;
  bool broken_ = false;
};

}  // namespace

std::shared_ptr<ProcessGroup> make_mpi_group(const LaunchEnvironment& env, std::chrono::milliseconds timeout) {
  return std::make_shared<MpiGroup>(env, timeout);
}

}  // namespace tiedlora::distributed::detail
