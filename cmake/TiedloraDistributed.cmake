# The engines of data-parallel training (tiedlora/llm/distributed.h, docs/distributed.md).
#   CPU processes: OpenMPI (Debian's libopenmpi-dev; launched by mpirun). LibTorch's Gloo process group would
#     be the natural choice, but its header includes gloo's own headers, which no package of the registries
#     ships at the version the torch wheel was built with.
#   CUDA processes: NCCL through LibTorch's c10d::ProcessGroupNCCL; nccl.h from the nvidia-nccl wheel that
#     the torch wheel depends on (the NCCL it runs with), else the CUDA toolkit's.
# Either missing builds without it; launching that kind of world is then a ConfigError with the hint.
set(TIEDLORA_MPI AUTO CACHE STRING "CPU data parallelism over OpenMPI: AUTO (when MPI is found), ON or OFF")
set_property(CACHE TIEDLORA_MPI PROPERTY STRINGS AUTO ON OFF)
set(TIEDLORA_WITH_MPI OFF)
set(TIEDLORA_DISTRIBUTED_SOURCES "")
if(NOT TIEDLORA_MPI STREQUAL "OFF")
  # MPI's C API from C++ (the project enables no C compiler), without the deprecated C++ bindings.
  set(MPI_CXX_SKIP_MPICXX ON)
  find_package(MPI COMPONENTS CXX QUIET)
  if(MPI_CXX_FOUND)
    set(TIEDLORA_WITH_MPI ON)
    list(APPEND TIEDLORA_DISTRIBUTED_SOURCES "${PROJECT_SOURCE_DIR}/src/llm/distributed/mpi_group.cpp")
    set(TIEDLORA_MPIRUN "${MPIEXEC_EXECUTABLE}")
    message(STATUS "tiedlora: data parallelism on CPUs over MPI ${MPI_CXX_VERSION} (${TIEDLORA_MPIRUN})")
  elseif(TIEDLORA_MPI STREQUAL "ON")
    message(FATAL_ERROR "TIEDLORA_MPI=ON but no MPI was found (hint: apt-get install libopenmpi-dev openmpi-bin)")
  else()
    message(STATUS "tiedlora: no MPI: CPU processes cannot train together (apt-get install libopenmpi-dev openmpi-bin)")
  endif()
endif()

set(TIEDLORA_WITH_NCCL OFF)
if(TIEDLORA_WITH_CUDA)
  # site-packages/torch/share/cmake/Torch -> site-packages/nvidia/nccl/include
  get_filename_component(_site_packages "${Torch_DIR}/../../../.." ABSOLUTE)
  find_path(TIEDLORA_NCCL_INCLUDE_DIR nccl.h
    HINTS "${_site_packages}/nvidia/nccl/include" ${CUDAToolkit_INCLUDE_DIRS} ENV NCCL_INCLUDE_DIR
    NO_DEFAULT_PATH)
  find_path(TIEDLORA_NCCL_INCLUDE_DIR nccl.h)
  if(TIEDLORA_NCCL_INCLUDE_DIR)
    set(TIEDLORA_WITH_NCCL ON)
    list(APPEND TIEDLORA_DISTRIBUTED_SOURCES "${PROJECT_SOURCE_DIR}/src/llm/distributed/nccl_group.cpp")
    message(STATUS "tiedlora: data parallelism on GPUs over NCCL (nccl.h from ${TIEDLORA_NCCL_INCLUDE_DIR})")
  else()
    message(STATUS "tiedlora: nccl.h not found: CUDA processes cannot train together")
  endif()
endif()

function(tiedlora_configure_distributed target)
  target_compile_definitions(${target} PRIVATE TIEDLORA_WITH_MPI=$<BOOL:${TIEDLORA_WITH_MPI}>
    TIEDLORA_WITH_NCCL=$<BOOL:${TIEDLORA_WITH_NCCL}>)
  if(TIEDLORA_WITH_MPI)
    target_link_libraries(${target} PRIVATE MPI::MPI_CXX)
  endif()
  if(TIEDLORA_WITH_NCCL)
    set_source_files_properties("${PROJECT_SOURCE_DIR}/src/llm/distributed/nccl_group.cpp" TARGET_DIRECTORY ${target}
      PROPERTIES COMPILE_DEFINITIONS USE_C10D_NCCL INCLUDE_DIRECTORIES "${TIEDLORA_NCCL_INCLUDE_DIR}")
    target_link_libraries(${target} PRIVATE CUDA::cudart)
  endif()
endfunction()
