// ONNX Runtime custom-op library (libm4r_ort_ops.so): registers m4r::SelectiveScan (opset version 1) for the
// CPU execution provider, so that ONNX Runtime runs the native CPU scan instead of inlining the node's ONNX
// function body. The exported model does not change: without the library ORT runs the function body.
//
// Only glue lives here (attribute/shape checks, splitting the work over ONNX Runtime's intra-op thread pool);
// the scan itself is the optimised CPU kernel behind the C ABI of selectiveScanCpuFast.h, called
// single-threaded on each work item so that the session's intra_op_num_threads decides the parallelism. Built against the headers of ONNX Runtime API N (ORT_API_VERSION) without linking
// libonnxruntime: the API table comes from the loading process (ORT_API_MANUAL_INIT), which must therefore be
// onnxruntime >= 1.N; RegisterCustomOps checks that and fails with a status naming both versions.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include "ortCustomOp.h"
#include "ortMixerOp.h"
#include "ortScoreTopKOp.h"
#include "ortMixerStepOp.h"
#include "selectiveScanCpuFast.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace
{
std::atomic<int64_t> gComputeCalls{0};

constexpr size_t kInputCount = 9;
char const* const kInputNames[kInputCount] = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias", "lengths"};

// A status error raised inside the glue and turned into an OrtStatus at the API boundary.
struct OpError
{
    OrtErrorCode code;
    std::string message;
};

[[noreturn]] void fail(OrtErrorCode code, std::string message)
{
    throw OpError{code, "m4r::SelectiveScan: " + std::move(message)};
}

std::string shapeString(std::vector<int64_t> const& shape)
{
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i)
    {
        s += (i ? ", " : "") + std::to_string(shape[i]);
    }
    return s + ")";
}

OrtStatus* toStatus(OrtErrorCode code, std::string const& message)
{
    return Ort::GetApi().CreateStatus(code, message.c_str());
}

// Runs fn, converting every exception into a status (nothing may unwind into ONNX Runtime).
template <typename Fn>
OrtStatus* guarded(Fn&& fn)
{
    try
    {
        fn();
        return nullptr;
    }
    catch (OpError const& e)
    {
        return toStatus(e.code, e.message);
    }
    catch (Ort::Exception const& e)
    {
        return toStatus(e.GetOrtErrorCode(), std::string("m4r::SelectiveScan: ") + e.what());
    }
    catch (std::exception const& e)
    {
        return toStatus(ORT_FAIL, std::string("m4r::SelectiveScan: ") + e.what());
    }
}

struct Attributes
{
    bool deltaSoftplus = true;
    bool lastOnly = false;
};

// Reads and validates the node attributes. Unknown values fail the session creation with a clear status.
Attributes readAttributes(OrtKernelInfo const* info)
{
    Ort::ConstKernelInfo kinfo(info);
    std::string const node = kinfo.GetNodeName();
    OrtApi const& api = Ort::GetApi();
    Attributes attrs;

    int64_t softplus = 1;
    if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, "delta_softplus", &softplus))
    {
        api.ReleaseStatus(st); // absent: the contract's default (1)
        softplus = 1;
    }
    if (softplus != 0 && softplus != 1)
    {
        fail(ORT_INVALID_ARGUMENT,
            "node '" + node + "': attribute delta_softplus=" + std::to_string(softplus)
                + " is not supported (0 or 1); re-export the model with m4r export");
    }
    attrs.deltaSoftplus = softplus == 1;

    auto stringAttr = [&](char const* name, std::string const& fallback) {
        size_t size = 0;
        if (OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, nullptr, &size))
        {
            api.ReleaseStatus(st);
            return fallback;
        }
        std::string value(size, '\0');
        Ort::ThrowOnError(api.KernelInfoGetAttribute_string(info, name, value.data(), &size));
        value.resize(size > 0 ? size - 1 : 0); // size counts the terminating NUL
        return value;
    };
    std::string const mode = stringAttr("mode", "all");
    if (mode != "all" && mode != "last")
    {
        fail(ORT_INVALID_ARGUMENT,
            "node '" + node + "': attribute mode=\"" + mode
                + "\" is not supported (\"all\" or \"last\"); re-export the model with m4r export");
    }
    attrs.lastOnly = mode == "last";
    std::string const version = stringAttr("plugin_version", "1");
    if (version != "1")
    {
        fail(ORT_INVALID_ARGUMENT,
            "node '" + node + "': plugin_version=\"" + version
                + "\" is not supported by this library (version 1); use a matching libm4r_ort_ops.so");
    }
    return attrs;
}

