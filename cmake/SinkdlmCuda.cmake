# CUDA settings of the sinkdlm build (included by CMakeLists.txt): which GPUs the kernels are
# compiled for, the CUDA runtime they use, the toolkit/torch version check, and find_package(Torch)
# kept from overriding the first two.
#
# Architectures: sinkdlm's choice wins over torch's. With a CUDA torch, torch's cuda.cmake sets
# CMAKE_CUDA_ARCHITECTURES to OFF and appends its own -gencode list (from TORCH_CUDA_ARCH_LIST, or
# the GPUs it detects) to CMAKE_CUDA_FLAGS, so the kernels would be built for whatever machine
# configured them, on top of ours. sinkdlm_find_torch() undoes both: the list is SINKDLM_CUDA_ARCHS
# or the default below, the same on every machine, and TORCH_CUDA_ARCH_LIST is not read.

# The default: SASS for sm_80 (A100), sm_86 (A10, RTX 30xx), sm_89 (L4, L40, RTX 40xx), sm_90
# (H100, H200) and sm_100 (B200, GB200), plus compute_100 PTX, which GPUs newer than sm_100 compile
# at load time. No arch-specific "a" variant: nothing in cuda/ uses sm_90a (wgmma, TMA, setmaxnreg)
# or sm_100a (tcgen05) instructions, and "a" code runs on that one architecture only. A toolkit
# older than 12.8 knows no sm_100: its PTX is then compute_90.
function(sinkdlm_default_cuda_archs out)
  if(CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.8)
    set(${out} 80-real 86-real 89-real 90-real 100 PARENT_SCOPE)
  else()
    set(${out} 80-real 86-real 89-real 90 PARENT_SCOPE)
  endif()
endfunction()

