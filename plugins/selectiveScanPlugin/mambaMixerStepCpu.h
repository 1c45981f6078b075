/*
 * Fused Mamba mixer, one streaming step (m4r::MambaMixerStep, README-MambaMixerStep.md): for each row one new
 * position x (d_model) and the state after the history before it -> the output at that position and the new
 * state, in one pass: in_proj -> conv step on the (d_conv - 1)-wide window -> SiLU -> x_proj -> dt_proj ->
 * softplus -> h' = exp(dt A) h + dt u B -> y = (C . h' + D u) silu(z) -> out_proj. fp32; single-threaded
 * (threads are the caller's: one call per block of rows). Weights as in mambaMixerCpu.h (pre-transposed).
 */
#ifndef M4R_MAMBA_MIXER_STEP_CPU_H
#define M4R_MAMBA_MIXER_STEP_CPU_H

#include "mambaMixerCpu.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * rows rows: x (rows, d_model), conv_state (rows, d_inner, d_conv - 1), h (rows, d_inner, d_state)
 * -> y (rows, d_model), conv_state_out (rows, d_inner, d_conv - 1), h_out (rows, d_inner, d_state).
 * The outputs may alias the state inputs (in-place update). Exponents dt * A are clamped at -80 before exp, and
 * softplus is x for x > 20 (as PyTorch's), like every other form of the scan.
 * Returns 0 (OK), 1 (bad argument), 2 (out of memory).
 */
int m4r_mixer_step_rows(M4RMixerWeights const* w, int64_t rows, float const* x, float const* conv_state,
    float const* h, float* y, float* conv_state_out, float* h_out);

#ifdef __cplusplus
}
#endif

#endif /* M4R_MAMBA_MIXER_STEP_CPU_H */
