// Which instruction-set build of the CPU kernels runs: one rule for the scan (selectiveScanCpuFast.cpp), the fused
// mixer (mambaMixerCpu.cpp) and the streaming step (mambaMixerStepCpu.cpp), so that M4R_SCAN_GENERIC (baseline
// code only) and M4R_SCAN_NO_AVX512 (AVX2 at most) force the same path in all of them; the ctests that run each
// instruction set check that it is the one that ran. Only meaningful where the AVX builds exist (x86-64, GCC or
// clang: the callers' M4R_*_HAVE_AVX2 guards).
#pragma once

#include <cstdlib>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
//! The AVX builds exist (x86-64, GCC or clang).
#define M4R_ISA_X86 1

//! The target features of each build: the same sets the run-time checks below ask the CPU for.
#define M4R_ISA_AVX2 "avx2,fma"
#define M4R_ISA_AVX512 "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"

//! M4R_ISA_BEGIN(M4R_ISA_AVX2) ... M4R_ISA_END: every function defined between them is compiled for those
//! features (a namespace of kernels included from an .inl), whatever the file's own flags.
#define M4R_ISA_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define M4R_ISA_BEGIN(features)                                                                                        \
    M4R_ISA_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define M4R_ISA_END M4R_ISA_PRAGMA(clang attribute pop)
#else
#define M4R_ISA_BEGIN(features) M4R_ISA_PRAGMA(GCC push_options) M4R_ISA_PRAGMA(GCC target(features))
#define M4R_ISA_END M4R_ISA_PRAGMA(GCC pop_options)
#endif

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
