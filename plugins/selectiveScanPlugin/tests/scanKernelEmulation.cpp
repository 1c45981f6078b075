// ctest without a GPU: runs the real CUDA kernel source (selectiveScanKernel.cuh, fp32 instantiations) on
// host threads and compares it with the CPU reference. One std::thread per CUDA thread, a barrier for
// __syncthreads(), function-static arrays for __shared__, blocks run one at a time. This checks the
// kernel's indexing, tiling, partial blocks, state-capacity dispatch and mode "last" logic; the GPU
// self-check (scripts/gpu_check.sh) covers what only a GPU can (fp16/bf16 conversions, speed).
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

template <int32_t kN, bool kLast>
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
                    m4r::scan::selectiveScanKernel<float, kN, kLast>(p);
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
template <bool kLast>
void dispatch(ScanParams const& p)
{
    if (p.dstate <= 16)
    {
        launch<16, kLast>(p);
    }
    else if (p.dstate <= 32)
    {
        launch<32, kLast>(p);
    }
    else
    {
        launch<64, kLast>(p);
    }
}

int runCase(int Bn, int Dn, int L, int N, bool last, bool withZ)
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
    std::vector<float> got(ny, NAN), want(ny, NAN);

    ScanParams p;
    p.batch = Bn;
    p.dim = Dn;
    p.seqlen = L;
    p.dstate = N;
    p.deltaSoftplus = true;
    p.lastOnly = last;
    p.u = u.data();
    p.delta = delta.data();
    p.A = A.data();
    p.B = B.data();
    p.C = C.data();
    p.D = D.data();
    p.z = withZ ? z.data() : nullptr;
    p.deltaBias = bias.data();
    p.lengths = lengths.data();
    p.y = got.data();
    if (last)
    {
        dispatch<true>(p);
    }
    else
    {
        dispatch<false>(p);
    }
    m4r_scan_cpu_f32(u.data(), delta.data(), A.data(), B.data(), C.data(), D.data(), withZ ? z.data() : nullptr,
        bias.data(), lengths.data(), Bn, Dn, L, N, 1, last ? 1 : 0, want.data());
    double worst = 0.0;
    for (size_t i = 0; i < ny; ++i)
    {
        double const err = std::fabs(got[i] - want[i]) / (1.0 + std::fabs(want[i]));
        worst = std::isnan(err) ? INFINITY : std::max(worst, err);
    }
    bool const ok = worst <= 1e-5; // same math on the same host: differences are reassociation only
    std::printf("%s B=%d D=%d L=%d N=%d mode=%s z=%s: max rel err %.3g\n", ok ? "ok  " : "FAIL", Bn, Dn, L, N,
        last ? "last" : "all", withZ ? "yes" : "no", worst);
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
            failures += runCase(s[0], s[1], s[2], s[3], last, true);
        }
    }
    failures += runCase(2, 9, 40, 16, false, false);
    failures += runCase(2, 9, 40, 16, true, false);
    std::printf("%s\n", failures == 0 ? "PASS" : "FAIL");
    return failures == 0 ? 0 : 1;
}
