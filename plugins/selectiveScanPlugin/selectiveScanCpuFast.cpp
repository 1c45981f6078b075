// Optimised CPU SelectiveScan: blocks of channels in vector lanes. Forward: forwardRow
// (selectiveScanCpuFastKernel.inl, selectiveScanCpuRow.h) on strided views of one row, compiled three times
// (baseline, AVX2, AVX-512 with 16 lanes) and chosen at run time; threads over (row, 16-channel chunk) work
// items. Backward: 8-lane blocks (selectiveScanCpuFastBackward.inl, baseline or AVX2), the skip term and the
// gate with the scalar functions of selectiveScanMath.h. softplus is vectorised (polynomial exp and log).
#include "selectiveScanCpuFast.h"
#include "selectiveScanCpuIsa.h"
#include "selectiveScanCpuRow.h"

#include "selectiveScanMath.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace
{
constexpr int32_t kW = 8; // channels per block = lanes per vector, in the backward pass
constexpr float kDecayExpMin = M4R_SCAN_DECAY_EXP_MIN;
typedef float Vec __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kW * sizeof(int32_t))));

// Each instruction-set namespace defines its lane count (kLanes), the states updated in lockstep (kGroup: as
// many as the registers hold) and M4R_SCAN_FMA (fused where the instruction set has FMA).
#define M4R_SCAN_FMA(a, b, c) ((a) * (b) + (c))
#define M4R_SCAN_MAX(a, b) ((a) > (b) ? (a) : (b))
#define M4R_SCAN_MIN(a, b) ((a) < (b) ? (a) : (b))
#define M4R_SCAN_POLY_FMA(a, b, c) M4R_SCAN_FMA((a), (b), Vec{} + (c))
namespace generic
{
constexpr int32_t kLanes = kW;
constexpr int kGroup = 4;
#include "selectiveScanCpuFastKernel.inl"
#include "selectiveScanCpuFastBackward.inl"
} // namespace generic
#undef M4R_SCAN_FMA
#undef M4R_SCAN_MAX
#undef M4R_SCAN_MIN

#if defined(M4R_ISA_X86)
#define M4R_SCAN_HAVE_AVX2 1
M4R_ISA_BEGIN(M4R_ISA_AVX2)
#define M4R_SCAN_FMA(a, b, c) __builtin_ia32_vfmaddps256((a), (b), (c))
#define M4R_SCAN_MAX(a, b) ((Vec) _mm256_max_ps((__m256) (a), (__m256) (b)))
#define M4R_SCAN_MIN(a, b) ((Vec) _mm256_min_ps((__m256) (a), (__m256) (b)))
namespace avx2
{
constexpr int32_t kLanes = kW;
constexpr int kGroup = 4; // 16 ymm registers
#include "selectiveScanCpuFastKernel.inl"
#include "selectiveScanCpuFastBackward.inl"
} // namespace avx2
#undef M4R_SCAN_FMA
#undef M4R_SCAN_MAX
#undef M4R_SCAN_MIN
M4R_ISA_END

// AVX-512: 16 lanes and 32 registers, forward only (forwardRow); the backward keeps the 8-lane kernels.
#define M4R_SCAN_HAVE_AVX512 1
M4R_ISA_BEGIN(M4R_ISA_AVX512)
namespace avx512
{
constexpr int32_t kLanes = 16;
constexpr int kGroup = 4;
#define M4R_SCAN_EXP2_TABLE 1
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));
#define M4R_SCAN_FMA(a, b, c) ((Vec) _mm512_fmadd_ps((__m512) (a), (__m512) (b), (__m512) (c)))
#define M4R_SCAN_MAX(a, b) ((Vec) _mm512_mask_max_ps((__m512) (a), (__mmask16) -1, (__m512) (a), (__m512) (b)))
#define M4R_SCAN_MIN(a, b) ((Vec) _mm512_mask_min_ps((__m512) (a), (__mmask16) -1, (__m512) (a), (__m512) (b)))
#include "selectiveScanCpuFastKernel.inl"
#undef M4R_SCAN_FMA
#undef M4R_SCAN_MAX
#undef M4R_SCAN_MIN
#undef M4R_SCAN_EXP2_TABLE
} // namespace avx512
M4R_ISA_END
#endif
#undef M4R_SCAN_POLY_FMA

//! The 8-lane kernels of the backward pass.
struct Kernels
{
    decltype(&generic::statesBlock) states;
    decltype(&generic::adjointBlock) adjoint;
    decltype(&generic::softplusInPlace) softplus;
    decltype(&generic::softplusGradInPlace) softplusGrad;
    char const* isa;
};

