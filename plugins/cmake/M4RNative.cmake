# Project-wide settings for the m4r native code, shared by the repository's top-level CMakeLists.txt and
# by plugins/CMakeLists.txt when plugins/ is the source dir itself (as in an installed wheel, where
# `m4r build-plugin` configures the shipped copy of plugins/).

set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
set(CMAKE_CXX_EXTENSIONS OFF)
if(NOT CMAKE_BUILD_TYPE AND NOT CMAKE_CONFIGURATION_TYPES)
  set(CMAKE_BUILD_TYPE Release CACHE STRING "Build type" FORCE)
endif()
# Export only what each library declares with visibility("default").
set(CMAKE_CXX_VISIBILITY_PRESET hidden)
set(CMAKE_CUDA_VISIBILITY_PRESET hidden)
set(CMAKE_VISIBILITY_INLINES_HIDDEN ON)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)

option(M4R_WITH_CUDA "Build the CUDA kernels and the TensorRT plugin when nvcc is found" ON)
option(M4R_REQUIRE_CUDA "Fail instead of building the CPU reference only when nvcc is not found" OFF)
option(M4R_BUILD_TESTS "Build the ctest tests" ON)
set(TensorRT_ROOT "$ENV{TensorRT_ROOT}" CACHE PATH "TensorRT install or SDK root (include/, lib/)")

# ---- CUDA (optional) ---------------------------------------------------------------------------------------
set(M4R_HAVE_CUDA OFF)
if(M4R_WITH_CUDA)
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    # Turing, Ampere (A100 and consumer), Jetson Orin, Ada, Hopper. Restrict with -DCMAKE_CUDA_ARCHITECTURES=80.
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 75 80 86 87 89 90)
    endif()
    enable_language(CUDA)
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    find_package(CUDAToolkit REQUIRED)
    set(M4R_HAVE_CUDA ON)
  elseif(M4R_REQUIRE_CUDA)
    message(FATAL_ERROR "m4r: M4R_REQUIRE_CUDA is ON but no CUDA compiler was found (put nvcc on PATH or set CUDACXX)")
  else()
    message(STATUS "m4r: nvcc not found: building the CPU reference only")
  endif()
endif()

# ---- TensorRT (optional) -----------------------------------------------------------------------------------
# HINTS (not PATHS) so that an explicit TensorRT_ROOT wins over system copies.
find_path(TensorRT_INCLUDE_DIR NvInferRuntime.h
  HINTS ${TensorRT_ROOT} PATH_SUFFIXES include include/x86_64-linux-gnu include/aarch64-linux-gnu)
find_library(TensorRT_LIBRARY NAMES nvinfer
  HINTS ${TensorRT_ROOT} PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu lib/aarch64-linux-gnu)

if(M4R_BUILD_TESTS)
  enable_testing()
endif()

# Every library lands in <build>/lib whichever directory is the source root (m4r_export.trt.native looks there).
set(CMAKE_LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/lib)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)

# ---- ONNX Runtime (optional): headers for the custom-op library, the library for the C++ example ------------
# ONNXRUNTIME_ROOT: an ONNX Runtime release folder, or scripts/fetch_ort_headers.sh DEST (Debian's
# libonnxruntime-dev headers + links to the pip wheel's libonnxruntime.so.1.*). The custom-op library needs
# only the headers; recipes/cpp/ort_recommend also links libonnxruntime.
set(ONNXRUNTIME_ROOT "$ENV{ONNXRUNTIME_ROOT}" CACHE PATH "ONNX Runtime release or header folder (include/, lib/)")
find_path(ONNXRUNTIME_INCLUDE_DIR onnxruntime_cxx_api.h
  HINTS ${ONNXRUNTIME_ROOT} PATH_SUFFIXES include include/onnxruntime include/onnxruntime/core/session)
find_library(ONNXRUNTIME_LIBRARY NAMES onnxruntime HINTS ${ONNXRUNTIME_ROOT} PATH_SUFFIXES lib lib64)
