// ctest without a GPU: runs the real CUDA kernel source (selectiveScanKernel.cuh, fp32/fp16/bf16
// instantiations) on host threads and compares it with the CPU reference. One std::thread per CUDA thread, a barrier for
// __syncthreads(), function-static arrays for __shared__, blocks run one at a time. This checks the
// kernel's indexing, tiling, partial blocks, state-capacity dispatch, I/O conversions and mode "last"
// logic; the GPU self-check (scripts/gpu_check.sh) covers what only a GPU can (device math, speed).
#include <cuda_bf16.h> // before the CUDA keywords are redefined below
#include <cuda_fp16.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

struct EmuIdx
{
    uint32_t x{0}, y{0}, z{0};
};
thread_local EmuIdx threadIdx;
thread_local EmuIdx blockIdx;

// C++17 has no std::barrier: a reusable generation-counting barrier.
class EmuBarrier
{
public:
    explicit EmuBarrier(int n)
        : mCount(n)
    {
    }
    void wait()
    {
        std::unique_lock<std::mutex> lock(mMutex);
        int const gen = mGeneration;
        if (++mArrived == mCount)
        {
            mArrived = 0;
            ++mGeneration;
            mCv.notify_all();
            return;
        }
        mCv.wait(lock, [&] { return gen != mGeneration; });
    }

private:
    std::mutex mMutex;
    std::condition_variable mCv;
    int mCount;
    int mArrived{0};
    int mGeneration{0};
};
EmuBarrier* gBarrier = nullptr;

#define M4R_KERNEL_EMULATION 1
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() gBarrier->wait()
using std::min;

#include "selectiveScanCpu.h"
#include "selectiveScanKernel.cuh"

#include <cmath>
#include <cstdio>
#include <random>

