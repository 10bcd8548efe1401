# CUDA plumbing. TIEDLORA_CUDA=AUTO turns CUDA on when nvcc is found and LibTorch was built with CUDA;
# ON makes either missing an error. The kernels (kernels/*.cu) never include torch headers; they are
# compiled by nvcc for sm_80 and sm_90 even on machines without a GPU, so CI proves they build and link.
# One dispatch file per kernel family (src/core/cuda/*_dispatch.cpp) crosses between tensors and kernels; a
# CPU-only build compiles src/core/cuda/dispatch_stub.cpp instead, which throws a clear error.

# LibTorch's CMake sets CMAKE_CUDA_ARCHITECTURES to OFF (it passes its own -gencode flags instead), so the
# architectures of our kernels are a variable of their own, set on the target.
# No kernel uses sm_90a-only instructions (wgmma, TMA) yet, so plain sm_90 code serves Hopper; a kernel that
# does will add 90a here.
set(TIEDLORA_CUDA_ARCHITECTURES "80;90" CACHE STRING "CUDA architectures of tiedlora's kernels")

function(tiedlora_probe_cuda found detail)
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    tiedlora_probe_answer(OFF "nvcc not found")
  elseif(NOT (TARGET torch_cuda OR TORCH_CUDA_LIBRARIES))
    tiedlora_probe_answer(OFF "LibTorch was built without CUDA")
  else()
    tiedlora_probe_answer(ON "${CMAKE_CUDA_COMPILER}, architectures ${TIEDLORA_CUDA_ARCHITECTURES}")
  endif()
endfunction()
tiedlora_optional_feature(CUDA DOC "CUDA kernels" PROBE tiedlora_probe_cuda HINT "nvcc and a CUDA LibTorch")

set(TIEDLORA_KERNEL_SOURCES ${PROJECT_SOURCE_DIR}/kernels/lora_gemm.cu ${PROJECT_SOURCE_DIR}/kernels/lora_merge.cu
  ${PROJECT_SOURCE_DIR}/kernels/effective_b.cu)
if(TIEDLORA_WITH_CUDA)
  enable_language(CUDA)
  # LibTorch's CMake appends -gencode flags for every architecture it supports (sm_50 and up, which nvcc 13
  # no longer accepts) to CMAKE_CUDA_FLAGS; our kernels are built for TIEDLORA_CUDA_ARCHITECTURES only.
  string(REGEX REPLACE "-gencode[ =]arch=[^ ]+" "" CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")
  # Every target that links the kernels (tiedlora_core, the CUDA benchmark) uses LibTorch's shared CUDA runtime,
  # not a second, static copy.
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  find_package(CUDAToolkit REQUIRED)
  add_library(tiedlora_kernels STATIC ${TIEDLORA_KERNEL_SOURCES})
  target_include_directories(tiedlora_kernels PUBLIC ${PROJECT_SOURCE_DIR}/kernels)
  set_target_properties(tiedlora_kernels PROPERTIES POSITION_INDEPENDENT_CODE ON CUDA_SEPARABLE_COMPILATION OFF
    CUDA_ARCHITECTURES "${TIEDLORA_CUDA_ARCHITECTURES}")
  # The cuBLASLt path (kernels/lora_gemm.cu) is the reference and fallback of the fused kernels.
  target_link_libraries(tiedlora_kernels PUBLIC CUDA::cudart CUDA::cublasLt)
  target_compile_options(tiedlora_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo>)
  set(TIEDLORA_DISPATCH_SOURCES ${PROJECT_SOURCE_DIR}/src/core/cuda/lora_dispatch.cpp
    ${PROJECT_SOURCE_DIR}/src/core/cuda/effective_b_dispatch.cpp)
else()
  set(TIEDLORA_DISPATCH_SOURCES "${PROJECT_SOURCE_DIR}/src/core/cuda/dispatch_stub.cpp")
endif()
