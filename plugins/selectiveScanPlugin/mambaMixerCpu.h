/*
 * Fused Mamba mixer on the CPU (m4r::MambaMixer, README-MambaMixer.md): in_proj -> causal depthwise conv ->
 * SiLU -> x_proj -> dt_proj -> (softplus inside) selective scan -> gate -> out_proj for one batch row, in one
 * pass over that row's buffers, fp32. The scan is the optimised kernel of selectiveScanCpuFast.h (called
 * single-threaded); threads are the caller's (one call per row, e.g. ONNX Runtime's intra-op pool).
 *
 * Weights are passed pre-transposed (x @ W^T becomes x @ Wt with Wt row-major (in, out)) so that a batch
 * transposes them once: m4r_mixer_transpose does it.
 */
#ifndef M4R_MAMBA_MIXER_CPU_H
#define M4R_MAMBA_MIXER_CPU_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct M4RMixerWeights
{
    int32_t d_model, d_inner, d_state, dt_rank, d_conv;
    float const* in_proj_t;  /* (d_model, 2 * d_inner) = in_proj.weight^T */
    float const* conv_w;     /* (d_inner, d_conv)       = conv1d.weight[:, 0, :] */
    float const* conv_b;     /* (d_inner) or NULL */
    float const* x_proj_t;   /* (d_inner, dt_rank + 2 * d_state) = x_proj.weight^T */
    float const* dt_proj_t;  /* (dt_rank, d_inner)      = dt_proj.weight^T */
    float const* dt_bias;    /* (d_inner) */
    float const* A;          /* (d_inner, d_state)      = -exp(A_log) */
    float const* D;          /* (d_inner) */
    float const* out_proj_t; /* (d_inner, d_model)      = out_proj.weight^T */
} M4RMixerWeights;

/* out (cols, rows) = in (rows, cols)^T */
void m4r_mixer_transpose(float const* in, int64_t rows, int64_t cols, float* out);

/*
 * One row: x (seqlen, d_model) -> y. last_only: y (d_model) is the output at position clamp(length, 1, seqlen) - 1
 * and positions after it are never read (causal); else y (seqlen, d_model) and length is ignored.
 * Returns 0 (OK), 1 (bad argument), 2 (out of memory).
 */
int m4r_mixer_forward_row(M4RMixerWeights const* w, float const* x, int32_t seqlen, int32_t length,
    int32_t last_only, float* y);

#ifdef __cplusplus
}

namespace m4r
{
namespace mixer
{
//! Positions per chunk of m4r_mixer_forward_row (mambaMixerCpu.cpp).
constexpr int32_t kChunk = 128;

//! m4r_mixer_forward_row with `chunk` positions per chunk (a positive multiple of m4r::scan::kTimeTile, else 1 is
//! returned); the result does not depend on it (bitwise). Internal: the tests compare chunk sizes.
int forwardRow(M4RMixerWeights const* w, float const* x, int32_t seqlen, int32_t length, int32_t last_only,
    float* y, int32_t chunk);
} // namespace mixer
} // namespace m4r
#endif

#endif /* M4R_MAMBA_MIXER_CPU_H */
