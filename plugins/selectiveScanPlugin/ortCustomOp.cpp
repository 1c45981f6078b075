// ONNX Runtime custom-op library (libm4r_ort_ops.so): registers m4r::SelectiveScan (opset version 1) for the
// CPU execution provider, so that ONNX Runtime runs the native CPU scan instead of inlining the node's ONNX
// function body. The exported model does not change: without the library ORT runs the function body.
//
// Only glue lives here (attribute/shape checks, fp16 <-> fp32, the kernel call); the scan itself is the C ABI
// of selectiveScanCpu.h. Built against the headers of ONNX Runtime API N (ORT_API_VERSION) without linking
// libonnxruntime: the API table comes from the loading process (ORT_API_MANUAL_INIT), which must therefore be
// onnxruntime >= 1.N; RegisterCustomOps checks that and fails with a status naming both versions.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include "ortCustomOp.h"
#include "selectiveScanCpu.h"

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
    static float const* toFloat(float const* p, size_t, std::vector<float>&)
    {
        return p;
    }
};

template <>
struct Io<Ort::Float16_t>
{
    static constexpr ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    static float const* toFloat(Ort::Float16_t const* p, size_t n, std::vector<float>& buf)
    {
        buf.resize(n);
        for (size_t i = 0; i < n; ++i)
        {
            buf[i] = p[i].ToFloat();
        }
        return buf.data();
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
        size_t const yCount = static_cast<size_t>(batch * dim * (attrs.lastOnly ? 1 : seqlen));
        if (batch == 0 || dim == 0 || seqlen == 0)
        {
            return; // empty output: nothing to compute
        }
        if (dstate == 0)
        {
            fail(ORT_INVALID_ARGUMENT, "A has shape " + shapeString(aShape) + ": dstate must be at least 1");
        }

        size_t const bdl = static_cast<size_t>(batch * dim * seqlen);
        size_t const bnl = static_cast<size_t>(batch * dstate * seqlen);
        std::vector<float> uBuf, deltaBuf, bBuf, cBuf, zBuf;
        float const* u = Io<T>::toFloat(input(0).template GetTensorData<T>(), bdl, uBuf);
        float const* delta = Io<T>::toFloat(input(1).template GetTensorData<T>(), bdl, deltaBuf);
        float const* B = Io<T>::toFloat(input(3).template GetTensorData<T>(), bnl, bBuf);
        float const* C = Io<T>::toFloat(input(4).template GetTensorData<T>(), bnl, cBuf);
        float const* z = hasZ ? Io<T>::toFloat(input(6).template GetTensorData<T>(), bdl, zBuf) : nullptr;

        std::vector<float> yBuf;
        float* y = nullptr;
        if constexpr (std::is_same_v<T, float>)
        {
            y = yValue.template GetTensorMutableData<float>();
        }
        else
        {
            yBuf.resize(yCount);
            y = yBuf.data();
        }
        int const rc = m4r_scan_cpu_f32(u, delta, input(2).template GetTensorData<float>(), B, C,
            hasD ? input(5).template GetTensorData<float>() : nullptr, z, hasBias ? input(7).template GetTensorData<float>() : nullptr,
            hasLengths ? input(8).template GetTensorData<int32_t>() : nullptr, static_cast<int32_t>(batch),
            static_cast<int32_t>(dim), static_cast<int32_t>(seqlen), static_cast<int32_t>(dstate),
            attrs.deltaSoftplus ? 1 : 0, attrs.lastOnly ? 1 : 0, y);
        if (rc != M4R_SCAN_OK)
        {
            fail(ORT_FAIL, "the CPU kernel rejected the arguments (code " + std::to_string(rc) + ")");
        }
        if constexpr (!std::is_same_v<T, float>)
        {
            T* out = yValue.template GetTensorMutableData<T>();
            for (size_t i = 0; i < yCount; ++i)
            {
                out[i] = T(yBuf[i]);
            }
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
