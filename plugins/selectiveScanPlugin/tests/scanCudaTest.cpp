// ctest: CUDA kernels vs the CPU reference for fp32/fp16/bf16 I/O, modes all/last, several shapes.
// Exits 77 (ctest: skipped) when no GPU is visible, so it can run in CPU-only CI.
#include "selectiveScanCpu.h"
#include "selectiveScanKernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <random>
#include <vector>

namespace
{
using m4r::scan::IoType;

#define CHECK_CUDA(call)                                                                                               \
    do                                                                                                                 \
    {                                                                                                                  \
        cudaError_t const e_ = (call);                                                                                 \
        if (e_ != cudaSuccess)                                                                                         \
        {                                                                                                              \
            std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);                      \
            std::exit(1);                                                                                              \
        }                                                                                                              \
    } while (0)

// Device buffer holding `host` converted to the I/O type; `host` is rounded in place to what the GPU sees.
struct DevBuf
{
    void* ptr{nullptr};
    DevBuf(std::vector<float>& host, IoType t)
    {
        size_t const n = host.size();
        if (t == IoType::kFLOAT32)
        {
            CHECK_CUDA(cudaMalloc(&ptr, n * sizeof(float)));
            CHECK_CUDA(cudaMemcpy(ptr, host.data(), n * sizeof(float), cudaMemcpyHostToDevice));
        }
        else if (t == IoType::kFLOAT16)
        {
            std::vector<__half> h(n);
            for (size_t i = 0; i < n; ++i)
            {
                h[i] = __float2half(host[i]);
                host[i] = __half2float(h[i]);
            }
            CHECK_CUDA(cudaMalloc(&ptr, n * sizeof(__half)));
            CHECK_CUDA(cudaMemcpy(ptr, h.data(), n * sizeof(__half), cudaMemcpyHostToDevice));
        }
        else
        {
            std::vector<__nv_bfloat16> h(n);
            for (size_t i = 0; i < n; ++i)
            {
                h[i] = __float2bfloat16(host[i]);
                host[i] = __bfloat162float(h[i]);
            }
            CHECK_CUDA(cudaMalloc(&ptr, n * sizeof(__nv_bfloat16)));
            CHECK_CUDA(cudaMemcpy(ptr, h.data(), n * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
        }
    }
    DevBuf(DevBuf const&) = delete;
    DevBuf& operator=(DevBuf const&) = delete;
    ~DevBuf()
    {
        cudaFree(ptr);
    }
};

std::vector<float> download(void const* dev, size_t n, IoType t)
{
    std::vector<float> out(n);
    if (t == IoType::kFLOAT32)
    {
        CHECK_CUDA(cudaMemcpy(out.data(), dev, n * sizeof(float), cudaMemcpyDeviceToHost));
    }
    else if (t == IoType::kFLOAT16)
    {
        std::vector<__half> h(n);
        CHECK_CUDA(cudaMemcpy(h.data(), dev, n * sizeof(__half), cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < n; ++i)
        {
            out[i] = __half2float(h[i]);
        }
    }
    else
    {
        std::vector<__nv_bfloat16> h(n);
        CHECK_CUDA(cudaMemcpy(h.data(), dev, n * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < n; ++i)
        {
            out[i] = __bfloat162float(h[i]);
        }
    }
    return out;
}

int runCase(int Bn, int Dn, int L, int N, IoType t, bool last)
{
    std::mt19937 rng(static_cast<unsigned>(Bn * 1000003 + Dn * 1009 + L * 31 + N));
    std::normal_distribution<float> normal(0.F, 1.F);
    auto fill = [&](size_t count, float scale) {
        std::vector<float> v(count);
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
    std::vector<int32_t> lengths(Bn);
    for (int b = 0; b < Bn; ++b)
    {
        lengths[b] = (b % 3 == 0) ? L + 7 : (b % 3 == 1 ? 0 : 1 + b % L); // over-long, zero, in range
    }
    DevBuf du(u, t), dd(delta, t), dz(z, t), dB(B, t), dC(C, t), dA(A, IoType::kFLOAT32), dD(D, IoType::kFLOAT32),
        dbias(bias, IoType::kFLOAT32);
    int32_t* dlen = nullptr;
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&dlen), Bn * sizeof(int32_t)));
    CHECK_CUDA(cudaMemcpy(dlen, lengths.data(), Bn * sizeof(int32_t), cudaMemcpyHostToDevice));
    size_t const ny = last ? static_cast<size_t>(Bn) * Dn : nx;
    size_t const elt = t == IoType::kFLOAT32 ? 4 : 2;
    void* dy = nullptr;
    CHECK_CUDA(cudaMalloc(&dy, ny * elt));

    m4r::scan::ScanParams p;
    p.ioType = t;
    p.batch = Bn;
    p.dim = Dn;
    p.seqlen = L;
    p.dstate = N;
    p.deltaSoftplus = true;
    p.lastOnly = last;
    p.u = du.ptr;
    p.delta = dd.ptr;
    p.A = static_cast<float const*>(dA.ptr);
    p.B = dB.ptr;
    p.C = dC.ptr;
    p.D = static_cast<float const*>(dD.ptr);
    p.z = dz.ptr;
    p.deltaBias = static_cast<float const*>(dbias.ptr);
    p.lengths = dlen;
    p.y = dy;
    CHECK_CUDA(m4r::scan::launchSelectiveScan(p, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    auto const got = download(dy, ny, t);
    cudaFree(dy);
    cudaFree(dlen);

    std::vector<float> want(ny);
    m4r_scan_cpu_f32(u.data(), delta.data(), A.data(), B.data(), C.data(), D.data(), z.data(), bias.data(),
        lengths.data(), Bn, Dn, L, N, 1, last ? 1 : 0, want.data());
    // Inputs are identical (rounded to the I/O type above); the output is rounded once more.
    double const tol = t == IoType::kFLOAT32 ? 1e-4 : (t == IoType::kFLOAT16 ? 4e-3 : 3e-2);
    double worst = 0.0;
    for (size_t i = 0; i < ny; ++i)
    {
        double const err = std::fabs(got[i] - want[i]) / (1.0 + std::fabs(want[i]));
        worst = std::isnan(err) ? INFINITY : std::max(worst, err);
    }
    char const* names[] = {"fp32", "fp16", "bf16"};
    bool const ok = worst <= tol;
    std::printf("%s B=%d D=%d L=%d N=%d %s mode=%s: max rel err %.3g (tol %.1g)\n", ok ? "ok  " : "FAIL", Bn, Dn, L, N,
        names[static_cast<int>(t)], last ? "last" : "all", worst, tol);
    return ok ? 0 : 1;
}
} // namespace

int main()
{
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0)
    {
        std::printf("no CUDA device: skipped\n");
        return 77;
    }
    int failures = 0;
    int const shapes[][4] = {{3, 70, 45, 16}, {2, 64, 33, 20}, {2, 130, 100, 64}, {5, 8, 1, 4}};
    for (auto const& s : shapes)
    {
        for (IoType t : {IoType::kFLOAT32, IoType::kFLOAT16, IoType::kBFLOAT16})
        {
            for (bool last : {false, true})
            {
                failures += runCase(s[0], s[1], s[2], s[3], t, last);
            }
        }
    }
    std::printf("%s\n", failures == 0 ? "PASS" : "FAIL");
    return failures == 0 ? 0 : 1;
}
