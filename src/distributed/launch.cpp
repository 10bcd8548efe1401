// launch.cpp: the launcher's environment and the choice of engine (tiedlora/distributed/launch.h); the
// engines are mpi_group.cpp and nccl_group.cpp, each built only when the build has it.
#include "tiedlora/distributed/launch.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "distributed/backends.h"

namespace tiedlora::distributed {

namespace {

const char* variable(const char* name) {
  const char* value = std::getenv(name);
  return value && *value ? value : nullptr;
}

int integer_variable(const char* name, int fallback) {
  const char* text = variable(name);
  if (!text) return fallback;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (*end != '\0' || value < 0 || value > 1'000'000) {
    throw ConfigError(std::string("environment variable ") + name + "='" + text + "' is not a non-negative integer");
  }
  return static_cast<int>(value);
}

}  // namespace

LaunchEnvironment LaunchEnvironment::from_environment() {
  LaunchEnvironment env;
  if (variable("OMPI_COMM_WORLD_SIZE")) {
    env.launcher = Launcher::mpirun;
    env.rank = integer_variable("OMPI_COMM_WORLD_RANK", 0);
    env.world_size = integer_variable("OMPI_COMM_WORLD_SIZE", 1);
    env.local_rank = integer_variable("OMPI_COMM_WORLD_LOCAL_RANK", 0);
    env.local_world_size = integer_variable("OMPI_COMM_WORLD_LOCAL_SIZE", 1);
  } else if (variable("WORLD_SIZE")) {
    env.launcher = Launcher::torchrun;
    env.rank = integer_variable("RANK", 0);
    env.world_size = integer_variable("WORLD_SIZE", 1);
    env.local_rank = integer_variable("LOCAL_RANK", 0);
    env.local_world_size = integer_variable("LOCAL_WORLD_SIZE", 1);
    env.restart_count = integer_variable("TORCHELASTIC_RESTART_COUNT", 0);
    if (const char* addr = variable("MASTER_ADDR")) env.master_addr = addr;
    env.master_port = integer_variable("MASTER_PORT", 0);
    if (const char* flag = variable("TORCHELASTIC_USE_AGENT_STORE")) env.agent_store = std::strcmp(flag, "True") == 0;
    if (env.world_size > 1 && (env.master_addr.empty() || env.master_port == 0 || env.master_port > 65535)) {
      throw ConfigError("WORLD_SIZE=" + std::to_string(env.world_size) +
                        " but MASTER_ADDR/MASTER_PORT do not name the "
                        "store (hint: launch with torchrun, which sets them)");
    }
  }
  if (env.world_size < 1) throw ConfigError("the launcher's world size is 0");
  if (env.rank >= env.world_size) {
    throw ConfigError("the launcher's rank " + std::to_string(env.rank) + " is not below its world size " +
                      std::to_string(env.world_size));
  }
  if (env.local_world_size < 1 || env.local_rank >= env.local_world_size) {
    throw ConfigError("the launcher's local rank " + std::to_string(env.local_rank) +
                      " is not below its local world size " + std::to_string(env.local_world_size));
  }
  return env;
}

const char* LaunchEnvironment::launcher_name() const {
  switch (launcher) {
    case Launcher::torchrun: return "torchrun";
    case Launcher::mpirun: return "mpirun";
    default: return "none";
  }
}

std::shared_ptr<ProcessGroup> init_from_environment(const DistributedOptions& options) {
  const LaunchEnvironment env = LaunchEnvironment::from_environment();
  if (options.timeout.count() <= 0) throw ConfigError("distributed: the collective timeout must be positive");
  // torchrun with CUDA gets NCCL even for one process (as torch.distributed would), so a world of 1 GPU runs
  // the engine of 8; any other world of 1 needs no engine.
  const bool nccl = options.device == "cuda" && env.launcher == LaunchEnvironment::Launcher::torchrun;
  if (env.world_size == 1 && !nccl) return single_process();
  if (options.device == "cuda") {
    if (!nccl) {
      throw ConfigError("distributed: " + std::to_string(env.world_size) +
                        " CUDA processes under mpirun: CUDA processes "
                        "reduce with NCCL, so launch them with torchrun (hint: torchrun --nproc-per-node " +
                        std::to_string(env.world_size) + " --no-python tiedlora_finetune --device cuda ...)");
    }
    return detail::make_nccl_group(env, options.timeout);
  }
  if (options.device != "cpu") throw ConfigError("distributed: device '" + options.device + "' (cpu or cuda expected)");
  if (env.launcher != LaunchEnvironment::Launcher::mpirun) {
    throw ConfigError(
        "distributed: " + std::to_string(env.world_size) +
        " CPU processes under torchrun: CPU processes "
        "reduce with OpenMPI, so launch them with mpirun (hint: mpirun -np " +
        std::to_string(env.world_size) +
        " tiedlora_finetune ...; torchrun is for CUDA processes, with --device cuda; docs/distributed.md)");
  }
  return detail::make_mpi_group(env, options.timeout);
}

namespace detail {

std::string timeout_message(int rank, const char* operation, const std::string& what,
                            std::chrono::milliseconds timeout) {
  char seconds[32];
  std::snprintf(seconds, sizeof seconds, "%.1f", static_cast<double>(timeout.count()) / 1000.0);
  return "rank " + std::to_string(rank) + ": the " + operation + " of " + what + " did not finish within " + seconds +
         " s: another rank died, hangs or is far behind (hint: see the launcher's message about that rank; raise "
         "--dist-timeout if a rank is only slow; continue with --resume-latest)";
}

std::string failure_message(int rank, const char* operation, const std::string& what, const std::string& reason) {
  return "rank " + std::to_string(rank) + ": the " + operation + " of " + what + " failed: " + reason;
}

#if !TIEDLORA_WITH_MPI
std::shared_ptr<ProcessGroup> make_mpi_group(const LaunchEnvironment& env, std::chrono::milliseconds) {
  throw ConfigError("distributed: launched by mpirun with " + std::to_string(env.world_size) +
                    " processes, but this "
                    "build has no MPI (hint: apt-get install libopenmpi-dev openmpi-bin and configure again)");
}
#endif
#if !TIEDLORA_WITH_NCCL
std::shared_ptr<ProcessGroup> make_nccl_group(const LaunchEnvironment& env, std::chrono::milliseconds) {
  throw ConfigError("distributed: " + std::to_string(env.world_size) +
                    " CUDA processes need NCCL, but this build has "
                    "no CUDA (hint: configure with TIEDLORA_CUDA=ON against a CUDA LibTorch)");
}
#endif

}  // namespace detail

}  // namespace tiedlora::distributed