Kernels const& kernels()
{
    static Kernels const k = [] {
#if defined(M4R_SCAN_HAVE_AVX2)
        if (m4r::cpu_isa::avx2())
        {
            return Kernels{avx2::statesBlock, avx2::adjointBlock, avx2::softplusInPlace, avx2::softplusGradInPlace,
                "avx2+fma"};
        }
#endif
        return Kernels{generic::statesBlock, generic::adjointBlock, generic::softplusInPlace,
            generic::softplusGradInPlace, "generic"};
    }();
    return k;
}

//! The forward kernels of one instruction-set namespace.
struct RowKernel
{
    void (*forward)(m4r::scan::ScanRow const&, float*);
    void (*init)(m4r::scan::ScanRow const&, float*);
    void (*advance)(m4r::scan::ScanRow const&, int32_t, int32_t, float*);
    char const* isa;
};

RowKernel const& rowKernel()
{
    static RowKernel const k = [] {
#if defined(M4R_SCAN_HAVE_AVX512)
        if (m4r::cpu_isa::avx512())
        {
            return RowKernel{avx512::forwardRow, avx512::startRow, avx512::advanceRow, "avx512"};
        }
#endif
#if defined(M4R_SCAN_HAVE_AVX2)
        if (m4r::cpu_isa::avx2())
        {
            return RowKernel{avx2::forwardRow, avx2::startRow, avx2::advanceRow, "avx2+fma"};
        }
#endif
        return RowKernel{generic::forwardRow, generic::startRow, generic::advanceRow, "generic"};
    }();
    return k;
}

// ---- element types -----------------------------------------------------------------------------------------