template <typename T>
struct Io;

template <>
struct Io<float>
{
    static constexpr ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    static constexpr int32_t kDtype = M4R_SCAN_F32;
};

template <>
struct Io<Ort::Float16_t>
{
    static constexpr ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    static constexpr int32_t kDtype = M4R_SCAN_F16;
};

// One kernel call: rows [b, b + 1) x channels [c0, c0 + channels) of the problem, as a batch-1 problem of
// `channels` channels (every tensor of that slice is contiguous in the op's layouts).
struct WorkSplit
{
    char const* u;
    char const* delta;
    float const* A;
    char const* B;
    char const* C;
    float const* D;
    char const* z;
    float const* bias;
    int32_t const* lengths;
    char* y;
    int64_t dim, seqlen, dstate, chunk, chunksPerRow;
    size_t elem;
    int32_t softplus, lastOnly, dtype;
    std::atomic<int> status{M4R_SCAN_OK};

    void run(size_t item)
    {
        int64_t const b = static_cast<int64_t>(item) / chunksPerRow;
        int64_t const c0 = (static_cast<int64_t>(item) % chunksPerRow) * chunk;
        int64_t const channels = std::min(chunk, dim - c0);
        size_t const row = static_cast<size_t>((b * dim + c0) * seqlen) * elem; // u, delta, z, y (all)
        size_t const bc = static_cast<size_t>(b * dstate * seqlen) * elem;      // B, C
        size_t const yOff = lastOnly ? static_cast<size_t>(b * dim + c0) * elem : row;
        int const rc = m4r_scan_native_forward(u + row, delta + row, A + c0 * dstate, B + bc, C + bc,
            D != nullptr ? D + c0 : nullptr, z != nullptr ? z + row : nullptr, bias != nullptr ? bias + c0 : nullptr,
            lengths != nullptr ? lengths + b : nullptr, 1, static_cast<int32_t>(channels),
            static_cast<int32_t>(seqlen), static_cast<int32_t>(dstate), softplus, lastOnly, dtype, y + yOff,
            /*numThreads=*/1);
        if (rc != M4R_SCAN_OK)
        {
            status.store(rc, std::memory_order_relaxed);
        }
    }

    static void entry(void* self, size_t item)
    {
        static_cast<WorkSplit*>(self)->run(item);
    }
};

template <typename T>
struct ScanKernel
{
    Attributes attrs;

    OrtStatusPtr ComputeV2(OrtKernelContext* context)
    {
        return guarded([&] { compute(context); });
    }

