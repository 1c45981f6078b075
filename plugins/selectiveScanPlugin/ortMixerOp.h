// m4r::MambaMixer for ONNX Runtime's CPU execution provider (fused Mamba block, README-MambaMixer.md).
// ortCustomOp.cpp's RegisterCustomOps adds these ops to the "m4r" domain beside SelectiveScan.
#ifndef M4R_ORT_MIXER_OP_H
#define M4R_ORT_MIXER_OP_H

#include <cstdint>

struct OrtCustomOp;

namespace m4r
{
OrtCustomOp* mixerOpF32();
OrtCustomOp* mixerOpF16();
int64_t mixerComputeCalls();
} // namespace m4r

#endif
