// ctest without a GPU: runs the real CUDA kernel source (selectiveScanKernel.cuh, fp32/fp16/bf16
// instantiations) on host threads, chosen by the real launch decision (selectiveScanDispatch.h, shared
// with selectiveScanKernel.cu), and compares it with the CPU reference. This checks the launch checks,
// the state-capacity and mode dispatch, the kernel's indexing, tiling, partial blocks, I/O conversions,
// mode "last", delta_softplus = 0 and the optional inputs (null lengths, D, delta_bias, z); the GPU
// self-check (scripts/gpu_check.sh) covers what only a GPU can (device math, speed).
#include "kernelEmulation.h" // first: it redefines the CUDA keywords

#include "selectiveScanCpu.h"

#include <cstdio>
#include <random>

namespace
{
using m4r::scan::ScanParams;

struct Options
{
    bool last{false};
    bool withZ{true};
    bool softplus{true};
    bool withLengths{true};
    bool withD{true};
    bool withBias{true};
};

template <typename T>
int runCase(int Bn, int Dn, int L, int N, Options const& o, char const* typeName)
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
    if (!o.softplus)
    {
        for (auto* v : {&delta, &bias}) // without softplus dt must stay positive for a stable decay
        {
            for (auto& x : *v)
            {
                x = std::fabs(x) + 0.05F;
            }
        }
    }
    std::vector<int32_t> lengths(Bn);
    for (int b = 0; b < Bn; ++b)
    {
        lengths[b] = (b % 3 == 0) ? L + 5 : (b % 3 == 1 ? 0 : 1 + (7 * b) % L);
    }
    size_t const ny = o.last ? static_cast<size_t>(Bn) * Dn : nx;
    auto const ioU = emu::toIo<T>(u), ioDelta = emu::toIo<T>(delta), ioZ = emu::toIo<T>(z);
    auto const ioB = emu::toIo<T>(B), ioC = emu::toIo<T>(C);
    std::vector<T> ioY(ny, emu::fromF<T>(NAN));
    std::vector<float> want(ny, NAN);
    float const* dPtr = o.withD ? D.data() : nullptr;
    float const* biasPtr = o.withBias ? bias.data() : nullptr;
    int32_t const* lenPtr = o.withLengths ? lengths.data() : nullptr;

