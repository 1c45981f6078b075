/*
 * The launch decision of the SelectiveScan kernels: argument checks, then I/O type x state capacity x mode.
 *
 * Header-only and free of CUDA syntax so that the two callers run the SAME decision:
 *  - selectiveScanKernel.cu launches the chosen selectiveScanKernel<T, kN, kLast> on a CUDA stream;
 *  - tests/scanKernelEmulation.cpp and tests/pluginCoreTest.cpp run the chosen instantiation on host
 *    threads (no GPU), so a wrong capacity or a swapped mode here fails those ctests.
 * Include cuda_fp16.h and cuda_bf16.h before this header (both callers do).
 */
#ifndef M4R_SELECTIVE_SCAN_DISPATCH_H
#define M4R_SELECTIVE_SCAN_DISPATCH_H

#include "selectiveScanKernel.h"
#include "selectiveScanMath.h"

#include <cstdint>

namespace m4r
{
namespace scan
{

constexpr int32_t kChannels = 64; //!< channels (threads) per block
constexpr int32_t kTimeTile = 32; //!< time steps staged per shared-memory tile

//! One kernel instantiation: I/O type T, register capacity kN (>= dstate), mode "last" (kLast).
template <typename T, int32_t kN, bool kLast>
struct KernelChoice
{
    using Type = T;
    static constexpr int32_t kStates = kN;
    static constexpr bool kLastOnly = kLast;
};

//! Null when the kernels can run `p`, otherwise a static message saying which limit it breaks.
inline char const* checkScanParams(ScanParams const& p) noexcept
{
    if (p.batch < 0 || p.dim < 1 || p.seqlen < 0 || p.dstate < 1)
    {
        return "SelectiveScan: batch and seqlen must be >= 0 and dim, dstate >= 1";
    }
    if (p.dstate > kMaxDState)
    {
        return "SelectiveScan: dstate (N) above 64 is not supported by the CUDA kernels";
    }
    if ((p.dim + kChannels - 1) / kChannels > 65535)
    {
        return "SelectiveScan: dim above 4194240 is not supported";
    }
    if (p.u == nullptr || p.delta == nullptr || p.A == nullptr || p.B == nullptr || p.C == nullptr || p.y == nullptr)
    {
        return "SelectiveScan: u, delta, A, B, C and y must not be null";
    }
    if (p.ioType != IoType::kFLOAT32 && p.ioType != IoType::kFLOAT16 && p.ioType != IoType::kBFLOAT16)
    {
        return "SelectiveScan: I/O type must be fp32, fp16 or bf16";
    }
    return nullptr;
}

namespace detail
{
template <typename T, int32_t kN, typename Launch>
cudaError_t dispatchMode(ScanParams const& p, Launch& launch)
{
    if (p.lastOnly)
    {
        return launch(KernelChoice<T, kN, true>{});
    }
    return launch(KernelChoice<T, kN, false>{});
}

template <typename T, typename Launch>
cudaError_t dispatchCapacity(ScanParams const& p, Launch& launch)
{
    // Register capacity rounds the state size up to 16/32/64; unused slots are skipped by `n < N`.
    if (p.dstate <= 16)
    {
        return dispatchMode<T, 16>(p, launch);
    }
    if (p.dstate <= 32)
    {
        return dispatchMode<T, 32>(p, launch);
    }
    return dispatchMode<T, kMaxDState>(p, launch);
}
} // namespace detail

//! Checks `p`, then calls `launch(KernelChoice<T, kN, kLast>{})` for the one instantiation that runs it.
//! Returns cudaErrorInvalidValue when checkScanParams(p) is not null, cudaSuccess for an empty y (batch 0,
//! or seqlen 0 in mode "all": launch not called), otherwise what `launch` returns. Seqlen 0 in mode "last"
//! launches: the kernel writes y = 0 (the empty history's state is zero; README "Empty inputs").
template <typename Half, typename BFloat16, typename Launch>
cudaError_t dispatchSelectiveScan(ScanParams const& p, Launch&& launch)
{
    if (checkScanParams(p) != nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (p.batch == 0 || (p.seqlen == 0 && !p.lastOnly))
    {
        return cudaSuccess;
    }
    switch (p.ioType)
    {
    case IoType::kFLOAT32: return detail::dispatchCapacity<float>(p, launch);
    case IoType::kFLOAT16: return detail::dispatchCapacity<Half>(p, launch);
    case IoType::kBFLOAT16: return detail::dispatchCapacity<BFloat16>(p, launch);
    }
    return cudaErrorInvalidValue;
}

} // namespace scan
} // namespace m4r

#endif // M4R_SELECTIVE_SCAN_DISPATCH_H
