// Dispatch of the SelectiveScan kernel over I/O type, state capacity and mode.
#include "selectiveScanKernel.cuh"

namespace m4r
{
namespace scan
{
namespace
{

template <typename T, int32_t kN>
cudaError_t launchForN(ScanParams const& p, cudaStream_t stream)
{
    dim3 const grid(static_cast<uint32_t>(p.batch), static_cast<uint32_t>((p.dim + kChannels - 1) / kChannels));
    if (p.lastOnly)
    {
        selectiveScanKernel<T, kN, true><<<grid, kChannels, 0, stream>>>(p);
    }
    else
    {
        selectiveScanKernel<T, kN, false><<<grid, kChannels, 0, stream>>>(p);
    }
    return cudaGetLastError();
}

template <typename T>
cudaError_t launchForType(ScanParams const& p, cudaStream_t stream)
{
    // Register capacity rounds the state size up to 16/32/64; unused slots are skipped by `n < N`.
    if (p.dstate <= 16)
    {
        return launchForN<T, 16>(p, stream);
    }
    if (p.dstate <= 32)
    {
        return launchForN<T, 32>(p, stream);
    }
    return launchForN<T, kMaxDState>(p, stream);
}

} // namespace

char const* unsupportedReason(ScanParams const& p) noexcept
{
    if (p.batch < 0 || p.dim < 1 || p.seqlen < 1 || p.dstate < 1)
    {
        return "SelectiveScan: batch must be >= 0 and dim, seqlen, dstate >= 1";
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

cudaError_t launchSelectiveScan(ScanParams const& p, cudaStream_t stream) noexcept
{
    if (unsupportedReason(p) != nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (p.batch == 0)
    {
        return cudaSuccess;
    }
    switch (p.ioType)
    {
    case IoType::kFLOAT32: return launchForType<float>(p, stream);
    case IoType::kFLOAT16: return launchForType<__half>(p, stream);
    case IoType::kBFLOAT16: return launchForType<__nv_bfloat16>(p, stream);
    }
    return cudaErrorInvalidValue;
}

} // namespace scan
} // namespace m4r
