/*
 * One batch row of the optimised CPU scan on strided fp32 views (internal C++ interface of the objects behind
 * libm4r_scan_native.so and libm4r_ort_ops.so; the public C ABI is selectiveScanCpuFast.h).
 *
 * The fused Mamba mixer (mambaMixerCpu.cpp) calls it on its time-major buffers directly: u and dt as (L, d_inner),
 * z inside in_proj's output, B and C inside x_proj's output, y as (L, d_inner), so no transposes or copies sit
 * between the projections and the scan. m4r_scan_native_forward calls it on channel-first rows (time stride 1).
 * Same math as the op contract (README.md in this folder): dt = softplus(delta + bias), h = exp(max(dt A, -80)) h
 * + dt u B, y = (C.h + D u) silu(z); single-threaded, denormals flushed for the call (as the C entry points).
 */
#ifndef M4R_SELECTIVE_SCAN_CPU_ROW_H
#define M4R_SELECTIVE_SCAN_CPU_ROW_H

#include <cstddef>
#include <cstdint>

namespace m4r
{
namespace scan
{

//! Strided fp32 views of one row. Element (t, c) of u is u[t * uT + c * uC], likewise delta, z and y; element
//! (t, s) of B and C is B[t * bcT + s] (states contiguous). A is (dim, n) row-major.
struct ScanRow
{
    float const* u;
    int64_t uT, uC;
    float const* delta;
    int64_t dT, dC;
    float const* z; //!< NULL: no gate
    int64_t zT, zC;
    float const* B;
    float const* C;
    int64_t bcT;
    float const* A;
    float const* D;    //!< NULL: no skip term
    float const* bias; //!< NULL: zero bias
    int32_t dim;       //!< channels
    int32_t steps;     //!< positions 0 .. steps - 1 are scanned
    int32_t n;         //!< states per channel
    bool softplus;
    bool lastOnly; //!< true: y[c * yC] = output at position steps - 1 only; false: every position
    float* y;
    int64_t yT, yC;
};

//! Positions per time tile of forwardRow (every channel block's states advance one tile before the next).
constexpr int32_t kTimeTile = 64;

//! Floats of workspace forwardRow needs for `steps` positions, `n` states and `dim` channels (64-byte alignment
//! included).
std::size_t rowWorkspaceFloats(int32_t steps, int32_t n, int32_t dim);

//! Scans one row (see ScanRow) with the instruction set chosen at run time (rowIsa()): forwardRowInit, then
//! forwardRowAdvance over [0, steps).
void forwardRow(ScanRow const& row, float* workspace);

//! A row in pieces (the fused mixer scans each chunk of positions as soon as its inputs are computed): Init starts
//! the row in `workspace` (the decay factors from A, zero states; reads A, dim, n and steps only), then Advance
//! calls over consecutive ranges [t0, t1) covering [0, steps) carry the states across. For one Advance call the
//! views point at position t0: element (t, c) of u is u[(t - t0) * uT + c * uC], likewise delta, z, B, C and (when
//! !lastOnly) y; with lastOnly, y is written by the call whose range holds steps - 1. Every call of one row passes
//! the same workspace and the same A, dim, n, steps, softplus and lastOnly. The result is bitwise that of
//! forwardRow (a position's arithmetic does not depend on the tiles); with every t0 a multiple of kTimeTile the
//! pieces also run forwardRow's tiles.
void forwardRowInit(ScanRow const& row, float* workspace);
void forwardRowAdvance(ScanRow const& row, int32_t t0, int32_t t1, float* workspace);

//! The instruction set forwardRow dispatches to: "avx512" (16 lanes), "avx2+fma" (8 lanes) or "generic".
//! $M4R_SCAN_GENERIC forces "generic", $M4R_SCAN_NO_AVX512 rules out "avx512".
char const* rowIsa();

} // namespace scan
} // namespace m4r

#endif // M4R_SELECTIVE_SCAN_CPU_ROW_H
