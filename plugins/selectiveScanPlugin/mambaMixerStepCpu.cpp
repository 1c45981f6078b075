// Fused Mamba mixer, streaming step (mambaMixerStepCpu.h). Rows go in blocks of kBlock so that the projections
// are small GEMMs over the block (one pass over each weight per block) and the block's buffers stay in cache;
// the per-channel state update is vectorised over d_state. Same GEMM micro-kernel and exp polynomial as the
// full-sequence mixer (mambaMixerGemm.inl), compiled for the baseline ISA and for AVX2+FMA (chosen at run time).
#include "mambaMixerStepCpu.h"
#include "selectiveScanCpuIsa.h"

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

constexpr int64_t kBlock = 32;

namespace generic
{
#include "mambaMixerGemm.inl"
#include "mambaMixerStep.inl"
} // namespace generic

#if defined(M4R_ISA_X86)
#define M4R_STEP_HAVE_AVX2 1
M4R_ISA_BEGIN(M4R_ISA_AVX2)
namespace avx2
{
#include "mambaMixerGemm.inl"
#include "mambaMixerStep.inl"
} // namespace avx2
M4R_ISA_END
#endif

struct StepFns
{
    decltype(&generic::gemm) gemm;
    decltype(&generic::siluInPlace) silu;
    decltype(&generic::stateStep) state;
    decltype(&generic::softplusBiasInPlace) softplus;
};

StepFns const& stepFns()
{
    static StepFns const fn = [] {
#if defined(M4R_STEP_HAVE_AVX2)
        if (m4r::cpu_isa::avx2())
            return StepFns{&avx2::gemm, &avx2::siluInPlace, &avx2::stateStep, &avx2::softplusBiasInPlace};
#endif
        return StepFns{&generic::gemm, &generic::siluInPlace, &generic::stateStep, &generic::softplusBiasInPlace};
    }();
    return fn;
}

} // namespace

extern "C" int m4r_mixer_step_rows(M4RMixerWeights const* w, int64_t rows, float const* x, float const* conv_state,
    float const* h, float* y, float* conv_state_out, float* h_out)
{
    if (w == nullptr || x == nullptr || h == nullptr || y == nullptr || h_out == nullptr || rows < 0
        || w->d_model < 1 || w->d_inner < 1 || w->d_state < 1 || w->dt_rank < 1 || w->d_conv < 1
        || w->d_conv > 64 || (w->d_conv > 1 && (conv_state == nullptr || conv_state_out == nullptr)))
        return 1;
    int64_t const dm = w->d_model, di = w->d_inner, n = w->d_state, r = w->dt_rank, k = w->d_conv;
    int64_t const nx = r + 2 * n, kw = k - 1;
    StepFns const& f = stepFns();
    thread_local std::vector<float> scratch;
    int64_t const blk = std::min<int64_t>(kBlock, std::max<int64_t>(rows, 1));
    size_t const need = static_cast<size_t>(blk * (2 * di + di + nx + di + di));
    try
    {
        if (scratch.size() < need)
            scratch.resize(need);
    }
    catch (std::bad_alloc const&)
    {
        return 2;
    }
    float* xz = scratch.data(); // (blk, 2 di): [x | z]
    float* u = xz + blk * 2 * di; // (blk, di)
    float* xdbl = u + blk * di;   // (blk, nx): [dt_low | B | C]
    float* dt = xdbl + blk * nx;  // (blk, di)
    float* yg = dt + blk * di;    // (blk, di): gated scan output
    for (int64_t r0 = 0; r0 < rows; r0 += blk)
    {
        int64_t const m = std::min(blk, rows - r0);
        f.gemm(x + r0 * dm, dm, w->in_proj_t, 2 * di, xz, 2 * di, m, 2 * di, dm);
        for (int64_t i = 0; i < m; ++i)
        {
            float const* xr = xz + i * 2 * di;
            float const* cs = kw > 0 ? conv_state + (r0 + i) * di * kw : nullptr;
            float* co = kw > 0 ? conv_state_out + (r0 + i) * di * kw : nullptr;
            float* ur = u + i * di;
            float win[64];
            for (int64_t c = 0; c < di; ++c)
            {
                float const* wc = w->conv_w + c * k;
                float acc = 0.0f;
                for (int64_t j = 0; j < kw; ++j)
                    win[j] = cs[c * kw + j];
                win[kw] = xr[c];
                for (int64_t j = 0; j < k; ++j)
                    acc += win[j] * wc[j];
                for (int64_t j = 0; j < kw; ++j) // the window's last d_conv - 1 entries (co may alias cs)
                    co[c * kw + j] = win[j + 1];
                ur[c] = acc + (w->conv_b != nullptr ? w->conv_b[c] : 0.0f);
            }
        }
        f.silu(u, m * di);
        f.gemm(u, di, w->x_proj_t, nx, xdbl, nx, m, nx, di);
        f.gemm(xdbl, nx, w->dt_proj_t, di, dt, di, m, di, r);
        for (int64_t i = 0; i < m; ++i)
        {
            float* zr = xz + i * 2 * di + di;
            f.silu(zr, di);
            float const* ur = u + i * di;
            float const* bc = xdbl + i * nx + r;
            float const* hr = h + (r0 + i) * di * n;
            float* ho = h_out + (r0 + i) * di * n;
            float* yr = yg + i * di;
            float* dr = dt + i * di;
            f.softplus(dr, w->dt_bias, di); // dt = softplus(dt + dt_bias)
            for (int64_t c = 0; c < di; ++c)
            {
                float const d = dr[c];
                float const yc = f.state(w->A + c * n, hr + c * n, ho + c * n, bc, bc + n, d, d * ur[c], n);
                yr[c] = (yc + w->D[c] * ur[c]) * zr[c];
            }
        }
        f.gemm(yg, di, w->out_proj_t, dm, y + r0 * dm, dm, m, dm, di);
    }
    return 0;
}
