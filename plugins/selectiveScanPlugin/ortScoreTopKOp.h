// m4r::ScoreTopK for ONNX Runtime's CPU execution provider (exact top-K scoring, README-ScoreTopK.md).
// ortCustomOp.cpp's RegisterCustomOps adds these ops to the "m4r" domain beside SelectiveScan.
#ifndef M4R_ORT_SCORE_TOPK_OP_H
#define M4R_ORT_SCORE_TOPK_OP_H

#include <cstdint>

struct OrtCustomOp;

namespace m4r
{
OrtCustomOp* scoreTopKOpF32();
OrtCustomOp* scoreTopKOpF16();
int64_t scoreTopKComputeCalls();
} // namespace m4r

#endif
