// m4r::MambaMixerStep for ONNX Runtime's CPU execution provider (fused streaming step, README-MambaMixerStep.md).
// ortCustomOp.cpp's RegisterCustomOps adds these ops to the "m4r" domain beside SelectiveScan and MambaMixer.
#ifndef M4R_ORT_MIXER_STEP_OP_H
#define M4R_ORT_MIXER_STEP_OP_H

#include <cstdint>

struct OrtCustomOp;

namespace m4r
{
OrtCustomOp* mixerStepOpF32();
OrtCustomOp* mixerStepOpF16();
int64_t mixerStepComputeCalls();
} // namespace m4r

#endif