namespace
{
using m4r::scan::kChannels;
using m4r::scan::ScanParams;

template <typename T, int32_t kN, bool kLast>
void launch(ScanParams const& p)
{
    int const channelBlocks = (p.dim + kChannels - 1) / kChannels;
    for (int b = 0; b < p.batch; ++b)
    {
        for (int cb = 0; cb < channelBlocks; ++cb)
        {
            EmuBarrier barrier(kChannels);
            gBarrier = &barrier;
            std::vector<std::thread> threads;
            for (int t = 0; t < kChannels; ++t)
            {
                threads.emplace_back([&, t] {
                    threadIdx.x = static_cast<uint32_t>(t);
                    blockIdx.x = static_cast<uint32_t>(b);
                    blockIdx.y = static_cast<uint32_t>(cb);
                    m4r::scan::selectiveScanKernel<T, kN, kLast>(p);
                });
            }
            for (auto& th : threads)
            {
                th.join();
            }
        }
    }
}

// Same capacity dispatch as launchForType in selectiveScanKernel.cu.
template <typename T, bool kLast>
void dispatch(ScanParams const& p)
{
    if (p.dstate <= 16)
    {
        launch<T, 16, kLast>(p);
    }
    else if (p.dstate <= 32)
    {
        launch<T, 32, kLast>(p);
    }
    else
    {
        launch<T, 64, kLast>(p);
    }
}

float toF(float v)
{
    return v;
}
float toF(__half v)
{
    return __half2float(v);
}
float toF(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}
template <typename T>
T fromF(float v);
template <>
float fromF<float>(float v)
{
    return v;
}
template <>
__half fromF<__half>(float v)
{
    return __float2half_rn(v);
}
template <>
__nv_bfloat16 fromF<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

// I/O copy of `v` in type T; `v` is rounded in place to what the kernel sees.
template <typename T>
std::vector<T> toIo(std::vector<float>& v)
{
    std::vector<T> out(v.size());
    for (size_t i = 0; i < v.size(); ++i)
    {
        out[i] = fromF<T>(v[i]);
        v[i] = toF(out[i]);
    }
    return out;
}

template <typename T>
int runCase(int Bn, int Dn, int L, int N, bool last, bool withZ, char const* typeName)
{
    std::mt19937 rng(static_cast<unsigned>(Bn * 7919 + Dn * 104729 + L * 31 + N));
    std::normal_distribution<float> normal(0.F, 1.F);
    auto fill = [&](size_t n, float scale) {
        std::vector<float> v(n);
        for (auto& x : v)
        {
            x = scale * normal(rng);
        }
        return v;
    };
    size_t const nx = static_cast<size_t>(Bn) * Dn * L, nbc = static_cast<size_t>(Bn) * N * L;
    auto u = fill(nx, 1.F), delta = fill(nx, 0.5F), z = fill(nx, 1.F), B = fill(nbc, 1.F), C = fill(nbc, 1.F);
    auto D = fill(Dn, 1.F), bias = fill(Dn, 0.3F), A = fill(static_cast<size_t>(Dn) * N, 0.5F);
    for (auto& a : A)
    {
        a = -std::exp(a);
    }
    std::vector<int32_t> lengths(Bn);
    for (int b = 0; b < Bn; ++b)
    {
        lengths[b] = (b % 3 == 0) ? L + 5 : (b % 3 == 1 ? 0 : 1 + (7 * b) % L);
    }
    size_t const ny = last ? static_cast<size_t>(Bn) * Dn : nx;
    auto const ioU = toIo<T>(u), ioDelta = toIo<T>(delta), ioZ = toIo<T>(z), ioB = toIo<T>(B), ioC = toIo<T>(C);
    std::vector<T> ioY(ny, fromF<T>(NAN));
    std::vector<float> want(ny, NAN);

    ScanParams p;
    p.batch = Bn;
    p.dim = Dn;
    p.seqlen = L;
    p.dstate = N;
    p.deltaSoftplus = true;
    p.lastOnly = last;
    p.u = ioU.data();
    p.delta = ioDelta.data();
    p.A = A.data();
    p.B = ioB.data();
    p.C = ioC.data();
    p.D = D.data();
    p.z = withZ ? ioZ.data() : nullptr;
    p.deltaBias = bias.data();
    p.lengths = lengths.data();
    p.y = ioY.data();
    if (last)
    {
        dispatch<T, true>(p);
    }
    else
    {
        dispatch<T, false>(p);
    }
    m4r_scan_cpu_f32(u.data(), delta.data(), A.data(), B.data(), C.data(), D.data(), withZ ? z.data() : nullptr,
        bias.data(), lengths.data(), Bn, Dn, L, N, 1, last ? 1 : 0, want.data());
    double worst = 0.0;
    for (size_t i = 0; i < ny; ++i)
    {
        // Rounding the reference to T as well leaves only reassociation differences (none expected).
        double const ref = toF(fromF<T>(want[i]));
        double const err = std::fabs(toF(ioY[i]) - ref) / (1.0 + std::fabs(ref));
        worst = std::isnan(err) ? INFINITY : std::max(worst, err);
    }
    bool const ok = worst <= 1e-5; // same math on the same host: differences are reassociation only
    std::printf("%s B=%d D=%d L=%d N=%d %s mode=%s z=%s: max rel err %.3g\n", ok ? "ok  " : "FAIL", Bn, Dn, L, N,
        typeName, last ? "last" : "all", withZ ? "yes" : "no", worst);
    return ok ? 0 : 1;
}
} // namespace

int main()
{
    int failures = 0;
    // Partial channel blocks (70 = 64 + 6), several time tiles (45, 100 > 32), each state capacity
    // (N = 5 -> 16, 20 -> 32, 64 -> 64), L = 1, and lengths 0 / over-long / in range in mode "last".
    int const shapes[][4] = {{3, 70, 45, 5}, {2, 64, 33, 20}, {2, 130, 100, 64}, {4, 8, 1, 4}};
    for (auto const& s : shapes)
    {
        for (bool last : {false, true})
        {
            failures += runCase<float>(s[0], s[1], s[2], s[3], last, true, "fp32");
            failures += runCase<__half>(s[0], s[1], s[2], s[3], last, true, "fp16");
            failures += runCase<__nv_bfloat16>(s[0], s[1], s[2], s[3], last, true, "bf16");
        }
    }
    failures += runCase<float>(2, 9, 40, 16, false, false, "fp32");
    failures += runCase<__half>(2, 9, 40, 16, true, false, "fp16");
    std::printf("%s\n", failures == 0 ? "PASS" : "FAIL");
    return failures == 0 ? 0 : 1;
}
