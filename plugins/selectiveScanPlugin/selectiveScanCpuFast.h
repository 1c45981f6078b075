/*
 * Optimised CPU kernel of the SelectiveScan op: vectorised, threaded, forward (fp32/fp16/bf16 I/O, fp32
 * state) and backward (fp32). C ABI of libm4r_scan_native.so (CMake target m4r_scan_native; the object
 * library m4r_scan_native_objects links the same code into other libraries, e.g. the ONNX Runtime
 * custom-op library).
 *
 * Same contract as the CPU reference (selectiveScanCpu.h, plugins/selectiveScanPlugin/README.md); the
 * reference stays the readable definition. Differences to the reference are fp32 rounding only: the decay
 * exp(dt * A) is a base-2 polynomial on dt * (A log2 e) clamped at M4R_SCAN_DECAY_EXP_MIN (as every m4r
 * backend clamps), the forward's state update is one fused multiply-add where the CPU has FMA, and the
 * read-out sums the states in four partial sums (docs/native-cpu.md, "Rounding": measured errors).
 *
 * All tensors are contiguous, in the layouts of the op contract:
 *   u, delta, z: (batch, dim, seqlen)    A: (dim, dstate) fp32    B, C: (batch, dstate, seqlen)
 *   D, deltaBias: (dim) fp32             lengths: (batch) int32
 *   y: (batch, dim, seqlen) for lastOnly = 0; (batch, dim) for lastOnly = 1, the output at position
 *      clamp(lengths[b], 1, seqlen) - 1 (seqlen - 1 without lengths). lastOnly = 0 ignores lengths
 *      (the scan is causal); lastOnly = 1 does no work after a row's last valid position.
 * z, D, deltaBias and lengths may be NULL (no gate, no skip term, zero bias, full length).
 * u, delta, B, C, z and y have the element type `dtype` (M4R_SCAN_F32/F16/BF16); A, D, deltaBias are fp32.
 *
 * Threads: numThreads > 0 uses at most that many threads; 0 uses the library default, which is
 * $M4R_SCAN_THREADS when set, else std::thread::hardware_concurrency(). Small problems run on fewer
 * threads. The calls are reentrant; all scratch memory is allocated per call.
 *
 * Denormals: every call computes with flush-to-zero and denormals-are-zero set on each thread that works on
 * it (x86-64 MXCSR FTZ+DAZ, aarch64 FPCR.FZ; a no-op elsewhere) and restores the calling thread's previous
 * mode before it returns, whatever mode the caller runs in (ONNX Runtime's pool threads, Python without
 * torch.set_flush_denormal). The scan's state can decay into the fp32 denormal range, where arithmetic is
 * many times slower; results differ from an unflushed loop only by amounts below FLT_MIN (1.2e-38) per term.
 *
 * Return codes: M4R_SCAN_OK (0), M4R_SCAN_BAD_ARGUMENT (1: a required pointer is NULL, a size < 1, an
 * unknown dtype), M4R_SCAN_NO_MEMORY (2), M4R_SCAN_INTERNAL_ERROR (3: a thread could not be started).
 */
#ifndef M4R_SELECTIVE_SCAN_CPU_FAST_H
#define M4R_SELECTIVE_SCAN_CPU_FAST_H

#include <stdint.h>

#if defined(_WIN32)
#define M4R_SCAN_NATIVE_API __declspec(dllexport)
#else
#define M4R_SCAN_NATIVE_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped on any incompatible change of the functions below; m4r_scan_native_abi_version() returns it. */
#define M4R_SCAN_NATIVE_ABI_VERSION 1

#ifndef M4R_SCAN_OK
#define M4R_SCAN_OK 0
#define M4R_SCAN_BAD_ARGUMENT 1
#endif
#define M4R_SCAN_NO_MEMORY 2
#define M4R_SCAN_INTERNAL_ERROR 3

/* Element types of u, delta, B, C, z, y (and of the gradients of the backward pass, which is fp32 only). */
#define M4R_SCAN_F32 0
#define M4R_SCAN_F16 1  /* IEEE binary16 */
#define M4R_SCAN_BF16 2 /* bfloat16 */

/* Decay exponents dt * A below this are clamped before exp() (exp(-80) = 1.8e-35), as in every backend. */
#define M4R_SCAN_DECAY_EXP_MIN (-80.0f)

/* Forward pass: y = SelectiveScan(u, delta, A, B, C, D, z, deltaBias, lengths). */
M4R_SCAN_NATIVE_API int m4r_scan_native_forward(const void* u, const void* delta, const float* A, const void* B,
    const void* C, const float* D, const void* z, const float* deltaBias, const int32_t* lengths, int32_t batch,
    int32_t dim, int32_t seqlen, int32_t dstate, int32_t deltaSoftplus, int32_t lastOnly, int32_t dtype, void* y,
    int32_t numThreads);

/*
 * Backward pass (fp32): given dy (the shape of y), writes the gradients of the loss with respect to every
 * input. du, ddelta, dz: (batch, dim, seqlen); dA: (dim, dstate); dB, dC: (batch, dstate, seqlen);
 * dD, dDeltaBias: (dim). Every gradient buffer is overwritten (not accumulated into). dD, dz and dDeltaBias
 * may be NULL: that gradient is then not computed (they must be NULL when D, z, deltaBias are). du, ddelta,
 * dA, dB, dC are required. The forward states are recomputed; nothing is kept between the forward and backward calls.
 * Positions after a row's last valid position in lastOnly mode get zero gradients.
 */
M4R_SCAN_NATIVE_API int m4r_scan_native_backward_f32(const float* u, const float* delta, const float* A,
    const float* B, const float* C, const float* D, const float* z, const float* deltaBias, const int32_t* lengths,
    int32_t batch, int32_t dim, int32_t seqlen, int32_t dstate, int32_t deltaSoftplus, int32_t lastOnly,
    const float* dy, float* du, float* ddelta, float* dA, float* dB, float* dC, float* dD, float* dz,
    float* dDeltaBias, int32_t numThreads);

/* M4R_SCAN_NATIVE_ABI_VERSION of the loaded library (check it before calling through dlsym/ctypes). */
M4R_SCAN_NATIVE_API int m4r_scan_native_abi_version(void);

/* Version of the op contract this library implements ("1"). */
M4R_SCAN_NATIVE_API const char* m4r_scan_native_contract_version(void);

/* The instruction set the forward runs on this CPU: "avx512" (16 lanes; the backward then runs "avx2+fma"),
 * "avx2+fma", "generic" (SSE2 / NEON / scalar). $M4R_SCAN_GENERIC forces "generic", $M4R_SCAN_NO_AVX512
 * rules out "avx512" (set to any value). */
M4R_SCAN_NATIVE_API const char* m4r_scan_native_isa(void);

/* Threads used when a call passes numThreads = 0 (see above). */
M4R_SCAN_NATIVE_API int m4r_scan_native_default_threads(void);

#ifdef __cplusplus
}
#endif

#endif /* M4R_SELECTIVE_SCAN_CPU_FAST_H */
