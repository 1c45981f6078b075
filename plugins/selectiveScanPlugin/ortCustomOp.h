/*
 * libm4r_ort_ops.so: ONNX Runtime custom-op library for m4r::SelectiveScan (CPU execution provider).
 *
 *   Python:  so = onnxruntime.SessionOptions(); so.register_custom_ops_library("libm4r_ort_ops.so")
 *   C/C++:   Ort::SessionOptions::RegisterCustomOpsLibrary(ORT_TSTR("libm4r_ort_ops.so"))
 *   Triton:  model_operations { op_library_filename: "/path/libm4r_ort_ops.so" }
 *
 * Besides ONNX Runtime's entry point the library exports two introspection functions (ctypes, tests).
 */
#ifndef M4R_ORT_CUSTOM_OP_H
#define M4R_ORT_CUSTOM_OP_H

#include <stdint.h>

#define M4R_ORT_OPS_DOMAIN "m4r"

#if defined(_WIN32)
#define M4R_ORT_OPS_API __declspec(dllexport)
#else
#define M4R_ORT_OPS_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Number of SelectiveScan node executions served by this library in this process (proves it ran). */
M4R_ORT_OPS_API int64_t m4r_ort_ops_compute_calls(void);

/* ORT_API_VERSION of the headers it was built with: it needs onnxruntime >= 1.<this>. */
M4R_ORT_OPS_API int32_t m4r_ort_ops_api_version(void);

#ifdef __cplusplus
}
#endif

#endif /* M4R_ORT_CUSTOM_OP_H */
