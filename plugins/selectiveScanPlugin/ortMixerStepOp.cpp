// ONNX Runtime kernel of m4r::MambaMixerStep (README-MambaMixerStep.md): glue only; the math is
// mambaMixerStepCpu.h. Weights that are constant in the graph (initializers, after ONNX Runtime's constant
// folding) are transposed and converted to fp32 once, when the kernel is created; otherwise once per call.
// Blocks of rows run on ONNX Runtime's intra-op pool. fp16 I/O is computed in fp32; the conv state is rounded
// to fp16 on the way in and out, as the fp16 function body keeps it.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include "mambaMixerStepCpu.h"
#include "ortMixerStepOp.h"
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
std::atomic<int64_t> gStepCalls{0};

constexpr size_t kInputs = 12;
constexpr size_t kFirstWeight = 3;
char const* const kNames[kInputs] = {"hidden", "conv_state", "ssm_state", "in_proj_weight", "conv_weight",
    "conv_bias", "x_proj_weight", "dt_proj_weight", "dt_bias", "A", "D", "out_proj_weight"};
constexpr int64_t kRowsPerTask = 16;

constexpr char kOp[] = "m4r::MambaMixerStep";

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

template <typename T>
float roundT(float v)
{
    return Elem<T>::get(Elem<T>::put(v));
}

// The weights in the kernel's layout (fp32, projections transposed), with their shapes checked.
struct Packed
{
    std::vector<float> inT, convW, convB, xT, dtT, dtBias, A, D, outT;
    M4RMixerWeights w{};

    template <typename T>
    static std::vector<float> asFloat(Ort::ConstValue const& v)
    {
        auto info = v.GetTensorTypeAndShapeInfo();
        size_t const count = info.GetElementCount();
        std::vector<float> out(count);
        if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
            std::copy_n(v.GetTensorData<float>(), count, out.begin());
        else
        {
            T const* p = v.GetTensorData<T>();
            for (size_t i = 0; i < count; ++i)
                out[i] = Elem<T>::get(p[i]);
        }
        return out;
    }

    // get(i) -> the ConstValue of input i (kFirstWeight <= i < kInputs)
    template <typename T, typename Get>
    static std::unique_ptr<Packed> make(Get&& get)
    {
        auto shape = [&](size_t i) { return get(i).GetTensorTypeAndShapeInfo().GetShape(); };
        auto const win = shape(3), conv = shape(4), dtp = shape(7), a = shape(9), wout = shape(11);
        if (win.size() != 2 || conv.size() != 3 || dtp.size() != 2 || a.size() != 2 || wout.size() != 2)
            fail(ORT_INVALID_ARGUMENT, "weights of the wrong rank (in_proj_weight " + shapeStr(win) + ", A "
                    + shapeStr(a) + "); re-export the model with m4r export");
        int64_t const di = a[0], n = a[1], r = dtp[1], k = conv[2], dm = win[1];
        auto expect = [&](size_t i, std::vector<int64_t> const& want) {
            if (shape(i) != want)
                fail(ORT_INVALID_ARGUMENT, std::string("input ") + kNames[i] + " has shape " + shapeStr(shape(i))
                        + ", expected " + shapeStr(want));
        };
        expect(3, {2 * di, dm});
        expect(4, {di, 1, k});
        expect(5, {di});
        expect(6, {r + 2 * n, di});
        expect(7, {di, r});
        expect(8, {di});
        expect(10, {di});
        expect(11, {dm, di});
        if (k < 1 || k > 64 || di > INT32_MAX || dm > INT32_MAX || n > INT32_MAX || r > INT32_MAX)
            fail(ORT_INVALID_ARGUMENT, "conv_weight " + shapeStr(conv) + ": d_conv must be in [1, 64]");
        auto p = std::make_unique<Packed>();
        auto transposed = [&](size_t i, int64_t rows, int64_t cols) {
            std::vector<float> src = asFloat<T>(get(i)), dst(static_cast<size_t>(rows * cols));
            m4r_mixer_transpose(src.data(), rows, cols, dst.data());
            return dst;
        };
        p->inT = transposed(3, 2 * di, dm);
        p->convW = asFloat<T>(get(4));
        p->convB = asFloat<T>(get(5));
        p->xT = transposed(6, r + 2 * n, di);
        p->dtT = transposed(7, di, r);
        p->dtBias = asFloat<T>(get(8));
        p->A = asFloat<T>(get(9));
        p->D = asFloat<T>(get(10));
        p->outT = transposed(11, dm, di);
        M4RMixerWeights& w = p->w;
        w.d_model = static_cast<int32_t>(dm);
        w.d_inner = static_cast<int32_t>(di);
        w.d_state = static_cast<int32_t>(n);
        w.dt_rank = static_cast<int32_t>(r);
        w.d_conv = static_cast<int32_t>(k);
        w.in_proj_t = p->inT.data();
        w.conv_w = p->convW.data();
        w.conv_b = p->convB.data();
        w.x_proj_t = p->xT.data();
        w.dt_proj_t = p->dtT.data();
        w.dt_bias = p->dtBias.data();
        w.A = p->A.data();
        w.D = p->D.data();
        w.out_proj_t = p->outT.data();
        return p;
    }
};

