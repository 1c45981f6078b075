/*
 * Host API of the SelectiveScan CUDA kernels (no TensorRT dependency).
 * Used by the TensorRT plugin (enqueue) and, through the C entry point, by the GPU self-check.
 */
#ifndef M4R_SELECTIVE_SCAN_KERNEL_H
#define M4R_SELECTIVE_SCAN_KERNEL_H

#include <cuda_runtime_api.h>

#include <cstdint>

namespace m4r
{
namespace scan
{

//! Element type of u, delta, B, C, z and y. A, D, delta_bias and the state are always fp32.
enum class IoType : int32_t
{
    kFLOAT32 = 0,
    kFLOAT16 = 1,
    kBFLOAT16 = 2,
};

//! One scan call. Every tensor is contiguous in the op contract's layout:
//! u, delta, z: (batch, dim, seqlen); A: (dim, dstate); B, C: (batch, dstate, seqlen); D, deltaBias: (dim);
//! lengths: (batch) int32; y: (batch, dim, seqlen) or, when lastOnly, (batch, dim).
//! D, deltaBias, z and lengths may be null (zero skip, zero bias, no gate, full length).
struct ScanParams
{
    IoType ioType{IoType::kFLOAT32};
    int32_t batch{0};
    int32_t dim{0};
    int32_t seqlen{0};
    int32_t dstate{0};
    bool deltaSoftplus{true};
    bool lastOnly{false};
    void const* u{nullptr};
    void const* delta{nullptr};
    float const* A{nullptr};
    void const* B{nullptr};
    void const* C{nullptr};
    float const* D{nullptr};
    void const* z{nullptr};
    float const* deltaBias{nullptr};
    int32_t const* lengths{nullptr};
    void* y{nullptr};
};

//! Null when the kernels can run `p`, otherwise a static message saying which limit it breaks.
char const* unsupportedReason(ScanParams const& p) noexcept;

//! Enqueue the scan on `stream`. Returns cudaErrorInvalidValue when unsupportedReason(p) is not null,
//! otherwise the launch status. An empty batch is a no-op.
cudaError_t launchSelectiveScan(ScanParams const& p, cudaStream_t stream) noexcept;

} // namespace scan
} // namespace m4r

#endif // M4R_SELECTIVE_SCAN_KERNEL_H
