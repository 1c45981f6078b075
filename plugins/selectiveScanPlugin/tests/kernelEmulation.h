// Host emulation of the SelectiveScan CUDA kernel for ctests without a GPU: the real kernel source
// (selectiveScanKernel.cuh) runs on host threads, one std::thread per CUDA thread, a barrier for
// __syncthreads(), function-static arrays for __shared__, blocks one at a time. The instantiation is
// chosen by the real launch decision (selectiveScanDispatch.h), the one selectiveScanKernel.cu uses.
// Include this header first, in one translation unit per executable.
#ifndef M4R_KERNEL_EMULATION_H
#define M4R_KERNEL_EMULATION_H

#include <cuda_bf16.h> // before the CUDA keywords are redefined below
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

struct EmuIdx
{
    uint32_t x{0}, y{0}, z{0};
};
inline thread_local EmuIdx threadIdx;
inline thread_local EmuIdx blockIdx;

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
inline EmuBarrier* gBarrier = nullptr;

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

#include "selectiveScanKernel.cuh"

namespace emu
{
using m4r::scan::kChannels;
using m4r::scan::ScanParams;

template <typename T, int32_t kN, bool kLast>
void launchBlocks(ScanParams const& p)
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

//! What launchSelectiveScan does on a GPU, on host threads: same checks, same dispatch, same kernel.
inline cudaError_t emulatedLaunch(ScanParams const& p)
{
    return m4r::scan::dispatchSelectiveScan<__half, __nv_bfloat16>(p, [&](auto choice) -> cudaError_t {
        using Choice = decltype(choice);
        launchBlocks<typename Choice::Type, Choice::kStates, Choice::kLastOnly>(p);
        return cudaSuccess;
    });
}

// ---- helpers shared by the emulation ctests: I/O conversions as the kernel sees them -----------------------
inline float toF(float v)
{
    return v;
}
inline float toF(__half v)
{
    return __half2float(v);
}
inline float toF(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}
template <typename T>
T fromF(float v);
template <>
inline float fromF<float>(float v)
{
    return v;
}
template <>
inline __half fromF<__half>(float v)
{
    return __float2half_rn(v);
}
template <>
inline __nv_bfloat16 fromF<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

//! I/O copy of `v` in type T; `v` is rounded in place to what the kernel sees.
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

//! Worst relative error |got - want| / (1 + |want|) with the reference rounded to T too; NaN -> inf.
template <typename T>
double worstRelError(std::vector<T> const& got, std::vector<float> const& want)
{
    double worst = 0.0;
    for (size_t i = 0; i < want.size(); ++i)
    {
        double const ref = toF(fromF<T>(want[i]));
        double const err = std::fabs(toF(got[i]) - ref) / (1.0 + std::fabs(ref));
        worst = std::isnan(err) ? INFINITY : std::max(worst, err);
    }
    return worst;
}
} // namespace emu

#endif // M4R_KERNEL_EMULATION_H
