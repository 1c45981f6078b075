// SelectiveScan TensorRT plugin: shape/type inference, format negotiation, serialization, enqueue.
#include "selectiveScanPlugin.h"

#include "selectiveScanKernel.h"
#include "selectiveScanMath.h"

#include <atomic>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>

namespace m4r
{
namespace plugin
{

using nvinfer1::DataType;
using nvinfer1::TensorFormat;

namespace
{

// Input positions of the op contract; the output follows the inputs in supportsFormatCombination.
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

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

bool isIoType(DataType t) noexcept
{
    return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

bool validCounts(int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs < kMinInputs || nbInputs > kMaxInputs || nbOutputs != 1)
    {
        logError("SelectiveScan: expected 8 or 9 inputs (u, delta, A, B, C, D, z, delta_bias[, lengths]) and 1 output");
        return false;
    }
    return true;
}

// Rank and state-size checks shared by configurePlugin (dims may be -1 there) and onShapeChange.
bool validDims(nvinfer1::Dims const* const* dims, int32_t nbInputs) noexcept
{
    static constexpr int32_t kRanks[kMaxInputs] = {3, 3, 2, 3, 3, 1, 3, 1, 1};
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (dims[i]->nbDims != kRanks[i])
        {
            logError("SelectiveScan: input rank does not match the op contract (u, delta, z: 3; A: 2; B, C: 3; "
                     "D, delta_bias, lengths: 1)");
            return false;
        }
    }
    int64_t const dstate = dims[kA]->d[1];
    if (dstate > scan::kMaxDState)
    {
        logError("SelectiveScan: state size N (A.shape[1]) above 64 is not supported by the CUDA kernels");
        return false;
    }
    return true;
}

bool toIoType(DataType t, scan::IoType& out) noexcept
{
    switch (t)
    {
    case DataType::kFLOAT: out = scan::IoType::kFLOAT32; return true;
    case DataType::kHALF: out = scan::IoType::kFLOAT16; return true;
    case DataType::kBF16: out = scan::IoType::kBFLOAT16; return true;
    // TensorRT adds data types between releases (11.1: kE8M0): anything else is unsupported.
    default: return false;
    }
}

// Attribute strings from the ONNX parser may or may not count a trailing NUL in `length`.
std::string fieldString(nvinfer1::PluginField const& f)
{
    std::string s(static_cast<char const*>(f.data), static_cast<size_t>(f.length > 0 ? f.length : 0));
    size_t const nul = s.find('\0');
    return nul == std::string::npos ? s : s.substr(0, nul);
}

} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept
{
    gLoggerFinder.store(finder);
}

void logError(char const* message) noexcept
{
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(nvinfer1::ILogger::Severity::kERROR, message);
    }
    else
    {
        std::fprintf(stderr, "[m4r plugin] ERROR: %s\n", message);
    }
}

// ---------------------------------------------------------------------------------------------------------
// SelectiveScanPlugin

SelectiveScanPlugin::SelectiveScanPlugin(SelectiveScanAttrs const& attrs)
    : mAttrs(attrs)
{
}

nvinfer1::IPluginCapability* SelectiveScanPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    default: return nullptr;
    }
}

nvinfer1::IPluginV3* SelectiveScanPlugin::clone() noexcept
{
    // Attributes plus the configured input count; the serialization buffers are rebuilt on demand.
    auto* copy = new (std::nothrow) SelectiveScanPlugin(mAttrs);
    if (copy != nullptr)
    {
        copy->mNbInputs = mNbInputs;
    }
    return copy;
}

char const* SelectiveScanPlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* SelectiveScanPlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* SelectiveScanPlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t SelectiveScanPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::DynamicPluginTensorDesc const* /* out */, int32_t nbOutputs) noexcept
{
    if (!validCounts(nbInputs, nbOutputs))
    {
        return -1;
    }
    nvinfer1::Dims const* dims[kMaxInputs]{};
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims[i] = &in[i].desc.dims;
    }
    mNbInputs = nbInputs;
    return validDims(dims, nbInputs) ? 0 : -1;
}

int32_t SelectiveScanPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (!validCounts(nbInputs, nbOutputs))
    {
        return -1;
    }
    outputTypes[0] = inputTypes[kU]; // y has the I/O dtype of u
    return 0;
}

int32_t SelectiveScanPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /* shapeInputs */, int32_t /* nbShapeInputs */, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& /* exprBuilder */) noexcept
{
    if (!validCounts(nbInputs, nbOutputs) || inputs[kU].nbDims != 3)
    {
        return -1;
    }
    // mode "all": (B, D, L) like u; mode "last": (B, D).
    outputs[0].nbDims = mAttrs.lastOnly ? 2 : 3;
    for (int32_t i = 0; i < outputs[0].nbDims; ++i)
    {
        outputs[0].d[i] = inputs[kU].d[i];
    }
    return 0;
}

bool SelectiveScanPlugin::supportsFormatCombination(
    int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs < kMinInputs || nbInputs > kMaxInputs || nbOutputs != 1 || pos < 0 || pos > nbInputs)
    {
        return false;
    }
    nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    if (pos == nbInputs) // the output y
    {
        return desc.type == inOut[kU].desc.type;
    }
    switch (pos)
    {
    case kU: return isIoType(desc.type);
    case kDELTA:
    case kB:
    case kC:
    case kZ: return desc.type == inOut[kU].desc.type;
    case kA:
    case kD:
    case kDELTA_BIAS: return desc.type == DataType::kFLOAT; // parameters stay fp32 in every variant
    case kLENGTHS: return desc.type == DataType::kINT32;
    default: return false;
    }
}

