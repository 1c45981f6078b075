/*
 * Per-step math of the selective scan, shared by the CUDA kernels and the CPU reference.
 *
 * Keeping these few lines in one header is what makes the CPU reference a meaningful oracle for the
 * kernels: both evaluate the same expressions in the same order, in fp32, so they differ only by the
 * device's exp/log1p rounding, not by a re-derivation of the formulas.
 */
#ifndef M4R_SELECTIVE_SCAN_MATH_H
#define M4R_SELECTIVE_SCAN_MATH_H

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define M4R_HD __host__ __device__ __forceinline__
#else
#define M4R_HD inline
#endif

namespace m4r
{
namespace scan
{

//! Largest state size (N) the kernels keep in registers. The CPU reference has no limit.
constexpr int32_t kMaxDState = 64;

//! softplus with the threshold PyTorch (F.softplus) and mamba-ssm use: exact identity above 20.
M4R_HD float softplus(float x)
{
    return x <= 20.F ? log1pf(expf(x)) : x;
}

//! SiLU(z) = z * sigmoid(z).
M4R_HD float silu(float z)
{
    return z / (1.F + expf(-z));
}

//! dt = delta + delta_bias, then softplus when the node's delta_softplus attribute is set.
M4R_HD float stepSize(float delta, float deltaBias, bool deltaSoftplus)
{
    float const dt = delta + deltaBias;
    return deltaSoftplus ? softplus(dt) : dt;
}

//! exp() of the state decay dt * A (<= 0 when dt >= 0). The kernels evaluate it B*D*L*N times, so on the
//! device it uses the SFU intrinsic __expf, whose maximum error the CUDA Math API documents as
//! 2 + floor(|1.173 * x|) ulp: 2 ulp near 0, 13 ulp at |x| = 10 (~8e-7 relative), i.e. it grows with |x|.
//! Each step's decay error enters h multiplicatively, so over L steps the relative error of h is at most
//! about L * (2 + floor(1.173 * max|x|)) * 2^-24 (~8e-4 for L = 1000 and |x| <= 10, a loose bound since
//! older steps decay away); the GPU self-check measures it at L = 1000 against that bound
//! (m4r_export/trt/selftest.py). The host uses libm. This is the only place where device and host math differ.
M4R_HD float expDecay(float x)
{
#if defined(__CUDA_ARCH__)
    return __expf(x);
#else
    return expf(x);
#endif
}

//! One state update: h = exp(dt * A) * h + (dt * u) * B. `dtu` is dt * u, hoisted out of the N loop.
M4R_HD float updateState(float h, float dt, float a, float dtu, float b)
{
    return expDecay(dt * a) * h + dtu * b;
}

//! Output of one position once hc = sum_n(h * C) is known, before the gate: hc + D * u.
M4R_HD float skipOutput(float hc, float d, float u)
{
    return hc + d * u;
}

//! The SiLU gate applied to the output: y * silu(z).
M4R_HD float gate(float y, float z)
{
    return y * silu(z);
}

//! Index of the position mode "last" reports for a row: clamp(length, 1, L) - 1.
M4R_HD int32_t lastIndex(int32_t length, int32_t seqLen)
{
    int32_t const n = length < 1 ? 1 : (length > seqLen ? seqLen : length);
    return n - 1;
}

} // namespace scan
} // namespace m4r

#endif // M4R_SELECTIVE_SCAN_MATH_H