    ScanParams p;
    p.ioType = sizeof(T) == 4 ? m4r::scan::IoType::kFLOAT32
                              : (std::is_same<T, __half>::value ? m4r::scan::IoType::kFLOAT16
                                                                : m4r::scan::IoType::kBFLOAT16);
    p.batch = Bn;
    p.dim = Dn;
    p.seqlen = L;
    p.dstate = N;
    p.deltaSoftplus = o.softplus;
    p.lastOnly = o.last;
    p.u = ioU.data();
    p.delta = ioDelta.data();
    p.A = A.data();
    p.B = ioB.data();
    p.C = ioC.data();
    p.D = dPtr;
    p.z = o.withZ ? ioZ.data() : nullptr;
    p.deltaBias = biasPtr;
    p.lengths = lenPtr;
    p.y = ioY.data();
    cudaError_t const status = emu::emulatedLaunch(p);
    m4r_scan_cpu_f32(u.data(), delta.data(), A.data(), B.data(), C.data(), dPtr, o.withZ ? z.data() : nullptr,
        biasPtr, lenPtr, Bn, Dn, L, N, o.softplus ? 1 : 0, o.last ? 1 : 0, want.data());
    double const worst = emu::worstRelError(ioY, want);
    bool const ok = status == cudaSuccess && worst <= 1e-5; // same math on the same host: reassociation only
    std::printf("%s B=%d D=%d L=%d N=%d %s mode=%s z=%s softplus=%d lengths=%s D=%s bias=%s: max rel err %.3g\n",
        ok ? "ok  " : "FAIL", Bn, Dn, L, N, typeName, o.last ? "last" : "all", o.withZ ? "yes" : "no",
        o.softplus ? 1 : 0, o.withLengths ? "yes" : "null", o.withD ? "yes" : "null", o.withBias ? "yes" : "null",
        worst);
    return ok ? 0 : 1;
}
//! seqlen 0 (README "Empty inputs"): mode "last" writes y = 0 over a buffer of NaN (no stale memory); mode
//! "all" has an empty y and succeeds without launching.
template <typename T>
int runSeqZero(bool last, char const* typeName)
{
    int const Bn = 3, Dn = 70, N = 20;
    std::vector<float> A(static_cast<size_t>(Dn) * N, -1.F), D(Dn, 1.F), bias(Dn, 0.5F);
    std::vector<T> dummy(1, emu::fromF<T>(1.F)); // u, delta, B, C, z hold no element; any non-null pointer
    std::vector<int32_t> lengths = {0, 1, 5};
    std::vector<T> ioY(static_cast<size_t>(Bn) * Dn, emu::fromF<T>(NAN));
    ScanParams p;
    p.ioType = sizeof(T) == 4 ? m4r::scan::IoType::kFLOAT32
                              : (std::is_same<T, __half>::value ? m4r::scan::IoType::kFLOAT16
                                                                : m4r::scan::IoType::kBFLOAT16);
    p.batch = Bn;
    p.dim = Dn;
    p.seqlen = 0;
    p.dstate = N;
    p.deltaSoftplus = true;
    p.lastOnly = last;
    p.u = p.delta = p.B = p.C = p.z = dummy.data();
    p.A = A.data();
    p.D = D.data();
    p.deltaBias = bias.data();
    p.lengths = lengths.data();
    p.y = ioY.data();
    cudaError_t const status = emu::emulatedLaunch(p);
    bool ok = status == cudaSuccess;
    for (T const& y : ioY)
    {
        float const f = emu::toF(y);
        ok = ok && (last ? f == 0.F : std::isnan(f)); // "all": y is empty, the buffer is not touched
    }
    std::printf("%s B=%d D=%d L=0 N=%d %s mode=%s: %s\n", ok ? "ok  " : "FAIL", Bn, Dn, N, typeName,
        last ? "last" : "all", last ? "y = 0" : "no launch, success");
    return ok ? 0 : 1;
}
} // namespace

int main()
{
    int failures = 0;
    for (bool last : {false, true})
    {
        failures += runSeqZero<float>(last, "fp32");
        failures += runSeqZero<__half>(last, "fp16");
        failures += runSeqZero<__nv_bfloat16>(last, "bf16");
    }
    // Partial channel blocks (70 = 64 + 6), several time tiles (45, 100 > 32), each state capacity
    // (N = 5 -> 16; 20 and 32 -> 32; 64 -> 64), L = 1, and lengths 0 / over-long / in range in mode "last".
    int const shapes[][4] = {{3, 70, 45, 5}, {2, 64, 33, 20}, {2, 130, 100, 64}, {4, 8, 1, 4}, {3, 16, 40, 32}};
    for (auto const& s : shapes)
    {
        for (bool last : {false, true})
        {
            Options o;
            o.last = last;
            failures += runCase<float>(s[0], s[1], s[2], s[3], o, "fp32");
            failures += runCase<__half>(s[0], s[1], s[2], s[3], o, "fp16");
            failures += runCase<__nv_bfloat16>(s[0], s[1], s[2], s[3], o, "bf16");
        }
    }
    // The optional parts of the contract, in both modes: no gate, delta_softplus = 0, no lengths, no D,
    // no delta_bias (N = 20 and 17: the 32-slot capacity, as the default model's d_state = 32).
    for (bool last : {false, true})
    {
        Options noZ;
        noZ.last = last;
        noZ.withZ = false;
        failures += runCase<float>(2, 9, 40, 16, noZ, "fp32");
        Options raw;
        raw.last = last;
        raw.softplus = false;
        failures += runCase<float>(3, 9, 37, 17, raw, "fp32");
        failures += runCase<__half>(3, 9, 37, 20, raw, "fp16");
        Options nulls;
        nulls.last = last;
        nulls.withLengths = false;
        nulls.withD = false;
        nulls.withBias = false;
        failures += runCase<float>(3, 9, 37, 20, nulls, "fp32");
        failures += runCase<__nv_bfloat16>(3, 9, 37, 24, nulls, "bf16");
    }
    std::printf("%s\n", failures == 0 ? "PASS" : "FAIL");
    return failures == 0 ? 0 : 1;
}
