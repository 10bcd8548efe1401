# The engines of data-parallel training (tiedlora/distributed/launch.h, docs/distributed.md), in their own
# library, tiedlora::distributed, so that a program linking tiedlora::llm alone never links MPI or NCCL.
#   CPU processes: OpenMPI (Debian's libopenmpi-dev; launched by mpirun). LibTorch's Gloo process group would
#     be the natural choice, but its header includes gloo's own headers, which no package of the registries
#     ships at the version the torch wheel was built with.
#   CUDA processes: NCCL through LibTorch's c10d::ProcessGroupNCCL; nccl.h from the nvidia-nccl wheel that
#     the torch wheel depends on (the NCCL it runs with), else the CUDA toolkit's.
# Either missing builds without it; launching that kind of world is then a ConfigError with the hint.
function(tiedlora_probe_mpi found detail)
  # MPI's C API from C++ (the project enables no C compiler), without the deprecated C++ bindings.
  set(MPI_CXX_SKIP_MPICXX ON)
  find_package(MPI COMPONENTS CXX QUIET)
  if(MPI_CXX_FOUND)
    tiedlora_probe_answer(ON "MPI ${MPI_CXX_VERSION}, ${MPIEXEC_EXECUTABLE}")
  else()
    tiedlora_probe_answer(OFF "no MPI found")
  endif()
endfunction()
tiedlora_optional_feature(MPI DOC "data parallelism on CPUs over MPI" PROBE tiedlora_probe_mpi
  HINT "apt-get install libopenmpi-dev openmpi-bin")
set(TIEDLORA_MPIRUN "${MPIEXEC_EXECUTABLE}")

function(tiedlora_probe_nccl found detail)
  if(NOT TIEDLORA_WITH_CUDA)
    tiedlora_probe_answer(OFF "no CUDA")
    return()
  endif()
  # site-packages/torch/share/cmake/Torch -> site-packages/nvidia/nccl/include
  get_filename_component(site_packages "${Torch_DIR}/../../../.." ABSOLUTE)
  find_path(TIEDLORA_NCCL_INCLUDE_DIR nccl.h
    HINTS "${site_packages}/nvidia/nccl/include" ${CUDAToolkit_INCLUDE_DIRS} ENV NCCL_INCLUDE_DIR
    NO_DEFAULT_PATH)
  find_path(TIEDLORA_NCCL_INCLUDE_DIR nccl.h)
  if(TIEDLORA_NCCL_INCLUDE_DIR)
    tiedlora_probe_answer(ON "nccl.h from ${TIEDLORA_NCCL_INCLUDE_DIR}")
  else()
    tiedlora_probe_answer(OFF "nccl.h not found")
  endif()
endfunction()
tiedlora_optional_feature(NCCL DOC "data parallelism on GPUs over NCCL" PROBE tiedlora_probe_nccl
  HINT "a CUDA build, with the nvidia-nccl wheel or the CUDA toolkit's nccl.h")

# tiedlora::distributed: the launcher's environment and the engines (src/distributed/), over tiedlora::llm.
function(tiedlora_add_distributed)
  set(sources src/distributed/launch.cpp)
  if(TIEDLORA_WITH_MPI)
    list(APPEND sources src/distributed/mpi_group.cpp)
  endif()
  if(TIEDLORA_WITH_NCCL)
    list(APPEND sources src/distributed/nccl_group.cpp)
  endif()
  tiedlora_add_layer(distributed SOURCES ${sources} PUBLIC_DEPENDS tiedlora_llm)
  target_compile_definitions(tiedlora_distributed PRIVATE TIEDLORA_WITH_MPI=$<BOOL:${TIEDLORA_WITH_MPI}>
    TIEDLORA_WITH_NCCL=$<BOOL:${TIEDLORA_WITH_NCCL}>)
  if(TIEDLORA_WITH_MPI)
    target_link_libraries(tiedlora_distributed PRIVATE MPI::MPI_CXX)
  endif()
  if(TIEDLORA_WITH_NCCL)
    set_source_files_properties(src/distributed/nccl_group.cpp TARGET_DIRECTORY tiedlora_distributed
      PROPERTIES COMPILE_DEFINITIONS USE_C10D_NCCL INCLUDE_DIRECTORIES "${TIEDLORA_NCCL_INCLUDE_DIR}")
    target_link_libraries(tiedlora_distributed PRIVATE CUDA::cudart)
  endif()
endfunction()
