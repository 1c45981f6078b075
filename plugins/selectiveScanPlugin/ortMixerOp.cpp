// ONNX Runtime kernel of m4r::MambaMixer (README-MambaMixer.md): glue only; the math is mambaMixerCpu.h.
// One work item per batch row on ONNX Runtime's intra-op pool; weights are transposed (and fp16 converted to
// fp32) once, when the kernel is created, if they are constant in the graph, else once per call. fp16 I/O is computed in fp32 and rounded once at the output.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include "mambaMixerCpu.h"
#include "ortMixerOp.h"
#include "ortOpSupport.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace
{
std::atomic<int64_t> gMixerCalls{0};

constexpr size_t kInputs = 11;
char const* const kNames[kInputs] = {"hidden", "lengths", "in_proj_weight", "conv_weight", "conv_bias",
    "x_proj_weight", "dt_proj_weight", "dt_bias", "A", "D", "out_proj_weight"};

constexpr char kOp[] = "m4r::MambaMixer";

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
using m4r::ort_op::Elem;

struct RowWork
{
    M4RMixerWeights w{};
    float const* x = nullptr;      // (batch, seqlen, d_model) fp32
    int32_t const* lengths = nullptr;
    float* y = nullptr;            // (batch, d_model) or (batch, seqlen, d_model) fp32
    int32_t seqlen = 0;
    int32_t lastOnly = 0;
    std::atomic<int> status{0};

    static void entry(void* self, size_t row)
    {
        auto* s = static_cast<RowWork*>(self);
        int64_t const b = static_cast<int64_t>(row), dm = s->w.d_model;
        int const rc = m4r_mixer_forward_row(&s->w, s->x + b * s->seqlen * dm, s->seqlen,
            s->lengths != nullptr ? s->lengths[b] : s->seqlen, s->lastOnly,
            s->y + (s->lastOnly ? b * dm : b * s->seqlen * dm));
        if (rc != 0)
            s->status.store(rc, std::memory_order_relaxed);
    }
};

// The weights (inputs 2..10) in the kernel's layout: fp32, projections transposed. Built once when the kernel is
// created if every weight is constant in the graph (initializers after ONNX Runtime's constant folding), else
// per call.
struct PackedWeights
{
    std::vector<float> store[9];
    M4RMixerWeights w{};
};

template <typename T>
struct MixerKernel
{
    bool lastOnly = true;
    std::unique_ptr<PackedWeights> constant;

    // get(i) -> input i; shapes as checked by compute()
    template <typename Get>
    static std::unique_ptr<PackedWeights> pack(Get&& get)
    {
        auto p = std::make_unique<PackedWeights>();
        auto shape = [&](size_t i) { return get(i).GetTensorTypeAndShapeInfo().GetShape(); };
        auto const a = shape(8), conv = shape(3), dtp = shape(6), win = shape(2);
        int64_t const di = a[0], n = a[1], r = dtp[1], k = conv[2], dm = win[1];
        auto copy = [&](size_t i, std::vector<float>& dst) {
            std::vector<float> tmp;
            float const* src = asFloat(get(i), tmp);
            dst.assign(src, src + get(i).GetTensorTypeAndShapeInfo().GetElementCount());
            return dst.data();
        };
        auto transposed = [&](size_t i, int64_t rows, int64_t cols, std::vector<float>& dst) {
            std::vector<float> tmp;
            dst.resize(static_cast<size_t>(rows * cols));
            m4r_mixer_transpose(asFloat(get(i), tmp), rows, cols, dst.data());
            return dst.data();
        };
        M4RMixerWeights& w = p->w;
        w.d_model = static_cast<int32_t>(dm);
        w.d_inner = static_cast<int32_t>(di);
        w.d_state = static_cast<int32_t>(n);
        w.dt_rank = static_cast<int32_t>(r);
        w.d_conv = static_cast<int32_t>(k);
        w.in_proj_t = transposed(2, 2 * di, dm, p->store[0]);
        w.conv_w = copy(3, p->store[1]);
        w.conv_b = copy(4, p->store[2]);
        w.x_proj_t = transposed(5, r + 2 * n, di, p->store[3]);
        w.dt_proj_t = transposed(6, di, r, p->store[4]);
        w.dt_bias = copy(7, p->store[5]);
        w.A = copy(8, p->store[6]);
        w.D = copy(9, p->store[7]);
        w.out_proj_t = transposed(10, dm, di, p->store[8]);
        return p;
    }

    OrtStatusPtr ComputeV2(OrtKernelContext* context)
    {
        return guarded([&] { compute(context); });
    }

    // Input i as fp32 (converted when T is fp16; fp32 inputs are used in place).
    static float const* asFloat(Ort::ConstValue const& v, std::vector<float>& store)
    {
        auto info = v.GetTensorTypeAndShapeInfo();
        if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
            return v.GetTensorData<float>();
        size_t const count = info.GetElementCount();
        T const* p = v.GetTensorData<T>();
        store.resize(count);
        for (size_t i = 0; i < count; ++i)
            store[i] = Elem<T>::get(p[i]);
        return store.data();
    }

    void compute(OrtKernelContext* context)
    {
        Ort::KernelContext ctx(context);
        if (ctx.GetInputCount() != kInputs)
            fail(ORT_INVALID_ARGUMENT, "needs 11 inputs, got " + std::to_string(ctx.GetInputCount()));
        auto shape = [&](size_t i) { return ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetShape(); };
        auto const hs = shape(0), win = shape(2), conv = shape(3), xp = shape(5), dtp = shape(6), a = shape(8),
                   wout = shape(10);
        if (hs.size() != 3 || win.size() != 2 || conv.size() != 3 || xp.size() != 2 || dtp.size() != 2
            || a.size() != 2 || wout.size() != 2)
            fail(ORT_INVALID_ARGUMENT, "hidden must be (batch, seqlen, d_model), got " + shapeStr(hs));
        int64_t const batch = hs[0], L = hs[1], dm = hs[2], di = a[0], n = a[1], r = dtp[1], k = conv[2];
        auto expect = [&](size_t i, std::vector<int64_t> const& want) {
            if (shape(i) != want)
                fail(ORT_INVALID_ARGUMENT,
                    std::string("input ") + kNames[i] + " has shape " + shapeStr(shape(i)) + ", expected "
                        + shapeStr(want));
        };
        expect(1, {batch});
        expect(2, {2 * di, dm});
        expect(3, {di, 1, k});
        expect(4, {di});
        expect(5, {r + 2 * n, di});
        expect(6, {di, r});
        expect(7, {di});
        expect(9, {di});
        expect(10, {dm, di});
        if (batch > INT32_MAX || L > INT32_MAX || dm > INT32_MAX || di > INT32_MAX)
            fail(ORT_INVALID_ARGUMENT, "hidden " + shapeStr(hs) + ": dimensions above 2^31 - 1 are not supported");
        std::vector<int64_t> const yShape{batch, lastOnly ? 1 : L, dm};
        Ort::UnownedValue out = ctx.GetOutput(0, yShape);
        if (batch == 0 || L == 0 || dm == 0)
            return;

        std::vector<float> st0;
        std::unique_ptr<PackedWeights> perCall;
        if (!constant)
            perCall = pack([&](size_t i) { return ctx.GetInput(i); });
        RowWork work;
        work.w = constant ? constant->w : perCall->w;
        work.x = asFloat(ctx.GetInput(0), st0);
        work.lengths = ctx.GetInput(1).GetTensorData<int32_t>();
        work.seqlen = static_cast<int32_t>(L);
        work.lastOnly = lastOnly ? 1 : 0;
        size_t const yCount = static_cast<size_t>(lastOnly ? batch * dm : batch * L * dm);
        std::vector<float> yStore;
        if constexpr (std::is_same_v<T, float>)
            work.y = out.GetTensorMutableData<float>();
        else
        {
            yStore.resize(yCount);
            work.y = yStore.data();
        }
        if (batch == 1)
            RowWork::entry(&work, 0);
        else
            Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(
                context, &RowWork::entry, static_cast<size_t>(batch), 0, &work));
        if (int const rc = work.status.load(); rc != 0)
            fail(rc == 2 ? ORT_RUNTIME_EXCEPTION : ORT_FAIL,
                "the CPU kernel failed (m4r_mixer_forward_row returned " + std::to_string(rc) + ")");
        if constexpr (!std::is_same_v<T, float>)
        {
            T* o = out.GetTensorMutableData<T>();
            for (size_t i = 0; i < yCount; ++i)
                o[i] = Elem<T>::put(yStore[i]);
        }
        gMixerCalls.fetch_add(1, std::memory_order_relaxed);
    }
};

