// CPU reference of SelectiveScan: a direct loop over batch, channel and time using the shared step math.
#include "selectiveScanCpu.h"

#include "selectiveScanMath.h"

#include <cstddef>
#include <vector>

namespace
{
using m4r::scan::gate;
using m4r::scan::lastIndex;
using m4r::scan::skipOutput;
using m4r::scan::stepSize;
using m4r::scan::updateState;

void scanChannel(float const* u, float const* delta, float const* a, float const* B, float const* C, float d,
    float const* z, float bias, int32_t seqlen, int32_t dstate, bool softplus, int32_t stopAt, bool lastOnly,
    std::vector<float>& h, float* y)
{
    for (int32_t n = 0; n < dstate; ++n)
    {
        h[n] = 0.F;
    }
    for (int32_t t = 0; t <= stopAt; ++t)
    {
        float const dt = stepSize(delta[t], bias, softplus);
        float const dtu = dt * u[t];
        float hc = 0.F;
        for (int32_t n = 0; n < dstate; ++n)
        {
            std::size_t const bt = static_cast<std::size_t>(n) * seqlen + t;
            h[n] = updateState(h[n], dt, a[n], dtu, B[bt]);
            hc += h[n] * C[bt];
        }
        if (!lastOnly || t == stopAt)
        {
            float const out = skipOutput(hc, d, u[t]);
            y[lastOnly ? 0 : t] = z != nullptr ? gate(out, z[t]) : out;
        }
    }
}
} // namespace

extern "C" int m4r_scan_cpu_f32(float const* u, float const* delta, float const* A, float const* B, float const* C,
    float const* D, float const* z, float const* deltaBias, int32_t const* lengths, int32_t batch, int32_t dim,
    int32_t seqlen, int32_t dstate, int32_t deltaSoftplus, int32_t lastOnly, float* y)
{
    if (u == nullptr || delta == nullptr || A == nullptr || B == nullptr || C == nullptr || y == nullptr || batch < 1
        || dim < 1 || seqlen < 1 || dstate < 1)
    {
        return M4R_SCAN_BAD_ARGUMENT;
    }
    std::vector<float> h(static_cast<std::size_t>(dstate));
    std::size_t const L = static_cast<std::size_t>(seqlen);
    for (int32_t b = 0; b < batch; ++b)
    {
        // Mode "all" is causal and ignores lengths; mode "last" stops at the row's last valid position.
        int32_t const stopAt = lastOnly ? lastIndex(lengths != nullptr ? lengths[b] : seqlen, seqlen) : seqlen - 1;
        float const* Bb = B + static_cast<std::size_t>(b) * dstate * L;
        float const* Cb = C + static_cast<std::size_t>(b) * dstate * L;
        for (int32_t c = 0; c < dim; ++c)
        {
            std::size_t const row = (static_cast<std::size_t>(b) * dim + c) * L;
            float* yRow = lastOnly ? y + static_cast<std::size_t>(b) * dim + c : y + row;
            scanChannel(u + row, delta + row, A + static_cast<std::size_t>(c) * dstate, Bb, Cb,
                D != nullptr ? D[c] : 0.F, z != nullptr ? z + row : nullptr, deltaBias != nullptr ? deltaBias[c] : 0.F,
                seqlen, dstate, deltaSoftplus != 0, stopAt, lastOnly != 0, h, yRow);
        }
    }
    return M4R_SCAN_OK;
}

extern "C" char const* m4r_scan_cpu_version(void)
{
    return "1";
}