float halfToFloat(uint16_t h)
{
    uint32_t const sign = static_cast<uint32_t>(h & 0x8000U) << 16;
    uint32_t exp = (h >> 10) & 0x1FU;
    uint32_t man = h & 0x3FFU;
    uint32_t bits;
    if (exp == 0x1FU)
    {
        bits = sign | 0x7F800000U | (man << 13); // inf / nan
    }
    else if (exp != 0)
    {
        bits = sign | ((exp + 112U) << 23) | (man << 13);
    }
    else if (man == 0)
    {
        bits = sign;
    }
    else
    { // subnormal: normalise
        exp = 113U;
        while ((man & 0x400U) == 0)
        {
            man <<= 1;
            --exp;
        }
        bits = sign | (exp << 23) | ((man & 0x3FFU) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

uint16_t floatToHalf(float f) // round to nearest even, like PyTorch's .half()
{
    uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    uint32_t const sign = (x >> 16) & 0x8000U;
    uint32_t const ax = x & 0x7FFFFFFFU;
    if (ax >= 0x7F800000U)
    {
        return static_cast<uint16_t>(sign | 0x7C00U | (ax > 0x7F800000U ? 0x200U : 0U));
    }
    if (ax >= 0x477FF000U) // >= 65520 rounds to inf
    {
        return static_cast<uint16_t>(sign | 0x7C00U);
    }
    if (ax < 0x38800000U) // below the smallest normal half: subnormal or zero
    {
        float af;
        std::memcpy(&af, &ax, sizeof af);
        // af * 2^24 is the subnormal's integer mantissa; nearbyint rounds to nearest even.
        return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(af * 16777216.F)));
    }
    uint32_t const rounded = ax + 0xFFFU + ((ax >> 13) & 1U);
    return static_cast<uint16_t>(sign | ((rounded - 0x38000000U) >> 13));
}

float bf16ToFloat(uint16_t h)
{
    uint32_t const bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

uint16_t floatToBf16(float f)
{
    uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    if ((x & 0x7FFFFFFFU) > 0x7F800000U)
    {
        return static_cast<uint16_t>((x >> 16) | 0x40U);
    }
    return static_cast<uint16_t>((x + 0x7FFFU + ((x >> 16) & 1U)) >> 16);
}

float load(void const* p, std::size_t i, int32_t dtype)
{
    switch (dtype)
    {
    case M4R_SCAN_F16: return halfToFloat(static_cast<uint16_t const*>(p)[i]);
    case M4R_SCAN_BF16: return bf16ToFloat(static_cast<uint16_t const*>(p)[i]);
    default: return static_cast<float const*>(p)[i];
    }
}

void store(void* p, std::size_t i, int32_t dtype, float v)
{
    switch (dtype)
    {
    case M4R_SCAN_F16: static_cast<uint16_t*>(p)[i] = floatToHalf(v); break;
    case M4R_SCAN_BF16: static_cast<uint16_t*>(p)[i] = floatToBf16(v); break;
    default: static_cast<float*>(p)[i] = v; break;
    }
}

//! A zero-initialised array of Vec on 64-byte boundaries (std::vector<Vec> does not honour the vector
//! type's 32-byte alignment with every compiler, and the AVX2 path uses aligned loads).
class VecBuf
{
public:
    explicit VecBuf(std::size_t n)
        : mSize(n)
        , mData(static_cast<Vec*>(std::aligned_alloc(64, ((std::max<std::size_t>(n, 1) * sizeof(Vec) + 63) / 64) * 64)))
    {
        if (mData == nullptr)
        {
            throw std::bad_alloc();
        }
        std::fill(begin(), end(), Vec{});
    }
    VecBuf(VecBuf const&) = delete;
    VecBuf& operator=(VecBuf const&) = delete;
    ~VecBuf()
    {
        std::free(mData);
    }
    Vec* data()
    {
        return mData;
    }
    Vec* begin()
    {
        return mData;
    }
    Vec* end()
    {
        return mData + mSize;
    }
    Vec& operator[](std::size_t i)
    {
        return mData[i];
    }

private:
    std::size_t mSize;
    Vec* mData;
};

float lane(Vec const& v, int32_t l)
{
    return v[l];
}

// ---- problem, blocks, threads ------------------------------------------------------------------------------

struct Problem
{
    void const* u;
    void const* delta;
    float const* A;
    void const* B;
    void const* C;
    float const* D;
    void const* z;
    float const* bias;
    int32_t const* lengths;
    int32_t batch, dim, L, N;
    bool softplus, lastOnly;
    int32_t dtype;

    int32_t blocksPerRow() const
    {
        return (dim + kW - 1) / kW;
    }
    int32_t stop(int32_t b) const
    {
        return lastOnly ? m4r::scan::lastIndex(lengths != nullptr ? lengths[b] : L, L) : L - 1;
    }
    std::size_t rowOffset(int32_t b, int32_t c) const
    {
        return (static_cast<std::size_t>(b) * dim + c) * static_cast<std::size_t>(L);
    }
};

//! Per-thread buffers of one block: inputs transposed to [t][lane], B and C of the current row to [t][n].
struct Scratch
{
    VecBuf x, dt, u, a, h, hc;
    std::vector<float> Bt, Ct;
    int32_t row = -1;

    explicit Scratch(Problem const& p)
        : x(p.L)
        , dt(p.L)
        , u(p.L)
        , a(p.N)
        , h(p.N)
        , hc(p.L)
        , Bt(static_cast<std::size_t>(p.L) * p.N)
        , Ct(static_cast<std::size_t>(p.L) * p.N)
    {
    }

    //! B and C of row b, transposed and converted to fp32 (once per row and thread).
    void loadRow(Problem const& p, int32_t b)
    {
        if (row == b)
        {
            return;
        }
        row = b;
        std::size_t const base = static_cast<std::size_t>(b) * p.N * p.L;
        for (int32_t s = 0; s < p.N; ++s)
        {
            for (int32_t t = 0; t < p.L; ++t)
            {
                std::size_t const src = base + static_cast<std::size_t>(s) * p.L + t;
                Bt[static_cast<std::size_t>(t) * p.N + s] = load(p.B, src, p.dtype);
                Ct[static_cast<std::size_t>(t) * p.N + s] = load(p.C, src, p.dtype);
            }
        }
    }

    //! x = delta + bias, dt = softplus(x) (or x), u and A of a block; unused lanes have x = u = a = 0, so
    //! their state stays 0 (nothing is written for them).
    int32_t loadBlock(Problem const& p, int32_t b, int32_t c0, int32_t steps)
    {
        int32_t const lanes = std::min(kW, p.dim - c0);
        std::fill(x.begin(), x.begin() + steps, Vec{});
        std::fill(u.begin(), u.begin() + steps, Vec{});
        std::fill(a.begin(), a.end(), Vec{});
        for (int32_t l = 0; l < lanes; ++l)
        {
            int32_t const c = c0 + l;
            std::size_t const row = p.rowOffset(b, c);
            float const bias = p.bias != nullptr ? p.bias[c] : 0.F;
            for (int32_t t = 0; t < steps; ++t)
            {
                x[t][l] = load(p.delta, row + t, p.dtype) + bias;
                u[t][l] = load(p.u, row + t, p.dtype);
            }
            for (int32_t s = 0; s < p.N; ++s)
            {
                a[s][l] = p.A[static_cast<std::size_t>(c) * p.N + s];
            }
        }
        std::copy(x.begin(), x.begin() + steps, dt.begin());
        if (p.softplus)
        {
            kernels().softplus(dt.data(), steps);
        }
        return lanes;
    }
};

int32_t defaultThreads()
{
    if (char const* env = std::getenv("M4R_SCAN_THREADS"))
    {
        int const n = std::atoi(env);
        if (n > 0)
        {
            return n;
        }
    }
    unsigned const hw = std::thread::hardware_concurrency();
    return hw > 0 ? static_cast<int32_t>(hw) : 1;
}

//! Threads for `items` work items of `work` state updates in all: at most the request, and at least
//! $M4R_SCAN_GRAIN (default 2^18, a fraction of a millisecond) updates per thread, so that small calls do not
//! pay for thread starts.
int32_t threadsFor(int32_t requested, int64_t items, int64_t work)
{
    int64_t grain = int64_t{1} << 18;
    if (char const* env = std::getenv("M4R_SCAN_GRAIN"))
    {
        grain = std::max<int64_t>(1, std::atoll(env));
    }
    int64_t n = requested > 0 ? requested : defaultThreads();
    n = std::min<int64_t>(n, items);
    n = std::min<int64_t>(n, std::max<int64_t>(1, work / grain));
    return static_cast<int32_t>(std::max<int64_t>(1, n));
}

//! Flush-to-zero + denormals-are-zero on the current thread while the guard lives; the thread's previous mode
//! is restored when it ends. The decaying state (exp(dt*A) products over many steps, a state fed by tiny
//! dt*u*B) can sit in the fp32 denormal range, where every operation takes a microcode assist (2x slower on
//! Zen 3 with denormal-heavy inputs, far more on Intel cores). Flushing changes results only below
//! FLT_MIN (1.2e-38). One guard per C call on the calling thread (the whole call, reductions included) and one
//! per worker thread, which adopts the caller's flushed mode, rounding bits included (Linux threads inherit
//! the creating thread's mode anyway; the worker guard does not rely on that).
class FlushDenormals
{
public:
#if defined(__x86_64__) || defined(_M_X64)
    using Mode = unsigned int;
    static constexpr Mode kBits = 0x8040U; // MXCSR bit 15 FTZ, bit 6 DAZ
    static Mode read()
    {
        return _mm_getcsr();
    }
    static void write(Mode m)
    {
        _mm_setcsr(m);
    }
#elif defined(__aarch64__)
    using Mode = uint64_t;
    static constexpr Mode kBits = Mode{1} << 24; // FPCR.FZ: denormal inputs and results are flushed
    static Mode read()
    {
        Mode m;
        __asm__ __volatile__("mrs %0, fpcr" : "=r"(m));
        return m;
    }
    static void write(Mode m)
    {
        __asm__ __volatile__("msr fpcr, %0" : : "r"(m));
    }
#else
    using Mode = unsigned int; // other targets: no-op
    static constexpr Mode kBits = 0U;
    static Mode read()
    {
        return 0U;
    }
    static void write(Mode)
    {
    }
#endif

    //! Adds FTZ + DAZ to this thread's mode.
    FlushDenormals()
        : FlushDenormals(read() | kBits)
    {
    }
    //! Sets `mode` (a worker adopting the caller's flushed mode).
    explicit FlushDenormals(Mode mode)
        : mSaved(read())
    {
        write(mode);
    }
    FlushDenormals(FlushDenormals const&) = delete;
    FlushDenormals& operator=(FlushDenormals const&) = delete;
    //! Writes back the whole saved register (x86: the MXCSR status flags too, so they are as before the call).
    ~FlushDenormals()
    {
        write(mSaved);
    }

private:
    Mode mSaved;
};

//! Runs fn(thread, first, last) over [0, items) split into `threads` contiguous ranges; the calling thread
//! takes the first range. The workers adopt the caller's floating-point mode, which the C entry points have set
//! to flush denormals (FlushDenormals). Returns false when a thread could not be started (nothing is left
//! running).
template <typename Fn>
bool parallelFor(int32_t threads, int64_t items, Fn&& fn)
{
    FlushDenormals::Mode const mode = FlushDenormals::read();
    std::vector<std::thread> pool;
    bool ok = true;
    auto range = [&](int32_t i) { return items * i / threads; };
    try
    {
        pool.reserve(static_cast<std::size_t>(threads - 1));
        for (int32_t i = 1; i < threads; ++i)
        {
            pool.emplace_back([&fn, mode, i, lo = range(i), hi = range(i + 1)] {
                FlushDenormals const workerFlush(mode);
                fn(i, lo, hi);
            });
        }
    }
    catch (std::exception const&)
    {
        ok = false;
    }
    if (ok)
    {
        fn(0, range(0), range(1));
    }
    for (auto& th : pool)
    {
        th.join();
    }
    return ok;
}

bool validDims(int32_t batch, int32_t dim, int32_t seqlen, int32_t dstate)
{
    return batch >= 1 && dim >= 1 && seqlen >= 1 && dstate >= 1;
}

// ---- forward -----------------------------------------------------------------------------------------------

//! Channels per forward work item: a multiple of every instruction set's lanes.
constexpr int32_t kChunk = 16;

//! Forward: work items of (row, kChunk channels), each scanned by forwardRow on strided views of the row.
//! fp32 inputs are read in place (channel-first: time stride 1); other element types are converted to fp32 for
//! the item first. B and C of a row are transposed to [t][n] (and converted) once per row and thread.
int forward(Problem const& p, void* y, int32_t numThreads)
{
    RowKernel const& rk = rowKernel();
    int32_t const chunks = (p.dim + kChunk - 1) / kChunk;
    int64_t const items = static_cast<int64_t>(p.batch) * chunks;
    int64_t const work = static_cast<int64_t>(p.batch) * p.dim * p.L * p.N;
    int32_t const threads = threadsFor(numThreads, items, work);
    std::size_t const L = static_cast<std::size_t>(p.L);
    bool const f32 = p.dtype == M4R_SCAN_F32;
    bool failed = false;
    bool const started = parallelFor(threads, items, [&](int32_t, int64_t lo, int64_t hi) {
        try
        {
            std::vector<float> ws(m4r::scan::rowWorkspaceFloats(p.L, p.N, kChunk));
            std::vector<float> bt(L * p.N), ct(L * p.N);
            std::vector<float> conv(f32 ? 0 : 3 * kChunk * L), yBuf(f32 ? 0 : kChunk * L);
            int32_t row = -1;
            for (int64_t item = lo; item < hi; ++item)
            {
                int32_t const b = static_cast<int32_t>(item / chunks);
                int32_t const c0 = static_cast<int32_t>(item % chunks) * kChunk;
                int32_t const cn = std::min(kChunk, p.dim - c0);
                int32_t const steps = p.stop(b) + 1;
                if (row != b)
                {
                    row = b;
                    std::size_t const base = static_cast<std::size_t>(b) * p.N * L;
                    for (int32_t s = 0; s < p.N; ++s)
                    {
                        for (int32_t t = 0; t < steps; ++t)
                        {
                            std::size_t const src = base + static_cast<std::size_t>(s) * L + t;
                            bt[static_cast<std::size_t>(t) * p.N + s] = load(p.B, src, p.dtype);
                            ct[static_cast<std::size_t>(t) * p.N + s] = load(p.C, src, p.dtype);
                        }
                    }
                }
                std::size_t const first = p.rowOffset(b, c0);
                m4r::scan::ScanRow r{};
                r.uT = r.dT = r.zT = r.yT = 1;
                r.uC = r.dC = r.zC = r.yC = p.L;
                if (f32)
                {
                    r.u = static_cast<float const*>(p.u) + first;
                    r.delta = static_cast<float const*>(p.delta) + first;
                    r.z = p.z != nullptr ? static_cast<float const*>(p.z) + first : nullptr;
                }
                else
                {
                    float* cu = conv.data();
                    float* cd = cu + kChunk * L;
                    float* cz = cd + kChunk * L;
                    for (std::size_t i = 0; i < static_cast<std::size_t>(cn) * L; ++i)
                    {
                        cu[i] = load(p.u, first + i, p.dtype);
                        cd[i] = load(p.delta, first + i, p.dtype);
                        cz[i] = p.z != nullptr ? load(p.z, first + i, p.dtype) : 0.F;
                    }
                    r.u = cu;
                    r.delta = cd;
                    r.z = p.z != nullptr ? cz : nullptr;
                }
                r.B = bt.data();
                r.C = ct.data();
                r.bcT = p.N;
                r.A = p.A + static_cast<std::size_t>(c0) * p.N;
                r.D = p.D != nullptr ? p.D + c0 : nullptr;
                r.bias = p.bias != nullptr ? p.bias + c0 : nullptr;
                r.dim = cn;
                r.steps = steps;
                r.n = p.N;
                r.softplus = p.softplus;
                r.lastOnly = p.lastOnly;
                std::size_t const yFirst = p.lastOnly ? static_cast<std::size_t>(b) * p.dim + c0 : first;
                if (p.lastOnly)
                {
                    r.yC = 1;
                }
                r.y = f32 ? static_cast<float*>(y) + yFirst : yBuf.data();
                rk.forward(r, ws.data());
                if (!f32)
                {
                    std::size_t const count = p.lastOnly ? static_cast<std::size_t>(cn) : static_cast<std::size_t>(cn) * L;
                    for (std::size_t i = 0; i < count; ++i)
                    {
                        // mode all: positions >= steps are not written by the scan (steps = L there)
                        store(y, yFirst + i, p.dtype, yBuf[i]);
                    }
                }
            }
        }
        catch (std::bad_alloc const&)
        {
            failed = true; // benign race: every writer stores true
        }
    });
    if (!started)
    {
        return M4R_SCAN_INTERNAL_ERROR;
    }
    return failed ? M4R_SCAN_NO_MEMORY : M4R_SCAN_OK;
}

// ---- backward ----------------------------------------------------------------------------------------------

struct Grads
{
    float const* dy;
    float *du, *ddelta, *dA, *dB, *dC, *dD, *dz, *dBias;
};

//! Per-thread partial sums of the gradients reduced over rows (dA, dD, dBias) and, when threads share rows,
//! over channels (dB, dC).
struct Partials
{
    std::vector<float> dA, dD, dBias, dB, dC;
};

int backward(Problem const& p, Grads const& g, int32_t numThreads)
{
    Kernels const& k = kernels();
    int32_t const blocks = p.blocksPerRow();
    int64_t const work = static_cast<int64_t>(p.batch) * p.dim * p.L * p.N * 3;
    std::size_t const L = static_cast<std::size_t>(p.L);
    std::size_t const rowBC = static_cast<std::size_t>(p.N) * L;
    // Whole rows per thread when there are enough rows (dB, dC written in place); else channel blocks per
    // thread, each with its own dB, dC partials.
    int32_t threads = threadsFor(numThreads, static_cast<int64_t>(p.batch) * blocks, work);
    bool const byRow = p.batch >= threads;
    int64_t const items = byRow ? p.batch : blocks;
    threads = static_cast<int32_t>(std::min<int64_t>(threads, items));
    std::vector<Partials> parts(static_cast<std::size_t>(threads));
    bool failed = false;

    bool const started = parallelFor(threads, items, [&](int32_t th, int64_t lo, int64_t hi) {
        try
        {
            Partials& part = parts[static_cast<std::size_t>(th)];
            part.dA.assign(static_cast<std::size_t>(p.dim) * p.N, 0.F);
            part.dD.assign(static_cast<std::size_t>(p.dim), 0.F);
            part.dBias.assign(static_cast<std::size_t>(p.dim), 0.F);
            if (!byRow)
            {
                part.dB.assign(static_cast<std::size_t>(p.batch) * rowBC, 0.F);
                part.dC.assign(static_cast<std::size_t>(p.batch) * rowBC, 0.F);
            }
            Scratch s(p);
            VecBuf H(rowBC), E(rowBC), G(p.N), dBacc(rowBC), dCacc(rowBC), dAacc(p.N), gy(p.L), gDt(p.L), gDtu(p.L);
            int32_t const bLo = byRow ? static_cast<int32_t>(lo) : 0;
            int32_t const bHi = byRow ? static_cast<int32_t>(hi) : p.batch;
            int32_t const kLo = byRow ? 0 : static_cast<int32_t>(lo);
            int32_t const kHi = byRow ? blocks : static_cast<int32_t>(hi);
            for (int32_t b = bLo; b < bHi; ++b)
            {
                int32_t const stop = p.stop(b);
                std::size_t const steps = static_cast<std::size_t>(stop) + 1;
                s.loadRow(p, b);
                std::fill(dBacc.begin(), dBacc.begin() + steps * p.N, Vec{});
                std::fill(dCacc.begin(), dCacc.begin() + steps * p.N, Vec{});
                for (int32_t kb = kLo; kb < kHi; ++kb)
                {
                    int32_t const c0 = kb * kW;
                    int32_t const lanes = s.loadBlock(p, b, c0, stop + 1);
                    k.states(s.dt.data(), s.u.data(), s.a.data(), s.Bt.data(), s.Ct.data(), p.N, stop, p.lastOnly,
                        H.data(), E.data(), s.hc.data());
                    // dL/d(hc) per position and the gradients of the skip term and the gate (scalar, as the
                    // forward computes them).
                    std::fill(gy.begin(), gy.begin() + steps, Vec{});
                    for (int32_t l = 0; l < lanes; ++l)
                    {
                        int32_t const c = c0 + l;
                        std::size_t const row = p.rowOffset(b, c);
                        float const d = p.D != nullptr ? p.D[c] : 0.F;
                        float gD = 0.F;
                        // Mode last: no output before `stop`, so no gradient of the gate there (gy is 0).
                        int32_t const first = p.lastOnly ? stop : 0;
                        for (int32_t t = 0; g.dz != nullptr && t < first; ++t)
                        {
                            g.dz[row + t] = 0.F;
                        }
                        for (int32_t t = first; t <= stop; ++t)
                        {
                            float dyt = 0.F;
                            if (!p.lastOnly)
                            {
                                dyt = g.dy[row + t];
                            }
                            else if (t == stop)
                            {
                                dyt = g.dy[static_cast<std::size_t>(b) * p.dim + c];
                            }
                            float gout = dyt; // dL/d(hc + D u)
                            if (p.z != nullptr)
                            {
                                float const zt = static_cast<float const*>(p.z)[row + t];
                                float const sig = 1.F / (1.F + std::exp(-zt));
                                float const pre = m4r::scan::skipOutput(lane(s.hc[t], l), d, lane(s.u[t], l));
                                gout = dyt * (zt * sig);
                                if (g.dz != nullptr)
                                {
                                    g.dz[row + t] = dyt * pre * (sig * (1.F + zt * (1.F - sig)));
                                }
                            }
                            gy[t][l] = gout;
                            gD += gout * lane(s.u[t], l);
                        }
                        part.dD[c] += gD;
                    }
                    std::fill(dAacc.begin(), dAacc.end(), Vec{});
                    k.adjoint(s.dt.data(), s.u.data(), s.a.data(), s.Bt.data(), s.Ct.data(), gy.data(), p.N, stop, p.lastOnly,
                        H.data(), E.data(), G.data(), dBacc.data(), dCacc.data(), dAacc.data(), gDt.data(), gDtu.data());
                    if (p.softplus)
                    {
                        k.softplusGrad(gDt.data(), s.x.data(), stop + 1);
                    }
                    for (int32_t l = 0; l < lanes; ++l)
                    {
                        int32_t const c = c0 + l;
                        std::size_t const row = p.rowOffset(b, c);
                        float const d = p.D != nullptr ? p.D[c] : 0.F;
                        float gBias = 0.F;
                        for (int32_t t = 0; t <= stop; ++t)
                        {
                            float const dt = lane(s.dt[t], l);
                            g.du[row + t] = lane(gy[t], l) * d + dt * lane(gDtu[t], l);
                            float const gdt = lane(gDt[t], l); // times softplus'(x) above
                            g.ddelta[row + t] = gdt;
                            gBias += gdt;
                        }
                        for (std::size_t t = steps; t < L; ++t) // after the last valid position (mode last)
                        {
                            g.du[row + t] = 0.F;
                            g.ddelta[row + t] = 0.F;
                            if (g.dz != nullptr)
                            {
                                g.dz[row + t] = 0.F;
                            }
                        }
                        part.dBias[c] += gBias;
                        for (int32_t sIdx = 0; sIdx < p.N; ++sIdx)
                        {
                            part.dA[static_cast<std::size_t>(c) * p.N + sIdx] += lane(dAacc[sIdx], l);
                        }
                    }
                }
                // Lanes -> channels sum of dB, dC for this row, stored [n][t] like B and C.
                float* dBrow = (byRow ? g.dB : part.dB.data()) + static_cast<std::size_t>(b) * rowBC;
                float* dCrow = (byRow ? g.dC : part.dC.data()) + static_cast<std::size_t>(b) * rowBC;
                for (int32_t sIdx = 0; sIdx < p.N; ++sIdx)
                {
                    for (std::size_t t = 0; t < L; ++t)
                    {
                        float sb = 0.F;
                        float sc = 0.F;
                        if (t < steps)
                        {
                            Vec const vb = dBacc[t * p.N + sIdx];
                            Vec const vc = dCacc[t * p.N + sIdx];
                            for (int32_t l = 0; l < kW; ++l)
                            {
                                sb += vb[l];
                                sc += vc[l];
                            }
                        }
                        dBrow[static_cast<std::size_t>(sIdx) * L + t] = sb;
                        dCrow[static_cast<std::size_t>(sIdx) * L + t] = sc;
                    }
                }
            }
        }
        catch (std::bad_alloc const&)
        {
            failed = true;
        }
    });
    if (!started)
    {
        return M4R_SCAN_INTERNAL_ERROR;
    }
    if (failed)
    {
        return M4R_SCAN_NO_MEMORY;
    }
    auto reduce = [&](float* dst, std::vector<float> Partials::*member, std::size_t count) {
        if (dst == nullptr)
        {
            return;
        }
        for (std::size_t i = 0; i < count; ++i)
        {
            float acc = 0.F;
            for (auto const& part : parts)
            {
                acc += (part.*member)[i];
            }
            dst[i] = acc;
        }
    };
    reduce(g.dA, &Partials::dA, static_cast<std::size_t>(p.dim) * p.N);
    reduce(g.dD, &Partials::dD, static_cast<std::size_t>(p.dim));
    reduce(g.dBias, &Partials::dBias, static_cast<std::size_t>(p.dim));
    if (!byRow)
    {
        reduce(g.dB, &Partials::dB, static_cast<std::size_t>(p.batch) * rowBC);
        reduce(g.dC, &Partials::dC, static_cast<std::size_t>(p.batch) * rowBC);
    }
    return M4R_SCAN_OK;
}
} // namespace

extern "C" int m4r_scan_native_forward(void const* u, void const* delta, float const* A, void const* B, void const* C,
    float const* D, void const* z, float const* deltaBias, int32_t const* lengths, int32_t batch, int32_t dim,
    int32_t seqlen, int32_t dstate, int32_t deltaSoftplus, int32_t lastOnly, int32_t dtype, void* y,
    int32_t numThreads)
{
    if (u == nullptr || delta == nullptr || A == nullptr || B == nullptr || C == nullptr || y == nullptr
        || !validDims(batch, dim, seqlen, dstate)
        || (dtype != M4R_SCAN_F32 && dtype != M4R_SCAN_F16 && dtype != M4R_SCAN_BF16))
    {
        return M4R_SCAN_BAD_ARGUMENT;
    }
    Problem const p{u, delta, A, B, C, D, z, deltaBias, lengths, batch, dim, seqlen, dstate, deltaSoftplus != 0,
        lastOnly != 0, dtype};
    FlushDenormals const flush; // this thread's mode is restored on return
    try
    {
        return forward(p, y, numThreads);
    }
    catch (std::bad_alloc const&)
    {
        return M4R_SCAN_NO_MEMORY;
    }
}

extern "C" int m4r_scan_native_backward_f32(float const* u, float const* delta, float const* A, float const* B,
    float const* C, float const* D, float const* z, float const* deltaBias, int32_t const* lengths, int32_t batch,
    int32_t dim, int32_t seqlen, int32_t dstate, int32_t deltaSoftplus, int32_t lastOnly, float const* dy,
    float* du, float* ddelta, float* dA, float* dB, float* dC, float* dD, float* dz, float* dDeltaBias,
    int32_t numThreads)
{
    if (u == nullptr || delta == nullptr || A == nullptr || B == nullptr || C == nullptr || dy == nullptr
        || du == nullptr || ddelta == nullptr || dA == nullptr || dB == nullptr || dC == nullptr
        || !validDims(batch, dim, seqlen, dstate) || (D == nullptr && dD != nullptr)
        || (z == nullptr && dz != nullptr) || (deltaBias == nullptr && dDeltaBias != nullptr))
    {
        return M4R_SCAN_BAD_ARGUMENT;
    }
    Problem const p{u, delta, A, B, C, D, z, deltaBias, lengths, batch, dim, seqlen, dstate, deltaSoftplus != 0,
        lastOnly != 0, M4R_SCAN_F32};
    Grads const g{dy, du, ddelta, dA, dB, dC, dD, dz, dDeltaBias};
    FlushDenormals const flush; // this thread's mode is restored on return
    try
    {
        return backward(p, g, numThreads);
    }
    catch (std::bad_alloc const&)
    {
        return M4R_SCAN_NO_MEMORY;
    }
}

extern "C" int m4r_scan_native_abi_version(void)
{
    return M4R_SCAN_NATIVE_ABI_VERSION;
}

extern "C" char const* m4r_scan_native_contract_version(void)
{
    return "1";
}

extern "C" char const* m4r_scan_native_isa(void)
{
    return rowKernel().isa; // the forward's; the backward runs the 8-lane avx2+fma kernels under "avx512"
}

extern "C" int m4r_scan_native_default_threads(void)
{
    return defaultThreads();
}

namespace m4r
{
namespace scan
{
std::size_t rowWorkspaceFloats(int32_t steps, int32_t n, int32_t dim)
{
    // dt, u, hc: one time tile of vectors each (16 lanes at most); A log2 e and h: n vectors per channel block
    // (at most dim + 16 floats per state); 64-byte alignment.
    std::size_t const tile = static_cast<std::size_t>(std::max(std::min(steps, kTimeTile), 1));
    return 3 * tile * 16 + 2 * static_cast<std::size_t>(std::max(n, 1)) * (static_cast<std::size_t>(std::max(dim, 1)) + 16)
        + static_cast<std::size_t>(std::max(dim, 1)) + 16 + 16; // + one flag (a byte) per block
}

void forwardRow(ScanRow const& row, float* workspace)
{
    FlushDenormals const flush; // this thread's mode is restored on return
    rowKernel().forward(row, workspace);
}

void forwardRowInit(ScanRow const& row, float* workspace)
{
    FlushDenormals const flush; // A * scale, as forwardRow computes it
    rowKernel().init(row, workspace);
}

void forwardRowAdvance(ScanRow const& row, int32_t t0, int32_t t1, float* workspace)
{
    FlushDenormals const flush;
    rowKernel().advance(row, t0, t1, workspace);
}

char const* rowIsa()
{
    return rowKernel().isa;
}
} // namespace scan
} // namespace m4r
