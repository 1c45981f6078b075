/*
 * CPU reference of the SelectiveScan op (fp32 only; callers convert fp16/bf16 inputs to fp32 first).
 *
 * Plain C ABI so that Python tests can load libm4r_scan_cpu.so with ctypes and compare it with the
 * PyTorch reference, and so that the GPU self-check can compare the CUDA kernels with it.
 * All tensors are contiguous, in the layouts of the op contract (plugins/selectiveScanPlugin/README.md).
 */
#ifndef M4R_SELECTIVE_SCAN_CPU_H
#define M4R_SELECTIVE_SCAN_CPU_H

#include <stdint.h>

#if defined(_WIN32)
#define M4R_SCAN_CPU_API __declspec(dllexport)
#else
#define M4R_SCAN_CPU_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Return codes shared by the C entry points. */
#define M4R_SCAN_OK 0
#define M4R_SCAN_BAD_ARGUMENT 1

/*
 * u, delta, z: (batch, dim, seqlen); A: (dim, dstate); B, C: (batch, dstate, seqlen); D, deltaBias: (dim).
 * z, D, deltaBias and lengths may be NULL (no gate, no skip term, zero bias, full length).
 * lastOnly = 0: y is (batch, dim, seqlen). lastOnly = 1: y is (batch, dim), the output at position
 * clamp(lengths[b], 1, seqlen) - 1. Returns M4R_SCAN_OK or M4R_SCAN_BAD_ARGUMENT.
 */
M4R_SCAN_CPU_API int m4r_scan_cpu_f32(const float* u, const float* delta, const float* A, const float* B,
    const float* C, const float* D, const float* z, const float* deltaBias, const int32_t* lengths,
    int32_t batch, int32_t dim, int32_t seqlen, int32_t dstate, int32_t deltaSoftplus, int32_t lastOnly,
    float* y);

/* Version of the op contract this library implements ("1"). */
M4R_SCAN_CPU_API const char* m4r_scan_cpu_version(void);

#ifdef __cplusplus
}
#endif

#endif /* M4R_SELECTIVE_SCAN_CPU_H */
