# Third-party dependencies, all Debian 12 packages (scripts/setup.sh installs them).
find_package(Threads REQUIRED)
find_package(fmt REQUIRED)
find_package(spdlog REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(CLI11 REQUIRED)
# oneDNN: Debian's dnnl-config.cmake insists on OpenCL (its GPU runtime), which the
# CPU engine never uses, so find the library and headers directly.
find_path(DNNL_INCLUDE_DIR oneapi/dnnl/dnnl.hpp)
find_library(DNNL_LIBRARY NAMES dnnl)
if(NOT DNNL_INCLUDE_DIR OR NOT DNNL_LIBRARY)
  message(FATAL_ERROR "oneDNN not found: apt-get install libdnnl-dev")
endif()
add_library(dtrain_dnnl INTERFACE)
target_include_directories(dtrain_dnnl SYSTEM INTERFACE ${DNNL_INCLUDE_DIR})
target_link_libraries(dtrain_dnnl INTERFACE ${DNNL_LIBRARY})
find_package(OpenMP REQUIRED)

# xxHash (XXH3-64): checkpoint shard checksums. Debian's libxxhash-dev ships no CMake
# config, so find the header and library directly.
find_path(XXHASH_INCLUDE_DIR xxhash.h)
find_library(XXHASH_LIBRARY NAMES xxhash)
if(NOT XXHASH_INCLUDE_DIR OR NOT XXHASH_LIBRARY)
  message(FATAL_ERROR "xxHash not found: apt-get install libxxhash-dev")
endif()
add_library(dtrain_xxhash INTERFACE)
target_include_directories(dtrain_xxhash SYSTEM INTERFACE ${XXHASH_INCLUDE_DIR})
target_link_libraries(dtrain_xxhash INTERFACE ${XXHASH_LIBRARY})

# OpenBLAS (the pthread build): GEMM for linear, matmul, LSTM and im2col convolution.
find_path(OPENBLAS_INCLUDE_DIR cblas.h
  PATHS /usr/include/x86_64-linux-gnu/openblas-pthread /usr/include/openblas
  NO_DEFAULT_PATH)
find_library(OPENBLAS_LIBRARY NAMES openblas
  PATHS /usr/lib/x86_64-linux-gnu/openblas-pthread /usr/lib/x86_64-linux-gnu
  NO_DEFAULT_PATH)
if(NOT OPENBLAS_INCLUDE_DIR OR NOT OPENBLAS_LIBRARY)
  message(FATAL_ERROR "OpenBLAS not found: apt-get install libopenblas-dev libopenblas0-pthread")
endif()
add_library(dtrain_openblas INTERFACE)
target_include_directories(dtrain_openblas SYSTEM INTERFACE ${OPENBLAS_INCLUDE_DIR})
target_link_libraries(dtrain_openblas INTERFACE ${OPENBLAS_LIBRARY})

if(DTRAIN_BUILD_TESTS)
  find_package(GTest REQUIRED)
  include(GoogleTest)
endif()
