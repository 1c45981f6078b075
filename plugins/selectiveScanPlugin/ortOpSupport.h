// Glue shared by the m4r ONNX Runtime kernels (ortMixerOp.cpp, ortMixerStepOp.cpp, ortScoreTopKOp.cpp): an error
// that becomes an OrtStatus naming the op, shape formatting for messages, and the fp32/fp16 element adaptor.
// Include after <onnxruntime_cxx_api.h> (the kernels compile it with ORT_API_MANUAL_INIT).
#pragma once

#include <cstdint>
#include <exception>
#include <string>
#include <utility>
#include <vector>

namespace m4r
{
namespace ort_op
{

//! A kernel's reportable failure; guarded() returns it to ONNX Runtime as an OrtStatus with this code.
struct Error
{
    OrtErrorCode code;
    std::string message;
};

[[noreturn]] inline void fail(char const* op, OrtErrorCode code, std::string message)
{
    throw Error{code, std::string(op) + ": " + std::move(message)};
}

inline std::string shapeStr(std::vector<int64_t> const& s)
{
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i)
        out += (i ? ", " : "") + std::to_string(s[i]);
    return out + ")";
}

//! Runs fn: nullptr on success, else an OrtStatus whose message starts with the op's name (no exception
//! crosses the C API boundary).
template <typename Fn>
OrtStatus* guarded(char const* op, Fn&& fn)
{
    try
    {
        fn();
        return nullptr;
    }
    catch (Error const& e)
    {
        return Ort::GetApi().CreateStatus(e.code, e.message.c_str());
    }
    catch (std::exception const& e)
    {
        return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string(op) + ": " + e.what()).c_str());
    }
}

//! fp32 / fp16 tensor elements: the ONNX type, and conversion to and from the fp32 the kernels compute in.
template <typename T>
struct Elem;
template <>
struct Elem<float>
{
    static constexpr ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    static float get(float v) { return v; }
    static float put(float v) { return v; }
};
template <>
struct Elem<Ort::Float16_t>
{
    static constexpr ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    static float get(Ort::Float16_t v) { return v.ToFloat(); }
    static Ort::Float16_t put(float v) { return Ort::Float16_t(v); }
};

} // namespace ort_op
} // namespace m4r
