/*
 * SelectiveScan CUDA kernel.
 *
 * Work decomposition, chosen for recommender shapes (many rows, D = 128-512, N = 16-64, L up to a few
 * thousand): one thread per (row, channel) walks the sequence and keeps its N states and its row of A in
 * registers; a block holds kChannels channels of one row. Time advances in tiles of kTimeTile steps:
 *  - B and C of the row are loaded once per tile into shared memory and read by every channel of the
 *    block (broadcast reads), instead of once per channel from global memory;
 *  - u, delta and z are staged through shared memory so that global loads walk contiguous time steps
 *    (coalesced) although each thread consumes one channel; y is written back the same way.
 * Rows padded by one float keep the per-channel reads free of bank conflicts.
 *
 * Mode "last" (serving) runs each row only up to its last valid position, never loads C or z except at
 * that position, does no C.h reduction on the way and writes one value per channel: no per-step global
 * writes.
 */
#ifndef M4R_SELECTIVE_SCAN_KERNEL_CUH
#define M4R_SELECTIVE_SCAN_KERNEL_CUH


// tests/scanKernelEmulation.cpp runs this kernel on host threads; it includes these headers itself,
// before it redefines the CUDA keywords they rely on.
#if !defined(M4R_KERNEL_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "selectiveScanDispatch.h"
#include "selectiveScanKernel.h"
#include "selectiveScanMath.h"

