# `cmake --install build --prefix P`: the libraries a C++ application links (common,
# engine, comm, parallel), their public headers, and dtrainConfig.cmake with its
# targets and version files, so an application outside the tree writes
#   find_package(dtrain REQUIRED)
#   target_link_libraries(app PRIVATE dtrain::engine dtrain::comm dtrain::parallel)
# (examples/custom_model). The libraries are static; the third-party libraries they
# use privately (oneDNN, OpenBLAS, xxHash, cuDNN, NCCL) travel as small interface
# targets holding their absolute paths on this machine, and the CMake packages
# (fmt, nlohmann_json, spdlog, OpenMP, Threads, CUDAToolkit) are found again by
# dtrainConfig.cmake through find_dependency. All in the "dtrain_dev" component
# (`--component dtrain_dev` installs only this). Not here: the MPI and NCCL
# communicator libraries, the coordinator, shared libraries.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(_dtrain_public_libs dtrain_common dtrain_engine dtrain_comm dtrain_parallel)
set(_dtrain_include_dirs
  dtrain_common ${PROJECT_SOURCE_DIR}/engine/common/include
  dtrain_engine ${PROJECT_SOURCE_DIR}/engine/include
  dtrain_comm ${PROJECT_SOURCE_DIR}/comm/include
  dtrain_parallel ${PROJECT_SOURCE_DIR}/parallel/include)
# The include folders are source paths in the build; the installed copy points at
# <prefix>/include instead.
while(_dtrain_include_dirs)
  list(POP_FRONT _dtrain_include_dirs _target _dir)
  set_target_properties(${_target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES
    "$<BUILD_INTERFACE:${_dir}>;$<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>")
  string(REPLACE "dtrain_" "" _export_name ${_target})
  set_target_properties(${_target} PROPERTIES EXPORT_NAME ${_export_name})
  install(DIRECTORY ${_dir}/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} COMPONENT dtrain_dev)
endwhile()

set(_dtrain_private_libs dtrain_xxhash dtrain_dnnl dtrain_openblas)
if(DTRAIN_CUDA_ENABLED)
  list(APPEND _dtrain_private_libs dtrain_cudnn dtrain_nccl)
endif()
install(TARGETS ${_dtrain_public_libs} ${_dtrain_private_libs} EXPORT dtrainTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT dtrain_dev)
install(EXPORT dtrainTargets NAMESPACE dtrain:: FILE dtrainTargets.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/dtrain COMPONENT dtrain_dev)

set(DTRAIN_CONFIG_CUDA ${DTRAIN_CUDA_ENABLED})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/dtrainConfig.cmake.in
  ${PROJECT_BINARY_DIR}/dtrainConfig.cmake INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/dtrain)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/dtrainConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/dtrainConfig.cmake ${PROJECT_BINARY_DIR}/dtrainConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/dtrain COMPONENT dtrain_dev)