bool readLastOnly(OrtKernelInfo const* info)
{
    Ort::ConstKernelInfo kinfo(info);
    std::string const mode = kinfo.GetAttribute<std::string>("mode");
    if (mode != "all" && mode != "last")
        fail(ORT_INVALID_ARGUMENT,
            "node '" + kinfo.GetNodeName() + "': attribute mode=\"" + mode
                + "\" is not supported (\"all\" or \"last\"); re-export the model with m4r export");
    return mode == "last";
}

template <typename T>
struct MixerOp : Ort::CustomOpBase<MixerOp<T>, MixerKernel<T>, /*WithStatus=*/true>
{
    OrtStatusPtr CreateKernelV2(OrtApi const&, OrtKernelInfo const* info, void** kernel) const
    {
        return guarded([&] {
            auto k = std::make_unique<MixerKernel<T>>();
            k->lastOnly = readLastOnly(info);
            Ort::ConstKernelInfo kinfo(info);
            bool allConstant = kinfo.GetInputCount() == kInputs;
            std::vector<Ort::ConstValue> values;
            for (size_t i = 2; allConstant && i < kInputs; ++i)
            {
                int isConstant = 0;
                values.push_back(kinfo.GetTensorConstantInput(i, &isConstant));
                allConstant = isConstant != 0;
            }
            // shapes are checked on every call (compute); a constant weight of a wrong rank is left to it
            if (allConstant && values[6].GetTensorTypeAndShapeInfo().GetShape().size() == 2
                && values[1].GetTensorTypeAndShapeInfo().GetShape().size() == 3
                && values[4].GetTensorTypeAndShapeInfo().GetShape().size() == 2
                && values[0].GetTensorTypeAndShapeInfo().GetShape().size() == 2)
                k->constant = MixerKernel<T>::pack([&](size_t i) { return values[i - 2]; });
            *kernel = k.release();
        });
    }
    char const* GetName() const { return "MambaMixer"; }
    size_t GetInputTypeCount() const { return kInputs; }
    ONNXTensorElementDataType GetInputType(size_t i) const
    {
        switch (i)
        {
        case 1: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32; // lengths
        case 7:
        case 8:
        case 9: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; // dt_bias, A, D: fp32 whatever T
        default: return Elem<T>::kType;
        }
    }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return Elem<T>::kType; }
};

MixerOp<float> gMixerF32;
MixerOp<Ort::Float16_t> gMixerF16;
} // namespace

namespace m4r
{
OrtCustomOp* mixerOpF32()
{
    return &gMixerF32;
}
OrtCustomOp* mixerOpF16()
{
    return &gMixerF16;
}
int64_t mixerComputeCalls()
{
    return gMixerCalls.load(std::memory_order_relaxed);
}
} // namespace m4r

// Number of MambaMixer node executions served by this library in this process (proves the fused kernel ran).
extern "C" __attribute__((visibility("default"))) int64_t m4r_ort_ops_mixer_calls(void)
{
    return m4r::mixerComputeCalls();
}