namespace m4r
{
namespace scan
{

template <typename T>
__device__ __forceinline__ float toFloat(T v);
template <>
__device__ __forceinline__ float toFloat<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ float toFloat<__half>(__half v)
{
    return __half2float(v);
}
template <>
__device__ __forceinline__ float toFloat<__nv_bfloat16>(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T fromFloat(float v);
template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

//! T: I/O element type; kN: register capacity for the state (>= p.dstate); kLast: mode "last".
//! grid = (batch, ceil(dim / kChannels)), block = kChannels.
template <typename T, int32_t kN, bool kLast>
__global__ void __launch_bounds__(kChannels) selectiveScanKernel(ScanParams const p)
{
    // In mode "last" z and C are read once from global memory, so their tiles shrink to one element.
    constexpr int32_t kTileRows = kLast ? 1 : kChannels;
    constexpr int32_t kCTile = kLast ? 1 : kN;
    __shared__ float sU[kChannels][kTimeTile + 1]; // u in, y out (mode "all": each thread owns its row)
    __shared__ float sDelta[kChannels][kTimeTile + 1];
    __shared__ float sZ[kTileRows][kTimeTile + 1];
    __shared__ float sB[kN][kTimeTile];
    __shared__ float sC[kCTile][kTimeTile];

    int32_t const b = blockIdx.x;
    int32_t const c = threadIdx.x;
    int32_t const d0 = blockIdx.y * kChannels;
    int32_t const d = d0 + c;
    int32_t const nChannels = min(kChannels, p.dim - d0);
    bool const active = c < nChannels;
    int32_t const N = p.dstate;
    int64_t const L = p.seqlen;
    bool const hasZ = p.z != nullptr;

    // Row bases: channel block [d0, d0 + nChannels) of row b, and the row's B and C.
    int64_t const chanBase = (static_cast<int64_t>(b) * p.dim + d0) * L;
    int64_t const bcBase = static_cast<int64_t>(b) * N * L;
    T const* __restrict__ u = static_cast<T const*>(p.u) + chanBase;
    T const* __restrict__ delta = static_cast<T const*>(p.delta) + chanBase;
    T const* __restrict__ z = hasZ ? static_cast<T const*>(p.z) + chanBase : nullptr;
    T const* __restrict__ Bm = static_cast<T const*>(p.B) + bcBase;
    T const* __restrict__ Cm = static_cast<T const*>(p.C) + bcBase;

    if (kLast && L == 0)
    {
        // seqlen 0: no position to read out; y = 0 (uniform over the grid, so no thread reaches a barrier)
        if (active)
        {
            static_cast<T*>(p.y)[static_cast<int64_t>(b) * p.dim + d] = fromFloat<T>(0.F);
        }
        return;
    }

    float a[kN];
    float h[kN];
#pragma unroll
    for (int32_t n = 0; n < kN; ++n)
    {
        a[n] = (active && n < N) ? p.A[static_cast<int64_t>(d) * N + n] : 0.F;
        h[n] = 0.F;
    }
    float const dSkip = (active && p.D != nullptr) ? p.D[d] : 0.F;
    float const bias = (active && p.deltaBias != nullptr) ? p.deltaBias[d] : 0.F;
    int32_t const stopAt = kLast ? lastIndex(p.lengths != nullptr ? p.lengths[b] : p.seqlen, p.seqlen) : p.seqlen - 1;

    for (int32_t t0 = 0; t0 <= stopAt; t0 += kTimeTile)
    {
        int32_t const tileLen = min(kTimeTile, stopAt + 1 - t0);
        __syncthreads(); // the previous tile is consumed and written out
        for (int32_t i = c; i < nChannels * kTimeTile; i += kChannels)
        {
            int32_t const cc = i / kTimeTile;
            int32_t const tt = i % kTimeTile;
            if (tt < tileLen)
            {
                int64_t const g = cc * L + t0 + tt;
                sU[cc][tt] = toFloat(u[g]);
                sDelta[cc][tt] = toFloat(delta[g]);
                if (!kLast && hasZ)
                {
                    sZ[kLast ? 0 : cc][tt] = toFloat(z[g]);
                }
            }
        }
        for (int32_t i = c; i < N * kTimeTile; i += kChannels)
        {
            int32_t const n = i / kTimeTile;
            int32_t const tt = i % kTimeTile;
            if (tt < tileLen)
            {
                int64_t const g = n * L + t0 + tt;
                sB[n][tt] = toFloat(Bm[g]);
                if (!kLast)
                {
                    sC[kLast ? 0 : n][tt] = toFloat(Cm[g]);
                }
            }
        }
        __syncthreads();

        if (active)
        {
            for (int32_t tt = 0; tt < tileLen; ++tt)
            {
                float const uu = sU[c][tt];
                float const dt = stepSize(sDelta[c][tt], bias, p.deltaSoftplus);
                float const dtu = dt * uu;
                float hc = 0.F;
#pragma unroll
                for (int32_t n = 0; n < kN; ++n)
                {
                    if (n < N)
                    {
                        h[n] = updateState(h[n], dt, a[n], dtu, sB[n][tt]);
                        if (!kLast)
                        {
                            hc += h[n] * sC[kLast ? 0 : n][tt];
                        }
                    }
                }
                if (!kLast)
                {
                    float const out = skipOutput(hc, dSkip, uu);
                    sU[c][tt] = hasZ ? gate(out, sZ[kLast ? 0 : c][tt]) : out;
                }
            }
        }

        if (!kLast)
        {
            __syncthreads();
            T* __restrict__ y = static_cast<T*>(p.y) + chanBase;
            for (int32_t i = c; i < nChannels * kTimeTile; i += kChannels)
            {
                int32_t const cc = i / kTimeTile;
                int32_t const tt = i % kTimeTile;
                if (tt < tileLen)
                {
                    y[cc * L + t0 + tt] = fromFloat<T>(sU[cc][tt]);
                }
            }
        }
    }

    if (kLast && active)
    {
        // All threads of the block read the same C[:, stopAt] addresses: served as broadcasts.
        float hc = 0.F;
#pragma unroll
        for (int32_t n = 0; n < kN; ++n)
        {
            if (n < N)
            {
                hc += h[n] * toFloat(Cm[n * L + stopAt]);
            }
        }
        int64_t const g = c * L + stopAt;
        float const out = skipOutput(hc, dSkip, toFloat(u[g]));
        static_cast<T*>(p.y)[static_cast<int64_t>(b) * p.dim + d] = fromFloat<T>(hasZ ? gate(out, toFloat(z[g])) : out);
    }
}

} // namespace scan
} // namespace m4r

#endif // M4R_SELECTIVE_SCAN_KERNEL_CUH
