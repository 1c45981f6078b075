// Fused Mamba mixer, one batch row per call (mambaMixerCpu.h), in chunks of T = kChunk (128) positions: for each
// chunk in_proj, the causal conv (the previous chunk's last d_conv - 1 rows of x carried over), SiLU, x_proj and
// dt_proj, then the scan advances over the chunk carrying its states (forwardRowAdvance, selectiveScanCpuRow.h),
// then (mode all) out_proj writes the chunk's output rows. The buffers are one chunk long whatever the sequence
// length, in a thread-local scratch: about (3 d_inner + dt_rank + 2 d_state) x T floats in mode last (x, u, dt,
// x_proj's output; z and y of the last position only), (5 d_inner + ...) x T in mode all ([x | z], y), plus the
// carry and the scan's states: 0.3-0.4 MB at the ML-100K shape (d_inner 128, d_state 32), so they stay in L2
// (before: the same buffers over the whole row, 2.8 MB at L = 1000, which a call after another model's had to
// fetch back from DRAM). All time-major; the scan reads u, dt, z, B and C and writes y in place through strided
// views, so the chain has no transposes and only x and y touch the caller's memory. A chunk is a multiple of the
// GEMM's 4-row blocks and of the scan's 64-position tiles: every output is computed as over the whole row,
// bitwise (mambaMixerTest.cpp compares chunk sizes).
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

namespace
{
//! One row in flight: the weights, its sizes and the chunk buffers (all time-major, rows of the current chunk).
struct RowRun
{
    M4RMixerWeights const* w;
    int64_t L, dm, di, n, r, k, nx;
    bool last;          //!< mode last: z and C at position L - 1 only, y (d_model)
    float* xz;          //!< (k - 1 + T rows, ldxz): the previous chunk's last k - 1 rows of x, then the chunk's
    int64_t ldxz;       //!< di in mode last (x only), 2 di in mode all ([x | z])
    float* zLast;       //!< mode last: z at position L - 1 (di)
    float* ut;          //!< (T, di) conv + SiLU
    float* dt;          //!< (T, di) dt_proj output (before bias and softplus)
    float* xdbl;        //!< (T, nx) [dt_low | B | C]
    float* yt;          //!< (T, di), or (di) in mode last: gated scan output
    float* convT;       //!< (k, di) the conv taps, transposed so that the channel loop reads both operands in a row
    float* scanWork;    //!< the scan's workspace (its states carry from chunk to chunk)
};

//! One position of the causal depthwise conv: o[c] = bias[c] + sum over taps j in [j0, k) of taps[j][c] * x_j[c],
//! x_j = x0 + j * ld; four channels at a time are accumulated in a register (baseline SSE2 / NEON width), with
//! the same additions in the same order as one channel at a time.
void convPosition(float* o, float const* bias, float const* x0, int64_t ld, float const* taps, int64_t j0, int64_t k,
    int64_t di)
{
    typedef float CVec __attribute__((vector_size(4 * sizeof(float))));
    constexpr int64_t kL = 4;
    int64_t c = 0;
    for (; c + kL <= di; c += kL)
    {
        CVec acc = {};
        if (bias != nullptr)
            std::memcpy(&acc, bias + c, sizeof(CVec));
        for (int64_t j = j0; j < k; ++j)
        {
            CVec t, v;
            std::memcpy(&t, taps + j * di + c, sizeof(CVec));
            std::memcpy(&v, x0 + j * ld + c, sizeof(CVec));
            acc += t * v;
        }
        std::memcpy(o + c, &acc, sizeof(CVec));
    }
    for (; c < di; ++c)
    {
        float acc = bias != nullptr ? bias[c] : 0.0f;
        for (int64_t j = j0; j < k; ++j)
            acc += taps[j * di + c] * x0[j * ld + c];
        o[c] = acc;
    }
}

//! Causal depthwise conv over positions [t0, t1) (zeros before position 0) + SiLU into ut; x of position t is
//! row t - t0 of xz (rows -1 .. -(k - 1) hold the previous chunk's tail).
void convSilu(RowRun const& q, int64_t t0, int64_t t1)
{
    for (int64_t t = t0; t < t1; ++t)
    {
        int64_t const j0 = std::max<int64_t>(0, q.k - 1 - t); // taps before position 0 are skipped
        float const* x0 = q.xz + (t - t0 - (q.k - 1)) * q.ldxz; // x of position t - (k - 1), tap 0
        convPosition(q.ut + (t - t0) * q.di, q.w->conv_b, x0, q.ldxz, q.convT, j0, q.k, q.di);
    }
    fns().silu(q.ut, (t1 - t0) * q.di);
}

//! Everything before the scan for positions [t0, t1): in_proj, conv + SiLU, x_proj, dt_proj. Mode last reads z
//! (the gate) and C (the read-out) at the last position only: those columns are computed for that row alone
//! (about half the GEMM work of a row).
void chunkInputs(RowRun const& q, float const* x, int64_t t0, int64_t t1)
{
    M4RMixerWeights const* w = q.w;
    auto const gemm = fns().gemm;
    int64_t const rows = t1 - t0, di = q.di, nx = q.nx;
    bool const lastRow = t1 == q.L;
    gemm(x + t0 * q.dm, q.dm, w->in_proj_t, 2 * di, q.xz, q.ldxz, rows, q.last ? di : 2 * di, q.dm);
    if (q.last && lastRow)
        gemm(x + (q.L - 1) * q.dm, q.dm, w->in_proj_t + di, 2 * di, q.zLast, di, 1, di, q.dm);
    convSilu(q, t0, t1);
    if (!lastRow) // the last k - 1 rows of x so far go before the next chunk's (from the carry too when rows < k - 1)
        std::memmove(q.xz - (q.k - 1) * q.ldxz, q.xz + (rows - (q.k - 1)) * q.ldxz,
            static_cast<size_t>((q.k - 1) * q.ldxz) * sizeof(float));
    gemm(q.ut, di, w->x_proj_t, nx, q.xdbl, nx, rows, q.last ? q.r + q.n : nx, di);
    if (q.last && lastRow)
        gemm(q.ut + (rows - 1) * di, di, w->x_proj_t + q.r + q.n, nx, q.xdbl + (rows - 1) * nx + q.r + q.n, nx, 1,
            q.n, di);
    gemm(q.xdbl, nx, w->dt_proj_t, di, q.dt, di, rows, di, q.r);
}

//! Carves the row's buffers for chunks of T positions out of this thread's scratch. False: out of memory.
bool carve(RowRun& q, int64_t T)
{
    int64_t const di = q.di;
    size_t const ws = m4r::scan::rowWorkspaceFloats(static_cast<int32_t>(q.L), static_cast<int32_t>(q.n),
        static_cast<int32_t>(di));
    int64_t const yRows = q.last ? 1 : T;
    size_t const need = static_cast<size_t>((q.k - 1 + T) * q.ldxz + di + T * (2 * di + q.nx) + yRows * di + q.k * di)
        + ws;
    thread_local std::vector<float> scratch;
    try
    {
        if (scratch.size() < need)
            scratch.resize(need);
    }
    catch (std::bad_alloc const&)
    {
        return false;
    }
    q.xz = scratch.data() + (q.k - 1) * q.ldxz;
    q.zLast = q.xz + T * q.ldxz;
    q.ut = q.zLast + di;
    q.dt = q.ut + T * di;
    q.xdbl = q.dt + T * di;
    q.yt = q.xdbl + T * q.nx;
    q.convT = q.yt + yRows * di;
    q.scanWork = q.convT + q.k * di;
    for (int64_t c = 0; c < di; ++c)
        for (int64_t j = 0; j < q.k; ++j)
            q.convT[j * di + c] = q.w->conv_w[c * q.k + j];
    return true;
}

//! The scan's views of the chunk buffers (time-major, read in place: no transposes).
m4r::scan::ScanRow scanView(RowRun const& q)
{
    m4r::scan::ScanRow row{};
    row.u = q.ut;
    row.uT = q.di;
    row.uC = 1;
    row.delta = q.dt;
    row.dT = q.di;
    row.dC = 1;
    row.z = q.last ? q.zLast : q.xz + q.di; // mode last: read at position L - 1 only, so a time stride of 0
    row.zT = q.last ? 0 : 2 * q.di;
    row.zC = 1;
    row.B = q.xdbl + q.r;
    row.C = q.xdbl + q.r + q.n;
    row.bcT = q.nx;
    row.A = q.w->A;
    row.D = q.w->D;
    row.bias = q.w->dt_bias;
    row.dim = static_cast<int32_t>(q.di);
    row.steps = static_cast<int32_t>(q.L);
    row.n = static_cast<int32_t>(q.n);
    row.softplus = true;
    row.lastOnly = q.last;
    row.y = q.yt;
    row.yT = q.di;
    row.yC = 1;
    return row;
}
} // namespace