    void compute(OrtKernelContext* context)
    {
        Ort::KernelContext ctx(context);
        if (ctx.GetInputCount() < 5)
        {
            fail(ORT_INVALID_ARGUMENT, "needs at least the inputs u, delta, A, B, C");
        }
        auto input = [&](size_t i) -> Ort::ConstValue {
            return i < ctx.GetInputCount() ? ctx.GetInput(i) : Ort::ConstValue{nullptr};
        };
        auto shapeOf = [&](size_t i) { return input(i).GetTensorTypeAndShapeInfo().GetShape(); };
        auto expect = [&](size_t i, std::vector<int64_t> const& want) {
            auto const got = shapeOf(i);
            if (got != want)
            {
                fail(ORT_INVALID_ARGUMENT,
                    std::string("input ") + kInputNames[i] + " has shape " + shapeString(got) + ", expected "
                        + shapeString(want));
            }
        };

        auto const uShape = shapeOf(0);
        auto const aShape = shapeOf(2);
        if (uShape.size() != 3 || aShape.size() != 2)
        {
            fail(ORT_INVALID_ARGUMENT,
                "u must be (batch, dim, seqlen) and A (dim, dstate), got " + shapeString(uShape) + " and "
                    + shapeString(aShape));
        }
        int64_t const batch = uShape[0], dim = uShape[1], seqlen = uShape[2], dstate = aShape[1];
        expect(1, uShape);
        expect(2, {dim, dstate});
        expect(3, {batch, dstate, seqlen});
        expect(4, {batch, dstate, seqlen});
        bool const hasD = input(5) != nullptr, hasZ = input(6) != nullptr, hasBias = input(7) != nullptr;
        bool const hasLengths = input(8) != nullptr;
        if (hasD)
            expect(5, {dim});
        if (hasZ)
            expect(6, uShape);
        if (hasBias)
            expect(7, {dim});
        if (hasLengths)
            expect(8, {batch});
        if (batch > INT32_MAX || dim > INT32_MAX || seqlen > INT32_MAX || dstate > INT32_MAX)
        {
            fail(ORT_INVALID_ARGUMENT, "u " + shapeString(uShape) + ": dimensions above 2^31 - 1 are not supported");
        }

        std::vector<int64_t> const yShape
            = attrs.lastOnly ? std::vector<int64_t>{batch, dim} : std::vector<int64_t>{batch, dim, seqlen};
        Ort::UnownedValue yValue = ctx.GetOutput(0, yShape);
        if (batch == 0 || dim == 0 || seqlen == 0)
        {
            // Seq 0 in mode "last": the empty history's state is zero and there is no position to read out, so y
            // is zeros (the README's defined behaviour, as in the function body, PyTorch and the TensorRT plugin).
            // Every other empty case has an empty y.
            if (attrs.lastOnly && batch > 0 && dim > 0)
            {
                std::fill_n(static_cast<char*>(yValue.GetTensorMutableRawData()),
                    static_cast<size_t>(batch * dim) * sizeof(T), char{0});
            }
            return;
        }
        if (dstate == 0)
        {
            fail(ORT_INVALID_ARGUMENT, "A has shape " + shapeString(aShape) + ": dstate must be at least 1");
        }

        auto bytes = [&](size_t i) { return static_cast<char const*>(input(i).GetTensorRawData()); };
        WorkSplit work;
        work.u = bytes(0);
        work.delta = bytes(1);
        work.A = input(2).template GetTensorData<float>();
        work.B = bytes(3);
        work.C = bytes(4);
        work.D = hasD ? input(5).template GetTensorData<float>() : nullptr;
        work.z = hasZ ? bytes(6) : nullptr;
        work.bias = hasBias ? input(7).template GetTensorData<float>() : nullptr;
        work.lengths = hasLengths ? input(8).template GetTensorData<int32_t>() : nullptr;
        work.y = static_cast<char*>(yValue.GetTensorMutableRawData());
        work.dim = dim;
        work.seqlen = seqlen;
        work.dstate = dstate;
        work.elem = sizeof(T);
        work.softplus = attrs.deltaSoftplus ? 1 : 0;
        work.lastOnly = attrs.lastOnly ? 1 : 0;
        work.dtype = Io<T>::kDtype;
        // Work items: whole rows when the batch alone gives enough of them, else rows split into channel
        // blocks (multiples of 8, the kernel's vector width) so that a single request uses the pool too.
        constexpr int64_t kMinItems = 16;
        int64_t chunk = dim;
        if (batch < kMinItems)
        {
            int64_t const perRow = (kMinItems + batch - 1) / batch;
            chunk = std::max<int64_t>(8, ((dim + perRow - 1) / perRow + 7) / 8 * 8);
        }
        work.chunk = std::min(chunk, dim);
        work.chunksPerRow = (dim + work.chunk - 1) / work.chunk;
        size_t const items = static_cast<size_t>(batch * work.chunksPerRow);
        if (items == 1)
        {
            work.run(0);
        }
        else
        {
            Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(context, &WorkSplit::entry, items, 0, &work));
        }
        if (int const rc = work.status.load(); rc != M4R_SCAN_OK)
        {
            fail(rc == M4R_SCAN_NO_MEMORY ? ORT_RUNTIME_EXCEPTION : ORT_FAIL,
                "the CPU kernel failed (m4r_scan_native_forward returned " + std::to_string(rc) + ")");
        }
        gComputeCalls.fetch_add(1, std::memory_order_relaxed);
    }
};

