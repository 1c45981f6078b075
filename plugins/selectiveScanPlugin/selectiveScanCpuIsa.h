// Which instruction-set build of the CPU kernels runs: one rule for the scan (selectiveScanCpuFast.cpp), the fused
// mixer (mambaMixerCpu.cpp) and the streaming step (mambaMixerStepCpu.cpp), so that M4R_SCAN_GENERIC (baseline
// code only) and M4R_SCAN_NO_AVX512 (AVX2 at most) force the same path in all of them; the ctests that run each
// instruction set check that it is the one that ran. Only meaningful where the AVX builds exist (x86-64, GCC or
// clang: the callers' M4R_*_HAVE_AVX2 guards).
#pragma once

#include <cstdlib>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
namespace m4r
{
namespace cpu_isa
{

//! AVX2 and FMA are present, and M4R_SCAN_GENERIC is unset.
inline bool avx2()
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && std::getenv("M4R_SCAN_GENERIC") == nullptr;
}

//! avx2(), AVX-512 F/VL/DQ/BW are present, and M4R_SCAN_NO_AVX512 is unset.
inline bool avx512()
{
    return avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")
        && std::getenv("M4R_SCAN_NO_AVX512") == nullptr;
}

} // namespace cpu_isa
} // namespace m4r
#endif
