/*
 * The SelectiveScan plugin's rules and enqueue path, free of TensorRT types.
 *
 * selectiveScanPlugin.cpp translates TensorRT's descriptors into these structs and calls these functions;
 * tests/pluginCoreTest.cpp calls the same functions without TensorRT (CI has no TensorRT headers) and runs
 * enqueue on the CPU through the kernel emulation. What stays in the plugin .cpp is glue: the type
 * mapping, the PluginField conversion and the logger.
 */
#ifndef M4R_SELECTIVE_SCAN_PLUGIN_CORE_H
#define M4R_SELECTIVE_SCAN_PLUGIN_CORE_H

#include "selectiveScanDispatch.h"
#include "selectiveScanKernel.h"

#include <cstdint>
#include <cstring>
#include <string>

namespace m4r
{
namespace plugin
{

//! Input positions of the op contract; the output y follows the inputs (position nbInputs).
enum Input : int32_t
{
    kU = 0,
    kDELTA = 1,
    kA = 2,
    kB = 3,
    kC = 4,
    kD = 5,
    kZ = 6,
    kDELTA_BIAS = 7,
    kLENGTHS = 8,
};
constexpr int32_t kMinInputs = 8;
constexpr int32_t kMaxInputs = 9;
constexpr int32_t kMaxRank = 8;

//! The data types the plugin distinguishes (TensorRT's DataType maps onto these; the rest is kOTHER).
enum class DType : int32_t
{
    kFLOAT,
    kHALF,
    kBF16,
    kINT32,
    kINT64,
    kOTHER,
};

//! One tensor as the plugin sees it: type, whether the format is linear, dims (-1 = unknown at build time).
struct TensorInfo
{
    DType type{DType::kFLOAT};
    bool linear{true};
    int32_t nbDims{0};
    int64_t d[kMaxRank]{};
};

//! Attributes of one SelectiveScan node, plus how many inputs the node has.
struct SelectiveScanAttrs
{
    bool deltaSoftplus{true};
    bool lastOnly{false}; //!< mode "last" (true) or "all" (false)
    //! 8, or 9 when the node passes lengths. Serialized (field "nb_inputs") so that a deserialized plugin
    //! knows it before any shape call; nodes from the exporter always pass lengths, hence the default 9.
    int32_t nbInputs{kMaxInputs};
};

//! Field value kinds the creator accepts (TensorRT's PluginFieldType maps onto these).
enum class FieldKind : int32_t
{
    kINT32,
    kINT64,
    kCHAR,
    kOTHER,
};

//! Apply one creator field to `attrs`. Returns "" or the error. Unknown names (plugin_namespace,
//! plugin_version forwarded by a parser) are ignored. Strings may or may not count a trailing NUL.
inline std::string applyField(
    SelectiveScanAttrs& attrs, char const* name, FieldKind kind, void const* data, int32_t length)
{
    if (name == nullptr || data == nullptr)
    {
        return "";
    }
    bool const isInt = kind == FieldKind::kINT32 || kind == FieldKind::kINT64;
    int64_t const value = kind == FieldKind::kINT32 ? *static_cast<int32_t const*>(data)
        : kind == FieldKind::kINT64                 ? *static_cast<int64_t const*>(data)
                                                    : 0;
    if (std::strcmp(name, "delta_softplus") == 0)
    {
        if (!isInt)
        {
            return "SelectiveScan: attribute delta_softplus must be an integer";
        }
        attrs.deltaSoftplus = value != 0;
    }
    else if (std::strcmp(name, "mode") == 0)
    {
        std::string mode(static_cast<char const*>(data), static_cast<size_t>(length > 0 ? length : 0));
        mode = mode.substr(0, mode.find('\0'));
        if (kind != FieldKind::kCHAR || (mode != "all" && mode != "last"))
        {
            return "SelectiveScan: attribute mode must be \"all\" or \"last\"";
        }
        attrs.lastOnly = mode == "last";
    }
    else if (std::strcmp(name, "nb_inputs") == 0)
    {
        if (!isInt || value < kMinInputs || value > kMaxInputs)
        {
            return "SelectiveScan: serialized field nb_inputs must be 8 or 9";
        }
        attrs.nbInputs = static_cast<int32_t>(value);
    }
    return "";
}

//! The values getFieldsToSerialize() writes; applyField() on each restores the attributes.
struct SerialValues
{
    int32_t deltaSoftplus;
    std::string mode;
    int32_t nbInputs;
};

inline SerialValues serialValues(SelectiveScanAttrs const& attrs)
{
    return {attrs.deltaSoftplus ? 1 : 0, attrs.lastOnly ? "last" : "all", attrs.nbInputs};
}

inline std::string checkCounts(int32_t nbInputs, int32_t nbOutputs)
{
    if (nbInputs < kMinInputs || nbInputs > kMaxInputs || nbOutputs != 1)
    {
        return "SelectiveScan: expected 8 or 9 inputs (u, delta, A, B, C, D, z, delta_bias[, lengths]) and 1 "
               "output";
    }
    return "";
}

//! Ranks, state size and every cross-input shape the kernel assumes. Dims of -1 (unknown while building)
//! are not compared. Returns "" or a message naming the mismatch.
inline std::string checkDims(TensorInfo const* in, int32_t nbInputs)
{
    static char const* const kNames[kMaxInputs] = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias", "lengths"};
    static constexpr int32_t kRanks[kMaxInputs] = {3, 3, 2, 3, 3, 1, 3, 1, 1};
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (in[i].nbDims != kRanks[i])
        {
            return std::string("SelectiveScan: input ") + kNames[i] + " has rank " + std::to_string(in[i].nbDims)
                + ", the op contract says " + std::to_string(kRanks[i])
                + " (u, delta, z: 3; A: 2; B, C: 3; D, delta_bias, lengths: 1)";
        }
    }
    if (in[kA].d[1] > scan::kMaxDState)
    {
        return "SelectiveScan: state size N (A.shape[1]) above 64 is not supported by the CUDA kernels";
    }
    struct Rule
    {
        int32_t input, axis, refInput, refAxis;
        char const* what;
    };
    static constexpr Rule kRules[] = {
        {kDELTA, 0, kU, 0, "batch"}, {kDELTA, 1, kU, 1, "channels D"}, {kDELTA, 2, kU, 2, "length L"},
        {kZ, 0, kU, 0, "batch"}, {kZ, 1, kU, 1, "channels D"}, {kZ, 2, kU, 2, "length L"},
        {kA, 0, kU, 1, "channels D"}, {kB, 0, kU, 0, "batch"}, {kB, 1, kA, 1, "state size N"},
        {kB, 2, kU, 2, "length L"}, {kC, 0, kU, 0, "batch"}, {kC, 1, kA, 1, "state size N"},
        {kC, 2, kU, 2, "length L"}, {kD, 0, kU, 1, "channels D"}, {kDELTA_BIAS, 0, kU, 1, "channels D"},
        {kLENGTHS, 0, kU, 0, "batch"},
    };
    for (Rule const& r : kRules)
    {
        if (r.input >= nbInputs)
        {
            continue;
        }
        int64_t const got = in[r.input].d[r.axis], want = in[r.refInput].d[r.refAxis];
        if (got >= 0 && want >= 0 && got != want)
        {
            return std::string("SelectiveScan: ") + kNames[r.input] + ".shape[" + std::to_string(r.axis)
                + "] = " + std::to_string(got) + " does not match " + kNames[r.refInput] + ".shape["
                + std::to_string(r.refAxis) + "] = " + std::to_string(want) + " (" + r.what + ")";
        }
    }
    return "";
}

//! Format/type negotiation: all linear; u fp32/fp16/bf16 and delta, B, C, z, y of u's type; A, D,
//! delta_bias fp32; lengths int32. `inOut` holds the inputs then the output.
inline bool supportsFormat(int32_t pos, TensorInfo const* inOut, int32_t nbInputs, int32_t nbOutputs)
{
    if (!checkCounts(nbInputs, nbOutputs).empty() || pos < 0 || pos > nbInputs || !inOut[pos].linear)
    {
        return false;
    }
    DType const t = inOut[pos].type;
    if (pos == nbInputs) // the output y
    {
        return t == inOut[kU].type;
    }
    switch (pos)
    {
    case kU: return t == DType::kFLOAT || t == DType::kHALF || t == DType::kBF16;
    case kDELTA:
    case kB:
    case kC:
    case kZ: return t == inOut[kU].type;
    case kA:
    case kD:
    case kDELTA_BIAS: return t == DType::kFLOAT; // parameters stay fp32 in every variant
    case kLENGTHS: return t == DType::kINT32;
    default: return false;
    }
}

//! The ScanParams enqueue hands to the kernels, from the runtime descriptors and buffers. Returns "" or
//! why the call cannot run.
inline std::string makeScanParams(SelectiveScanAttrs const& attrs, TensorInfo const* inputDesc,
    void const* const* inputs, void* const* outputs, scan::ScanParams& p)
{
    switch (inputDesc[kU].type)
    {
    case DType::kFLOAT: p.ioType = scan::IoType::kFLOAT32; break;
    case DType::kHALF: p.ioType = scan::IoType::kFLOAT16; break;
    case DType::kBF16: p.ioType = scan::IoType::kBFLOAT16; break;
    default: return "SelectiveScan: unsupported I/O data type (expected fp32, fp16 or bf16)";
    }
    TensorInfo const& u = inputDesc[kU];
    p.batch = static_cast<int32_t>(u.d[0]);
    p.dim = static_cast<int32_t>(u.d[1]);
    p.seqlen = static_cast<int32_t>(u.d[2]);
    p.dstate = static_cast<int32_t>(inputDesc[kA].d[1]);
    p.deltaSoftplus = attrs.deltaSoftplus;
    p.lastOnly = attrs.lastOnly;
    p.u = inputs[kU];
    p.delta = inputs[kDELTA];
    p.A = static_cast<float const*>(inputs[kA]);
    p.B = inputs[kB];
    p.C = inputs[kC];
    p.D = static_cast<float const*>(inputs[kD]);
    p.z = inputs[kZ];
    p.deltaBias = static_cast<float const*>(inputs[kDELTA_BIAS]);
    // The 9th input (lengths) is optional; attrs.nbInputs is serialized and refreshed by every shape call.
    p.lengths = attrs.nbInputs > kLENGTHS ? static_cast<int32_t const*>(inputs[kLENGTHS]) : nullptr;
    p.y = outputs[0];
    char const* why = scan::checkScanParams(p);
    return why == nullptr ? "" : why;
}

//! The plugin's enqueue: descriptors -> ScanParams -> `launch(params)` (the CUDA launcher in the plugin,
//! the host emulation in tests). Returns "" or the error to log.
template <typename Launch>
std::string enqueueScan(SelectiveScanAttrs const& attrs, TensorInfo const* inputDesc, void const* const* inputs,
    void* const* outputs, Launch&& launch)
{
    scan::ScanParams p;
    std::string why = makeScanParams(attrs, inputDesc, inputs, outputs, p);
    if (!why.empty())
    {
        return why;
    }
    cudaError_t const status = launch(p);
    return status == cudaSuccess ? "" : std::string("SelectiveScan: kernel launch failed: ") + cudaGetErrorString(status);
}

//! Load-time check of the CUDA runtime linked into the plugin against the installed driver.
//! driverVersion: cudaDriverGetVersion (0 = no driver); runtimeVersion: CUDART_VERSION the plugin was
//! built with. Returns "" or the error naming both versions and the fix.
inline std::string checkCudaVersions(int driverVersion, int runtimeVersion)
{
    auto text = [](int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); };
    if (driverVersion == 0)
    {
        return ""; // no driver: TensorRT itself reports that before the plugin is used
    }
    if (driverVersion < runtimeVersion)
    {
        return "m4r SelectiveScan plugin: built with CUDA " + text(runtimeVersion)
            + ", but the NVIDIA driver supports CUDA up to " + text(driverVersion)
            + "; update the driver or rebuild the plugin (`m4r build-plugin`) with a CUDA toolkit <= "
            + text(driverVersion);
    }
    return "";
}

} // namespace plugin
} // namespace m4r

#endif // M4R_SELECTIVE_SCAN_PLUGIN_CORE_H
