// ONNX Runtime kernel of m4r::ScoreTopK (README-ScoreTopK.md): glue only; the math is scoreTopKCpu.h.
// Work items (item ranges x row groups) run on ONNX Runtime's intra-op pool, so the session's
// intra_op_num_threads decides the parallelism. fp16 inputs are read as fp16 (no fp32 copy of the table).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include "ortScoreTopKOp.h"
#include "ortOpSupport.h"
#include "scoreTopKCpu.h"

#include <atomic>
#include <cstdint>
#include <exception>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace
{
std::atomic<int64_t> gTopKCalls{0};

constexpr char kOp[] = "m4r::ScoreTopK";

[[noreturn]] void fail(OrtErrorCode code, std::string message)
{
    m4r::ort_op::fail(kOp, code, std::move(message));
}

template <typename Fn>
OrtStatus* guarded(Fn&& fn)
{
    return m4r::ort_op::guarded(kOp, std::forward<Fn>(fn));
}

using m4r::ort_op::shapeStr;

template <typename T>
constexpr ONNXTensorElementDataType kType = std::is_same_v<T, float> ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                                                                     : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;

void ortParallelFor(void* ctx, void (*fn)(void*, size_t), size_t count, void* arg)
{
    if (count == 1)
        return fn(arg, 0);
    Ort::ThrowOnError(
        Ort::GetApi().KernelContext_ParallelFor(static_cast<OrtKernelContext*>(ctx), fn, count, 0, arg));
}

template <typename T>
struct TopKKernel
{
    int64_t k = 1;

    OrtStatusPtr ComputeV2(OrtKernelContext* context)
    {
        return guarded([&] { compute(context); });
    }

    void compute(OrtKernelContext* context)
    {
        Ort::KernelContext ctx(context);
        size_t const inputs = ctx.GetInputCount();
        auto shape = [&](size_t i) { return ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetShape(); };
        auto const us = shape(0), ts = shape(1);
        if (us.size() != 2 || ts.size() != 2 || us[1] != ts[1])
            fail(ORT_INVALID_ARGUMENT,
                "user " + shapeStr(us) + " and table " + shapeStr(ts) + " must be (batch, d) and (n_items, d)");
        int64_t const batch = us[0], n = ts[0];
        std::vector<int64_t> es{batch, 0};
        if (inputs > 2 && ctx.GetInput(2) != nullptr)
            es = shape(2);
        if (es.size() != 2 || es[0] != batch)
            fail(ORT_INVALID_ARGUMENT, "exclude_items " + shapeStr(es) + " must be (batch, E) with batch " + std::to_string(batch));
        if (k < 1 || k > n)
            fail(ORT_INVALID_ARGUMENT,
                "k=" + std::to_string(k) + " must be in [1, n_items] (the table has " + std::to_string(n) + " rows)");
        std::vector<int64_t> const outShape{batch, k};
        Ort::UnownedValue scores = ctx.GetOutput(0, outShape);
        Ort::UnownedValue items = ctx.GetOutput(1, outShape);
        if (batch == 0)
            return;
        M4RScoreTopKArgs a{};
        a.user = ctx.GetInput(0).GetTensorRawData();
        a.table = ctx.GetInput(1).GetTensorRawData();
        a.dtype = std::is_same_v<T, float> ? M4R_TOPK_F32 : M4R_TOPK_F16;
        a.batch = batch;
        a.n_items = n;
        a.dim = us[1];
        a.exclude = es[1] > 0 ? ctx.GetInput(2).GetTensorData<int64_t>() : nullptr;
        a.exclude_width = es[1];
        a.k = k;
        std::vector<float> store;
        float* out = nullptr;
        if constexpr (std::is_same_v<T, float>)
            out = scores.GetTensorMutableData<float>();
        else
        {
            store.resize(static_cast<size_t>(batch * k));
            out = store.data();
        }
        int const rc = m4r_score_topk(&a, out, items.GetTensorMutableData<int64_t>(), 1, &ortParallelFor, context);
        if (rc != 0)
            fail(rc == 2 ? ORT_RUNTIME_EXCEPTION : ORT_INVALID_ARGUMENT,
                "the CPU kernel failed (m4r_score_topk returned " + std::to_string(rc) + ")");
        if constexpr (!std::is_same_v<T, float>)
        {
            auto* o = scores.GetTensorMutableData<Ort::Float16_t>();
            for (size_t i = 0; i < store.size(); ++i)
                o[i] = Ort::Float16_t(store[i]); // exact: the kernel's fp16 scores are already fp16 values
        }
        gTopKCalls.fetch_add(1, std::memory_order_relaxed);
    }
};

template <typename T>
struct TopKOp : Ort::CustomOpBase<TopKOp<T>, TopKKernel<T>, /*WithStatus=*/true>
{
    OrtStatusPtr CreateKernelV2(OrtApi const&, OrtKernelInfo const* info, void** kernel) const
    {
        return guarded([&] {
            Ort::ConstKernelInfo kinfo(info);
            *kernel = new TopKKernel<T>{kinfo.GetAttribute<int64_t>("k")};
        });
    }
    char const* GetName() const { return "ScoreTopK"; }
    size_t GetInputTypeCount() const { return 3; }
    ONNXTensorElementDataType GetInputType(size_t i) const
    {
        return i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : kType<T>;
    }
    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const
    {
        return i == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    }
    size_t GetOutputTypeCount() const { return 2; }
    ONNXTensorElementDataType GetOutputType(size_t i) const
    {
        return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : kType<T>;
    }
};

TopKOp<float> gTopKF32;
TopKOp<Ort::Float16_t> gTopKF16;
} // namespace

namespace m4r
{
OrtCustomOp* scoreTopKOpF32()
{
    return &gTopKF32;
}
OrtCustomOp* scoreTopKOpF16()
{
    return &gTopKF16;
}
int64_t scoreTopKComputeCalls()
{
    return gTopKCalls.load(std::memory_order_relaxed);
}
} // namespace m4r

// Number of ScoreTopK node executions served by this library in this process (proves the native op ran).
extern "C" __attribute__((visibility("default"))) int64_t m4r_ort_ops_topk_calls(void)
{
    return m4r::scoreTopKComputeCalls();
}