struct StepWork
{
    M4RMixerWeights const* w = nullptr;
    int64_t rows = 0;
    float const* x = nullptr;
    float const* conv = nullptr;
    float const* h = nullptr;
    float* y = nullptr;
    float* convOut = nullptr;
    float* hOut = nullptr;
    std::atomic<int> status{0};

    static void entry(void* self, size_t task)
    {
        auto* s = static_cast<StepWork*>(self);
        int64_t const r0 = static_cast<int64_t>(task) * kRowsPerTask, m = std::min(kRowsPerTask, s->rows - r0);
        int64_t const dm = s->w->d_model, di = s->w->d_inner, kw = s->w->d_conv - 1, n = s->w->d_state;
        int const rc = m4r_mixer_step_rows(s->w, m, s->x + r0 * dm, kw > 0 ? s->conv + r0 * di * kw : nullptr,
            s->h + r0 * di * n, s->y + r0 * dm, kw > 0 ? s->convOut + r0 * di * kw : nullptr, s->hOut + r0 * di * n);
        if (rc != 0)
            s->status.store(rc, std::memory_order_relaxed);
    }
};

template <typename T>
struct StepKernel
{
    std::unique_ptr<Packed> constant; // the weights, when all are constant in the graph

    OrtStatusPtr ComputeV2(OrtKernelContext* context)
    {
        return guarded([&] { compute(context); });
    }

    void compute(OrtKernelContext* context)
    {
        Ort::KernelContext ctx(context);
        if (ctx.GetInputCount() != kInputs)
            fail(ORT_INVALID_ARGUMENT, "needs 12 inputs, got " + std::to_string(ctx.GetInputCount()));
        std::unique_ptr<Packed> perCall;
        if (!constant)
            perCall = Packed::make<T>([&](size_t i) { return ctx.GetInput(i); });
        M4RMixerWeights const& w = constant ? constant->w : perCall->w;
        int64_t const dm = w.d_model, di = w.d_inner, n = w.d_state, kw = w.d_conv - 1;
        auto const hs = ctx.GetInput(0).GetTensorTypeAndShapeInfo().GetShape();
        if (hs.size() != 2 || hs[1] != dm)
            fail(ORT_INVALID_ARGUMENT, "hidden must be (batch, " + std::to_string(dm) + "), got " + shapeStr(hs));
        int64_t const batch = hs[0];
        std::vector<int64_t> const convShape{batch, di, kw}, ssmShape{batch, di, n};
        auto const cs = ctx.GetInput(1).GetTensorTypeAndShapeInfo().GetShape();
        auto const ss = ctx.GetInput(2).GetTensorTypeAndShapeInfo().GetShape();
        if (cs != convShape)
            fail(ORT_INVALID_ARGUMENT, "input conv_state has shape " + shapeStr(cs) + ", expected " + shapeStr(convShape));
        if (ss != ssmShape)
            fail(ORT_INVALID_ARGUMENT, "input ssm_state has shape " + shapeStr(ss) + ", expected " + shapeStr(ssmShape));
        Ort::UnownedValue y = ctx.GetOutput(0, {batch, dm});
        Ort::UnownedValue convOut = ctx.GetOutput(1, convShape);
        Ort::UnownedValue hOut = ctx.GetOutput(2, ssmShape);
        if (batch == 0)
            return;
        StepWork work;
        work.w = &w;
        work.rows = batch;
        work.h = ctx.GetInput(2).GetTensorData<float>();
        work.hOut = hOut.GetTensorMutableData<float>();
        work.conv = ctx.GetInput(1).GetTensorData<float>();
        work.convOut = convOut.GetTensorMutableData<float>();
        std::vector<float> xStore, yStore, convStore;
        if constexpr (std::is_same_v<T, float>)
        {
            work.x = ctx.GetInput(0).GetTensorData<float>();
            work.y = y.GetTensorMutableData<float>();
        }
        else
        {
            T const* xp = ctx.GetInput(0).GetTensorData<T>();
            xStore.resize(static_cast<size_t>(batch * dm));
            for (size_t i = 0; i < xStore.size(); ++i)
                xStore[i] = Elem<T>::get(xp[i]);
            convStore.assign(work.conv, work.conv + batch * di * kw); // the body casts the conv state to T
            for (float& v : convStore)
                v = roundT<T>(v);
            yStore.resize(static_cast<size_t>(batch * dm));
            work.x = xStore.data();
            work.conv = convStore.data();
            work.y = yStore.data();
        }
        size_t const tasks = static_cast<size_t>((batch + kRowsPerTask - 1) / kRowsPerTask);
        if (tasks == 1)
            StepWork::entry(&work, 0);
        else
            Ort::ThrowOnError(
                Ort::GetApi().KernelContext_ParallelFor(context, &StepWork::entry, tasks, 0, &work));
        if (int const rc = work.status.load(); rc != 0)
            fail(rc == 2 ? ORT_RUNTIME_EXCEPTION : ORT_FAIL,
                "the CPU kernel failed (m4r_mixer_step_rows returned " + std::to_string(rc) + ")");
        if constexpr (!std::is_same_v<T, float>)
        {
            T* o = y.GetTensorMutableData<T>();
            for (size_t i = 0; i < yStore.size(); ++i)
                o[i] = Elem<T>::put(yStore[i]);
            float* co = work.convOut;
            for (int64_t i = 0; i < batch * di * kw; ++i)
                co[i] = roundT<T>(co[i]);
        }
        gStepCalls.fetch_add(1, std::memory_order_relaxed);
    }
};

