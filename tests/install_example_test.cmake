# ctest InstallCustomModelExample: installs this build into a temporary prefix
# (cmake --install --component dtrain_dev), configures and builds
# examples/custom_model out of tree against it with find_package(dtrain) (ccache as
# the compiler launcher when it is there), runs it (2 ranks as threads) and checks
# that the loss of the last epoch is below the first one and the accuracy is printed
# and above 0.8 (3 classes: chance is ~0.33).
# Inputs: -DBUILD_DIR= -DSOURCE_DIR= -DWORK_DIR= -DGENERATOR=
function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${rc}):\n${out}\n${err}")
  endif()
  set(STEP_OUTPUT "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)
run_step("install" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix} --component dtrain_dev)
find_program(CCACHE ccache)
set(launcher "")
if(CCACHE)
  set(launcher -DCMAKE_CXX_COMPILER_LAUNCHER=${CCACHE})
endif()
run_step("configure the example" ${CMAKE_COMMAND} -S ${SOURCE_DIR}/examples/custom_model
  -B ${WORK_DIR}/build -G ${GENERATOR} -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=${prefix}
  ${launcher})
run_step("build the example" ${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run_step("run the example" ${WORK_DIR}/build/custom_model)
message(STATUS "${STEP_OUTPUT}")

string(REGEX MATCHALL "loss [0-9.]+" losses "${STEP_OUTPUT}")
list(LENGTH losses n)
if(n LESS 2)
  message(FATAL_ERROR "expected a loss per epoch, got:\n${STEP_OUTPUT}")
endif()
list(GET losses 0 first)
list(GET losses -1 last)
string(REPLACE "loss " "" first ${first})
string(REPLACE "loss " "" last ${last})
if(NOT last LESS first)
  message(FATAL_ERROR "the loss did not decrease: first epoch ${first}, last ${last}")
endif()
if(NOT STEP_OUTPUT MATCHES "accuracy ([0-9.]+)")
  message(FATAL_ERROR "no accuracy printed:\n${STEP_OUTPUT}")
endif()
if(CMAKE_MATCH_1 LESS 0.8)
  message(FATAL_ERROR "accuracy ${CMAKE_MATCH_1} is below 0.8")
endif()
