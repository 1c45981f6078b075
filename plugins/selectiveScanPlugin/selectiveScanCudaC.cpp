// C entry points of libm4r_scan_cuda.so, for callers without C++ (the GPU self-check loads it with ctypes).
// Kept out of the kernel objects so that the TensorRT plugin libraries export only their TensorRT entry points.
#include "selectiveScanKernel.h"

// C entry point (device pointers; `stream` is a cudaStream_t or null). Returns the cudaError_t value.
extern "C" __attribute__((visibility("default"))) int m4r_scan_cuda(int32_t ioType, void const* u, void const* delta,
    float const* A, void const* B, void const* C, float const* D, void const* z, float const* deltaBias,
    int32_t const* lengths, int32_t batch, int32_t dim, int32_t seqlen, int32_t dstate, int32_t deltaSoftplus,
    int32_t lastOnly, void* y, void* stream)
{
    m4r::scan::ScanParams p;
    p.ioType = static_cast<m4r::scan::IoType>(ioType);
    p.batch = batch;
    p.dim = dim;
    p.seqlen = seqlen;
    p.dstate = dstate;
    p.deltaSoftplus = deltaSoftplus != 0;
    p.lastOnly = lastOnly != 0;
    p.u = u;
    p.delta = delta;
    p.A = A;
    p.B = B;
    p.C = C;
    p.D = D;
    p.z = z;
    p.deltaBias = deltaBias;
    p.lengths = lengths;
    p.y = y;
    return static_cast<int>(m4r::scan::launchSelectiveScan(p, static_cast<cudaStream_t>(stream)));
}

// Human-readable message for a value returned by m4r_scan_cuda.
extern "C" __attribute__((visibility("default"))) char const* m4r_scan_cuda_error_string(int code)
{
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}