template <typename T>
struct StepOp : Ort::CustomOpBase<StepOp<T>, StepKernel<T>, /*WithStatus=*/true>
{
    OrtStatusPtr CreateKernelV2(OrtApi const&, OrtKernelInfo const* info, void** kernel) const
    {
        return guarded([&] {
            Ort::ConstKernelInfo kinfo(info);
            auto k = std::make_unique<StepKernel<T>>();
            bool allConstant = kinfo.GetInputCount() == kInputs;
            std::vector<Ort::ConstValue> values;
            for (size_t i = kFirstWeight; allConstant && i < kInputs; ++i)
            {
                int isConstant = 0;
                Ort::ConstValue v = kinfo.GetTensorConstantInput(i, &isConstant);
                allConstant = isConstant != 0;
                values.push_back(v);
            }
            if (allConstant)
                k->constant = Packed::make<T>([&](size_t i) { return values[i - kFirstWeight]; });
            *kernel = k.release();
        });
    }
    char const* GetName() const { return "MambaMixerStep"; }
    size_t GetInputTypeCount() const { return kInputs; }
    ONNXTensorElementDataType GetInputType(size_t i) const
    {
        switch (i)
        {
        case 1: // conv_state, ssm_state: fp32 states in every precision
        case 2:
        case 8: // dt_bias, A, D: fp32 whatever T
        case 9:
        case 10: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
        default: return Elem<T>::kType;
        }
    }
    size_t GetOutputTypeCount() const { return 3; }
    ONNXTensorElementDataType GetOutputType(size_t i) const
    {
        return i == 0 ? Elem<T>::kType : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
};

StepOp<float> gStepF32;
StepOp<Ort::Float16_t> gStepF16;
} // namespace

namespace m4r
{
OrtCustomOp* mixerStepOpF32()
{
    return &gStepF32;
}
OrtCustomOp* mixerStepOpF16()
{
    return &gStepF16;
}
int64_t mixerStepComputeCalls()
{
    return gStepCalls.load(std::memory_order_relaxed);
}
} // namespace m4r

// Number of MambaMixerStep node executions served by this library in this process (proves the kernel ran).
extern "C" __attribute__((visibility("default"))) int64_t m4r_ort_ops_mixer_step_calls(void)
{
    return m4r::mixerStepComputeCalls();
}