int32_t SelectiveScanPlugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t SelectiveScanPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* /* out */, int32_t nbOutputs) noexcept
{
    if (!validCounts(nbInputs, nbOutputs))
    {
        return -1;
    }
    nvinfer1::Dims const* dims[kMaxInputs]{};
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims[i] = &in[i].dims;
    }
    mNbInputs = nbInputs;
    return validDims(dims, nbInputs) ? 0 : -1;
}

int32_t SelectiveScanPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /* outputDesc */, void const* const* inputs, void* const* outputs,
    void* /* workspace */, cudaStream_t stream) noexcept
{
    scan::ScanParams p;
    if (!toIoType(inputDesc[kU].type, p.ioType))
    {
        logError("SelectiveScan: unsupported I/O data type (expected fp32, fp16 or bf16)");
        return -1;
    }
    nvinfer1::Dims const& uDims = inputDesc[kU].dims;
    p.batch = static_cast<int32_t>(uDims.d[0]);
    p.dim = static_cast<int32_t>(uDims.d[1]);
    p.seqlen = static_cast<int32_t>(uDims.d[2]);
    p.dstate = static_cast<int32_t>(inputDesc[kA].dims.d[1]);
    p.deltaSoftplus = mAttrs.deltaSoftplus;
    p.lastOnly = mAttrs.lastOnly;
    p.u = inputs[kU];
    p.delta = inputs[kDELTA];
    p.A = static_cast<float const*>(inputs[kA]);
    p.B = inputs[kB];
    p.C = inputs[kC];
    p.D = static_cast<float const*>(inputs[kD]);
    p.z = inputs[kZ];
    p.deltaBias = static_cast<float const*>(inputs[kDELTA_BIAS]);
    // The 9th input (lengths) is optional; onShapeChange recorded how many inputs the node has.
    p.lengths = mNbInputs > kLENGTHS ? static_cast<int32_t const*>(inputs[kLENGTHS]) : nullptr;
    p.y = outputs[0];
    char const* why = scan::unsupportedReason(p);
    if (why != nullptr)
    {
        logError(why);
        return -1;
    }
    cudaError_t const status = scan::launchSelectiveScan(p, stream);
    if (status != cudaSuccess)
    {
        logError(cudaGetErrorString(status));
        return -1;
    }
    return 0;
}

nvinfer1::IPluginV3* SelectiveScanPlugin::attachToContext(nvinfer1::IPluginResourceContext* /* context */) noexcept
{
    // The plugin holds no per-context resources (no workspace, no handles): a plain clone suffices.
    return clone();
}

nvinfer1::PluginFieldCollection const* SelectiveScanPlugin::getFieldsToSerialize() noexcept
{
    try
    {
        mSerialSoftplus = mAttrs.deltaSoftplus ? 1 : 0;
        mSerialMode = mAttrs.lastOnly ? "last" : "all";
        mSerialFields.clear();
        mSerialFields.emplace_back("delta_softplus", &mSerialSoftplus, nvinfer1::PluginFieldType::kINT32, 1);
        mSerialFields.emplace_back("mode", mSerialMode.c_str(), nvinfer1::PluginFieldType::kCHAR,
            static_cast<int32_t>(mSerialMode.size() + 1));
        mSerialFc.nbFields = static_cast<int32_t>(mSerialFields.size());
        mSerialFc.fields = mSerialFields.data();
        return &mSerialFc;
    }
    catch (std::exception const& e)
    {
        logError(e.what());
        return nullptr;
    }
}

// ---------------------------------------------------------------------------------------------------------
// SelectiveScanPluginCreator

SelectiveScanPluginCreator::SelectiveScanPluginCreator()
{
    mFields.emplace_back("delta_softplus", nullptr, nvinfer1::PluginFieldType::kINT32, 1);
    mFields.emplace_back("mode", nullptr, nvinfer1::PluginFieldType::kCHAR, 0);
    mFc.nbFields = static_cast<int32_t>(mFields.size());
    mFc.fields = mFields.data();
}

nvinfer1::IPluginV3* SelectiveScanPluginCreator::createPlugin(
    char const* /* name */, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /* phase */) noexcept
{
    try
    {
        SelectiveScanAttrs attrs; // defaults: delta_softplus=1, mode="all"
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            nvinfer1::PluginField const& f = fc->fields[i];
            if (f.name == nullptr || f.data == nullptr)
            {
                continue;
            }
            if (std::strcmp(f.name, "delta_softplus") == 0)
            {
                if (f.type == nvinfer1::PluginFieldType::kINT32)
                {
                    attrs.deltaSoftplus = *static_cast<int32_t const*>(f.data) != 0;
                }
                else if (f.type == nvinfer1::PluginFieldType::kINT64)
                {
                    attrs.deltaSoftplus = *static_cast<int64_t const*>(f.data) != 0;
                }
                else
                {
                    logError("SelectiveScan: attribute delta_softplus must be an integer");
                    return nullptr;
                }
            }
            else if (std::strcmp(f.name, "mode") == 0)
            {
                std::string const mode = fieldString(f);
                if (mode != "all" && mode != "last")
                {
                    logError("SelectiveScan: attribute mode must be \"all\" or \"last\"");
                    return nullptr;
                }
                attrs.lastOnly = mode == "last";
            }
            // Other fields (e.g. plugin_namespace/plugin_version forwarded by a parser) carry no semantics.
        }
        return new SelectiveScanPlugin(attrs);
    }
    catch (std::exception const& e)
    {
        logError(e.what());
        return nullptr;
    }
}

nvinfer1::PluginFieldCollection const* SelectiveScanPluginCreator::getFieldNames() noexcept
{
    return &mFc;
}

char const* SelectiveScanPluginCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* SelectiveScanPluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* SelectiveScanPluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

} // namespace plugin
} // namespace m4r