# enable_language(CUDA) with sinkdlm's settings: CMAKE_CUDA_ARCHITECTURES (SINKDLM_CUDA_ARCHS or
# the default), the shared CUDA runtime, C++17. Also sets SINKDLM_CUDA_ARCHS_STRING, the list
# comma-separated for the build_info() define (a `;` in a definition would split it in several).
# `linked`: whether the kernels go into _C. When they do not (a CPU torch: a compile check only),
# the default is the oldest architecture of the list alone, sm_80, which has the fewest
# instructions: a fifth of the compile time, and scripts/cuda-build-check.sh builds them all.
macro(sinkdlm_enable_cuda linked)
  if(SINKDLM_CUDA_ARCHS)
    foreach(_arch IN LISTS SINKDLM_CUDA_ARCHS)
      if(NOT _arch MATCHES "^([0-9]+a?(-real|-virtual)?|native|all|all-major)$")
        message(FATAL_ERROR
          "sinkdlm: SINKDLM_CUDA_ARCHS entry '${_arch}' is not a CMake CUDA architecture: use "
          "e.g. \"80;90a\" (SASS + PTX of each), \"90-real\" (SASS only), \"100-virtual\" (PTX "
          "only) or native (the GPUs of this machine).")
      endif()
    endforeach()
    set(CMAKE_CUDA_ARCHITECTURES ${SINKDLM_CUDA_ARCHS})
  else()
    # Set before enable_language, so that it makes no cache entry of its own (which would outlive
    # the unset in sinkdlm_find_torch); the default, which depends on nvcc's version, follows.
    set(CMAKE_CUDA_ARCHITECTURES 80)
  endif()
  # Shared, as torch links it: a static copy inside _C next to torch's libcudart.so would be a
  # second runtime in the process, with its own state (error state, current device).
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  enable_language(CUDA)
  if(NOT SINKDLM_CUDA_ARCHS AND ${linked})
    sinkdlm_default_cuda_archs(CMAKE_CUDA_ARCHITECTURES)
  elseif(NOT SINKDLM_CUDA_ARCHS)
    set(CMAKE_CUDA_ARCHITECTURES 80-real)
  endif()
  set(CMAKE_CUDA_STANDARD 17)  # kernels include no torch headers
  if(DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    message(STATUS "sinkdlm: TORCH_CUDA_ARCH_LIST=$ENV{TORCH_CUDA_ARCH_LIST} is not used for "
                   "sinkdlm's kernels; set SINKDLM_CUDA_ARCHS to choose their architectures")
  endif()
  list(JOIN CMAKE_CUDA_ARCHITECTURES "," SINKDLM_CUDA_ARCHS_STRING)
endmacro()

# Kernels compiled by one CUDA major version and run by another's runtime fail at load or launch
# time, far from the cause: refuse the pair at configure time instead.
function(sinkdlm_check_cuda_versions torch_cuda)
  string(REGEX MATCH "^[0-9]+" _nvcc_major "${CMAKE_CUDA_COMPILER_VERSION}")
  string(REGEX MATCH "^[0-9]+" _torch_major "${torch_cuda}")
  if(NOT _nvcc_major STREQUAL _torch_major)
    message(FATAL_ERROR
      "sinkdlm: the CUDA toolkit is ${CMAKE_CUDA_COMPILER_VERSION} (${CMAKE_CUDA_COMPILER}) but "
      "torch was built with CUDA ${torch_cuda}: the major versions must match. Point CUDACXX at "
      "a CUDA ${_torch_major}.x nvcc, or install a torch built for CUDA ${_nvcc_major}.")
  endif()
endfunction()

# find_package(Torch REQUIRED), keeping sinkdlm's CUDA settings (see the top of this file). A
# macro, so that TORCH_LIBRARIES & co. land in the caller's scope.
macro(sinkdlm_find_torch)
  if(CMAKE_CUDA_COMPILER_LOADED)
    set(_sinkdlm_cuda_flags "${CMAKE_CUDA_FLAGS}")
    set(_sinkdlm_cuda_archs "${CMAKE_CUDA_ARCHITECTURES}")
    # Unset, or torch warns that it ignores it. A TORCH_CUDA_ARCH_LIST (of no consequence: the
    # flags made from it are dropped below) spares torch its GPU detection, a try_run that needs
    # CMAKE_CUDA_ARCHITECTURES.
    unset(CMAKE_CUDA_ARCHITECTURES)
    set(TORCH_CUDA_ARCH_LIST 8.0)
    # torch's FindCUDA looks for the toolkit next to the nvcc on PATH, which may be a wrapper
    # script (/usr/local/bin/nvcc); the CUDA language already knows the real toolkit.
    if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR AND CMAKE_CUDA_COMPILER_TOOLKIT_ROOT)
      set(CUDA_TOOLKIT_ROOT_DIR "${CMAKE_CUDA_COMPILER_TOOLKIT_ROOT}")
    endif()
  elseif(SINKDLM_TORCH_CUDA)
    include(CheckLanguage)
    check_language(CUDA)
  endif()
  if(SINKDLM_TORCH_CUDA AND NOT CMAKE_CUDA_COMPILER)
    message(FATAL_ERROR
      "sinkdlm: torch is a CUDA ${SINKDLM_TORCH_CUDA} build, and building against it needs a "
      "CUDA ${SINKDLM_TORCH_CUDA} toolkit (torch's CMake config requires one), but no nvcc was "
      "found. Install the toolkit and put its nvcc on PATH or in CUDACXX.")
  endif()
  find_package(Torch REQUIRED)
  if(CMAKE_CUDA_COMPILER_LOADED)
    set(CMAKE_CUDA_FLAGS "${_sinkdlm_cuda_flags}")
    set(CMAKE_CUDA_ARCHITECTURES "${_sinkdlm_cuda_archs}")
    unset(TORCH_CUDA_ARCH_LIST)
  endif()
  if(CMAKE_CUDA_COMPILER_LOADED AND SINKDLM_TORCH_CUDA)
    message(STATUS "sinkdlm: CUDA kernels are built for ${CMAKE_CUDA_ARCHITECTURES} "
                   "(SINKDLM_CUDA_ARCHS; torch's -gencode flags above are not used)")
  endif()
endmacro()
