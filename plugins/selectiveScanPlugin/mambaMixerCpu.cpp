// Fused Mamba mixer, one batch row per call (mambaMixerCpu.h). Buffers of one row stay in a thread-local scratch
// (about 12 * seqlen * d_inner floats: 1.2 MB at seqlen 200, d_inner 128), so the whole chain runs while the row
// is cache-resident; only x and y touch the caller's memory.
#include "mambaMixerCpu.h"
#include "selectiveScanCpuFast.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

namespace
{
typedef float MVec __attribute__((vector_size(8 * sizeof(float))));
typedef int32_t MVecI __attribute__((vector_size(8 * sizeof(int32_t))));

namespace generic
{
#include "mambaMixerGemm.inl"
} // namespace generic

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define M4R_MIXER_HAVE_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2
{
#include "mambaMixerGemm.inl"
} // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

struct Fns
{
    decltype(&generic::gemm) gemm;
    decltype(&generic::siluInPlace) silu;
};

Fns const& fns()
{
    static Fns const fn = [] {
#if defined(M4R_MIXER_HAVE_AVX2)
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        {
            return Fns{&avx2::gemm, &avx2::siluInPlace};
        }
#endif
        return Fns{&generic::gemm, &generic::siluInPlace};
    }();
    return fn;
}

} // namespace

extern "C" void m4r_mixer_transpose(float const* in, int64_t rows, int64_t cols, float* out)
{
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
            out[c * rows + r] = in[r * cols + c];
}

extern "C" int m4r_mixer_forward_row(
    M4RMixerWeights const* w, float const* x, int32_t seqlen, int32_t length, int32_t last_only, float* y)
{
    if (w == nullptr || x == nullptr || y == nullptr || seqlen < 1 || w->d_model < 1 || w->d_inner < 1
        || w->d_state < 1 || w->dt_rank < 1 || w->d_conv < 1)
    {
        return 1;
    }
    int64_t const L = last_only ? std::clamp<int64_t>(length, 1, seqlen) : seqlen;
    int64_t const dm = w->d_model, di = w->d_inner, n = w->d_state, r = w->dt_rank, k = w->d_conv;
    int64_t const nx = r + 2 * n;
    auto const gemm = fns().gemm;
    thread_local std::vector<float> scratch;
    size_t const need = static_cast<size_t>(L * (9 * di + nx + 2 * n) + di); // the buffers below
    try
    {
        if (scratch.size() < need)
            scratch.resize(need);
    }
    catch (std::bad_alloc const&)
    {
        return 2;
    }
    float* xz = scratch.data();   // (L, 2 di)  time-major: [x | z]
    float* ut = xz + L * 2 * di;  // (L, di)    conv + SiLU, time-major
    float* ucf = ut + L * di;     // (di, L)    the same, channel-first (scan input)
    float* zcf = ucf + L * di;    // (di, L)
    float* dt = zcf + L * di;     // (L, di)    dt_proj output, time-major
    float* xdbl = dt + L * di;    // (L, r + 2n)
    float* dcf = xdbl + L * nx;   // (di, L)
    float* bcf = dcf + L * di;    // (n, L)
    float* ccf = bcf + L * n;     // (n, L)
    float* ycf = ccf + L * n;     // (di, L) or (di)
    float* yt = ycf + L * di;     // (L, di)

    gemm(x, dm, w->in_proj_t, 2 * di, xz, 2 * di, L, 2 * di, dm);
    // causal depthwise conv over time (zeros before position 0) + SiLU
    for (int64_t t = 0; t < L; ++t)
    {
        float* o = ut + t * di;
        for (int64_t c = 0; c < di; ++c)
            o[c] = w->conv_b != nullptr ? w->conv_b[c] : 0.0f;
        for (int64_t j = 0; j < k; ++j)
        {
            int64_t const s = t - (k - 1) + j;
            if (s < 0)
                continue;
            float const* in = xz + s * 2 * di;
            for (int64_t c = 0; c < di; ++c)
                o[c] += w->conv_w[c * k + j] * in[c];
        }
    }
    fns().silu(ut, L * di);
    m4r_mixer_transpose(ut, L, di, ucf);
    for (int64_t t = 0; t < L; ++t)
        for (int64_t c = 0; c < di; ++c)
            zcf[c * L + t] = xz[t * 2 * di + di + c];
    gemm(ut, di, w->x_proj_t, nx, xdbl, nx, L, nx, di);
    gemm(xdbl, nx, w->dt_proj_t, di, dt, di, L, di, r);
    m4r_mixer_transpose(dt, L, di, dcf);
    for (int64_t t = 0; t < L; ++t)
        for (int64_t s = 0; s < n; ++s)
        {
            bcf[s * L + t] = xdbl[t * nx + r + s];
            ccf[s * L + t] = xdbl[t * nx + r + n + s];
        }
    int const rc = m4r_scan_native_forward(ucf, dcf, w->A, bcf, ccf, w->D, zcf, w->dt_bias, nullptr, 1,
        static_cast<int32_t>(di), static_cast<int32_t>(L), static_cast<int32_t>(n), 1, last_only ? 1 : 0,
        M4R_SCAN_F32, ycf, 1);
    if (rc != M4R_SCAN_OK)
        return rc == M4R_SCAN_NO_MEMORY ? 2 : 1;
    if (last_only)
    {
        gemm(ycf, di, w->out_proj_t, dm, y, dm, 1, dm, di);
        return 0;
    }
    m4r_mixer_transpose(ycf, di, L, yt);
    gemm(yt, di, w->out_proj_t, dm, y, dm, L, dm, di);
    return 0;
}
