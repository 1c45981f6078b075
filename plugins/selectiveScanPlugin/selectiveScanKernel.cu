// Host launcher of the SelectiveScan kernel; the launch decision is selectiveScanDispatch.h.
#include "selectiveScanKernel.cuh"

namespace m4r
{
namespace scan
{
char const* unsupportedReason(ScanParams const& p) noexcept
{
    return checkScanParams(p);
}

cudaError_t launchSelectiveScan(ScanParams const& p, cudaStream_t stream) noexcept
{
    // The launch decision lives in selectiveScanDispatch.h, shared with the host-emulation ctests.
    return dispatchSelectiveScan<__half, __nv_bfloat16>(p, [&](auto choice) -> cudaError_t {
        using Choice = decltype(choice);
        dim3 const grid(static_cast<uint32_t>(p.batch), static_cast<uint32_t>((p.dim + kChannels - 1) / kChannels));
        selectiveScanKernel<typename Choice::Type, Choice::kStates, Choice::kLastOnly>
            <<<grid, kChannels, 0, stream>>>(p);
        return cudaGetLastError();
    });
}

} // namespace scan
} // namespace m4r