namespace m4r
{
namespace mixer
{
int forwardRow(M4RMixerWeights const* w, float const* x, int32_t seqlen, int32_t length, int32_t last_only,
    float* y, int32_t chunk)
{
    if (w == nullptr || x == nullptr || y == nullptr || seqlen < 1 || w->d_model < 1 || w->d_inner < 1
        || w->d_state < 1 || w->dt_rank < 1 || w->d_conv < 1 || chunk < 1 || chunk % scan::kTimeTile != 0)
    {
        return 1;
    }
    RowRun q{};
    q.w = w;
    q.last = last_only != 0;
    q.L = q.last ? std::clamp<int64_t>(length, 1, seqlen) : seqlen;
    q.dm = w->d_model;
    q.di = w->d_inner;
    q.n = w->d_state;
    q.r = w->dt_rank;
    q.k = w->d_conv;
    q.nx = q.r + 2 * q.n;
    q.ldxz = q.last ? q.di : 2 * q.di;
    int64_t const T = std::min<int64_t>(q.L, chunk); // positions per chunk (the whole row when shorter)
    if (!carve(q, T))
        return 2;
    scan::ScanRow const row = scanView(q);
    scan::forwardRowInit(row, q.scanWork);
    for (int64_t t0 = 0; t0 < q.L; t0 += T)
    {
        int64_t const t1 = std::min(q.L, t0 + T);
        chunkInputs(q, x, t0, t1);
        scan::forwardRowAdvance(row, static_cast<int32_t>(t0), static_cast<int32_t>(t1), q.scanWork);
        if (!q.last) // y of the chunk's positions, straight into the output rows
            fns().gemm(q.yt, q.di, w->out_proj_t, q.dm, y + t0 * q.dm, q.dm, t1 - t0, q.dm, q.di);
    }
    if (q.last)
        fns().gemm(q.yt, q.di, w->out_proj_t, q.dm, y, q.dm, 1, q.dm, q.di);
    return 0;
}
} // namespace mixer
} // namespace m4r

extern "C" int m4r_mixer_forward_row(
    M4RMixerWeights const* w, float const* x, int32_t seqlen, int32_t length, int32_t last_only, float* y)
{
    return m4r::mixer::forwardRow(w, x, seqlen, length, last_only, y, m4r::mixer::kChunk);
}
