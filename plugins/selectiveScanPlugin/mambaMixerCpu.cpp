// Fused Mamba mixer, one batch row per call (mambaMixerCpu.h). Buffers of one row stay in a thread-local scratch
// (about (5 d_inner + dt_rank + 2 d_state) x seqlen floats plus the scan's 48 x seqlen: 0.6 MB at seqlen 200,
// d_inner 128), all time-major; the scan reads u, dt, z, B and C and writes y in place through strided views
// (selectiveScanCpuRow.h), so the chain has no transposes and only x and y touch the caller's memory.
#include "mambaMixerCpu.h"
#include "selectiveScanCpuIsa.h"
#include "selectiveScanCpuRow.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
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

#if defined(M4R_ISA_X86)
#define M4R_MIXER_HAVE_AVX2 1
M4R_ISA_BEGIN(M4R_ISA_AVX2)
namespace avx2
{
#include "mambaMixerGemm.inl"
} // namespace avx2
M4R_ISA_END
#define M4R_MIXER_HAVE_AVX512 1
M4R_ISA_BEGIN(M4R_ISA_AVX512)
namespace avx512
{
typedef float MVec __attribute__((vector_size(16 * sizeof(float))));
typedef int32_t MVecI __attribute__((vector_size(16 * sizeof(int32_t))));
#include "mambaMixerGemm.inl"
} // namespace avx512
M4R_ISA_END
#endif

struct Fns
{
    decltype(&generic::gemm) gemm;
    decltype(&generic::siluInPlace) silu;
};

Fns const& fns()
{
    static Fns const fn = [] {
#if defined(M4R_MIXER_HAVE_AVX512)
        if (m4r::cpu_isa::avx512())
        {
            return Fns{&avx512::gemm, &avx512::siluInPlace};
        }
#endif
#if defined(M4R_MIXER_HAVE_AVX2)
        if (m4r::cpu_isa::avx2())
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
    size_t const ws = m4r::scan::rowWorkspaceFloats(static_cast<int32_t>(L), static_cast<int32_t>(n), static_cast<int32_t>(di));
    size_t const need = static_cast<size_t>(L * (5 * di + nx) + k * di) + ws; // the buffers below
    try
    {
        if (scratch.size() < need)
            scratch.resize(need);
    }
    catch (std::bad_alloc const&)
    {
        return 2;
    }
    // Every buffer is time-major, and the scan reads them in place (strided views): no transposes.
    float* xz = scratch.data(); // (L, 2 di)  [x | z]
    float* ut = xz + L * 2 * di; // (L, di)    conv + SiLU
    float* dt = ut + L * di;     // (L, di)    dt_proj output (before bias and softplus)
    float* xdbl = dt + L * di;   // (L, r + 2n) [dt_low | B | C]
    float* yt = xdbl + L * nx;   // (L, di) or (di): gated scan output
    float* work = yt + L * di;   // the scan's workspace, then the conv taps

    // Mode last reads z (the gate) and C (the read-out) at the last position only: those columns of in_proj and
    // x_proj are computed for that row alone (about half the GEMM work of a row).
    bool const last = last_only != 0;
    if (last)
    {
        gemm(x, dm, w->in_proj_t, 2 * di, xz, 2 * di, L, di, dm);
        gemm(x + (L - 1) * dm, dm, w->in_proj_t + di, 2 * di, xz + (L - 1) * 2 * di + di, 2 * di, 1, di, dm);
    }
    else
    {
        gemm(x, dm, w->in_proj_t, 2 * di, xz, 2 * di, L, 2 * di, dm);
    }
    // causal depthwise conv over time (zeros before position 0) + SiLU; the taps transposed to (k, di) first so
    // that the channel loop reads both operands contiguously (and vectorises)
    float* convT = work + ws; // (k, di)
    for (int64_t c = 0; c < di; ++c)
        for (int64_t j = 0; j < k; ++j)
            convT[j * di + c] = w->conv_w[c * k + j];
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
            float const* tap = convT + j * di;
            for (int64_t c = 0; c < di; ++c)
                o[c] += tap[c] * in[c];
        }
    }
    fns().silu(ut, L * di);
    if (last)
    {
        gemm(ut, di, w->x_proj_t, nx, xdbl, nx, L, r + n, di);
        gemm(ut + (L - 1) * di, di, w->x_proj_t + r + n, nx, xdbl + (L - 1) * nx + r + n, nx, 1, n, di);
    }
    else
    {
        gemm(ut, di, w->x_proj_t, nx, xdbl, nx, L, nx, di);
    }
    gemm(xdbl, nx, w->dt_proj_t, di, dt, di, L, di, r);
    m4r::scan::ScanRow row{};
    row.u = ut;
    row.uT = di;
    row.uC = 1;
    row.delta = dt;
    row.dT = di;
    row.dC = 1;
    row.z = xz + di;
    row.zT = 2 * di;
    row.zC = 1;
    row.B = xdbl + r;
    row.C = xdbl + r + n;
    row.bcT = nx;
    row.A = w->A;
    row.D = w->D;
    row.bias = w->dt_bias;
    row.dim = static_cast<int32_t>(di);
    row.steps = static_cast<int32_t>(L);
    row.n = static_cast<int32_t>(n);
    row.softplus = true;
    row.lastOnly = last;
    row.y = yt;
    row.yT = di;
    row.yC = 1;
    m4r::scan::forwardRow(row, work);
    gemm(yt, di, w->out_proj_t, dm, y, dm, last ? 1 : L, dm, di);
    return 0;
}
