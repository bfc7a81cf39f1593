# DTRAIN_CUDA=AUTO|ON|OFF: detect the CUDA toolkit and, when it is there, build the
# CUDA backend into dtrain_engine (engine/src/cuda/). Sets DTRAIN_CUDA_ENABLED and
# dtrain_cuda_sources(<target> <files...>) for the targets that compile CUDA code.
#
# Architectures: DTRAIN_CUDA_ARCHITECTURES (default "80;90": A100 and H100). The CUDA
# sources and the C++ sources that call the CUDA runtime are built with warnings as
# errors always (not only under DTRAIN_WERROR), so a CUDA break fails CI.
set(DTRAIN_CUDA_ENABLED OFF)
set(DTRAIN_CUDA_ARCHITECTURES "80;90" CACHE STRING "CUDA architectures for the CUDA backend")
if(NOT DTRAIN_CUDA STREQUAL "OFF")
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  find_package(CUDAToolkit QUIET)
  if(CMAKE_CUDA_COMPILER AND CUDAToolkit_FOUND)
    set(DTRAIN_CUDA_ENABLED ON)
    message(STATUS "dtrain: CUDA toolkit ${CUDAToolkit_VERSION} at ${CUDAToolkit_BIN_DIR}")
  elseif(DTRAIN_CUDA STREQUAL "ON")
    message(FATAL_ERROR "DTRAIN_CUDA=ON but no CUDA toolkit was found (looked for nvcc and CUDAToolkit)")
  else()
    message(STATUS "dtrain: no CUDA toolkit found; building the CPU backend only")
  endif()
endif()

if(DTRAIN_CUDA_ENABLED)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES ${DTRAIN_CUDA_ARCHITECTURES})
  endif()
  enable_language(CUDA)
  # CMake 3.25 does not know nvcc's C++20 flag (nvcc 12+ has it): teach it.
  if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  set(CMAKE_CUDA_EXTENSIONS OFF)

  # cuDNN and NCCL ship beside the toolkit (/usr/local/cuda) or as Debian/NVIDIA
  # packages (/usr/include, /usr/lib/x86_64-linux-gnu).
  set(_dtrain_cuda_hints ${CUDAToolkit_LIBRARY_DIR} ${CUDAToolkit_LIBRARY_ROOT}/lib64
    /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu)
  find_path(DTRAIN_CUDNN_INCLUDE_DIR cudnn.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/include)
  find_library(DTRAIN_CUDNN_LIBRARY cudnn HINTS ${_dtrain_cuda_hints})
  find_path(DTRAIN_NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/include)
  find_library(DTRAIN_NCCL_LIBRARY nccl HINTS ${_dtrain_cuda_hints})
  foreach(_v DTRAIN_CUDNN_INCLUDE_DIR DTRAIN_CUDNN_LIBRARY DTRAIN_NCCL_INCLUDE_DIR
      DTRAIN_NCCL_LIBRARY)
    if(NOT ${_v})
      message(FATAL_ERROR "dtrain: the CUDA backend needs cuDNN 9 and NCCL; ${_v} was not "
        "found (configure with -DDTRAIN_CUDA=OFF to build the CPU backend only)")
    endif()
  endforeach()
  if(NOT TARGET dtrain_cudnn)
    add_library(dtrain_cudnn INTERFACE)
    target_include_directories(dtrain_cudnn SYSTEM INTERFACE ${DTRAIN_CUDNN_INCLUDE_DIR})
    target_link_libraries(dtrain_cudnn INTERFACE ${DTRAIN_CUDNN_LIBRARY})
    add_library(dtrain_nccl INTERFACE)
    target_include_directories(dtrain_nccl SYSTEM INTERFACE ${DTRAIN_NCCL_INCLUDE_DIR})
    target_link_libraries(dtrain_nccl INTERFACE ${DTRAIN_NCCL_LIBRARY} CUDA::cudart)
  endif()
  message(STATUS "dtrain: CUDA backend for sm ${CMAKE_CUDA_ARCHITECTURES}; cuDNN "
    "${DTRAIN_CUDNN_LIBRARY}, NCCL ${DTRAIN_NCCL_LIBRARY}")
endif()

# Adds CUDA-backend sources (.cu and the .cc files that call the CUDA runtime) to
# `target` with strict warnings: nvcc -Werror all-warnings, cross-execution-space calls
# as errors, and the host compiler's -Wall -Wextra -Werror on both.
function(dtrain_cuda_sources target)
  target_sources(${target} PRIVATE ${ARGN})
  foreach(src ${ARGN})
    if(src MATCHES "\\.cu$")
      set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS
        "-Werror=all-warnings;--Werror=cross-execution-space-call;-Xcompiler=-Wall,-Wextra,-Wno-unused-parameter,-Werror;--expt-relaxed-constexpr")
    else()
      set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS "-Werror")
    endif()
  endforeach()
endfunction()