template <typename T>
struct ScanOp : Ort::CustomOpBase<ScanOp<T>, ScanKernel<T>, /*WithStatus=*/true>
{
    OrtStatusPtr CreateKernelV2(OrtApi const&, OrtKernelInfo const* info, void** kernel) const
    {
        return guarded([&] { *kernel = new ScanKernel<T>{readAttributes(info)}; });
    }

    char const* GetName() const
    {
        return "SelectiveScan";
    }

    size_t GetInputTypeCount() const
    {
        return kInputCount;
    }

    ONNXTensorElementDataType GetInputType(size_t i) const
    {
        switch (i)
        {
        case 2:
        case 5:
        case 7: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; // A, D, delta_bias: fp32 whatever T
        case 8: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32; // lengths
        default: return Io<T>::kType;                       // u, delta, B, C, z
        }
    }

    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const
    {
        // D, z, delta_bias and lengths may be omitted (empty input names), as in the C ABI.
        return i >= 5 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    }

    size_t GetOutputTypeCount() const
    {
        return 1;
    }

    ONNXTensorElementDataType GetOutputType(size_t) const
    {
        return Io<T>::kType;
    }
};

ScanOp<float> gScanF32;
ScanOp<Ort::Float16_t> gScanF16;
} // namespace

extern "C" M4R_ORT_OPS_API OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, OrtApiBase const* base)
{
    OrtApi const* api = base->GetApi(ORT_API_VERSION);
    if (api == nullptr)
    {
        // Older runtime: it cannot hand out the API table these headers describe. API 1 always exists and
        // suffices to create the error status.
        std::string const msg = std::string("libm4r_ort_ops.so was built against ONNX Runtime API ")
            + std::to_string(ORT_API_VERSION) + " headers and needs onnxruntime >= 1." + std::to_string(ORT_API_VERSION)
            + ", but this process runs onnxruntime " + base->GetVersionString()
            + "; upgrade onnxruntime or rebuild the library against that version's headers (ONNXRUNTIME_ROOT)";
        OrtApi const* v1 = base->GetApi(1);
        if (v1 == nullptr)
        {
            std::fprintf(stderr, "%s\n", msg.c_str());
            return nullptr; // cannot even report it; the model then falls back to the function body
        }
        return v1->CreateStatus(ORT_FAIL, msg.c_str());
    }
    Ort::InitApi(api);
    return guarded([&] {
        // Intentionally leaked: the domain must outlive every session that uses it (ORT's documented pattern).
        static Ort::CustomOpDomain* domain = [] {
            auto* d = new Ort::CustomOpDomain(M4R_ORT_OPS_DOMAIN);
            d->Add(&gScanF32);
            d->Add(&gScanF16);
            d->Add(m4r::mixerOpF32()); // fused Mamba block (ortMixerOp.cpp)
            d->Add(m4r::mixerOpF16());
            d->Add(m4r::scoreTopKOpF32()); // exact top-K scoring (ortScoreTopKOp.cpp)
            d->Add(m4r::scoreTopKOpF16());
            d->Add(m4r::mixerStepOpF32()); // fused streaming step (ortMixerStepOp.cpp)
            d->Add(m4r::mixerStepOpF16());
            return d;
        }();
        Ort::UnownedSessionOptions(options).Add(*domain);
    });
}

extern "C" M4R_ORT_OPS_API int64_t m4r_ort_ops_compute_calls(void)
{
    return gComputeCalls.load(std::memory_order_relaxed);
}

extern "C" M4R_ORT_OPS_API int32_t m4r_ort_ops_api_version(void)
{
    return ORT_API_VERSION;
}
