// SelectiveScan TensorRT plugin: shape/type inference, format negotiation, serialization, enqueue.
#include "selectiveScanPlugin.h"

#include "selectiveScanKernel.h"

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

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

DType toDType(DataType t) noexcept
{
    switch (t)
    {
    case DataType::kFLOAT: return DType::kFLOAT;
    case DataType::kHALF: return DType::kHALF;
    case DataType::kBF16: return DType::kBF16;
    case DataType::kINT32: return DType::kINT32;
    case DataType::kINT64: return DType::kINT64;
    // TensorRT adds data types between releases (11.1: kE8M0): anything else is unsupported.
    default: return DType::kOTHER;
    }
}

TensorInfo toInfo(nvinfer1::PluginTensorDesc const& desc) noexcept
{
    TensorInfo info;
    info.type = toDType(desc.type);
    info.linear = desc.format == TensorFormat::kLINEAR;
    info.nbDims = desc.dims.nbDims < 0 ? 0 : (desc.dims.nbDims > kMaxRank ? kMaxRank : desc.dims.nbDims);
    for (int32_t i = 0; i < info.nbDims; ++i)
    {
        info.d[i] = desc.dims.d[i];
    }
    return info;
}

FieldKind toFieldKind(nvinfer1::PluginFieldType t) noexcept
{
    switch (t)
    {
    case nvinfer1::PluginFieldType::kINT32: return FieldKind::kINT32;
    case nvinfer1::PluginFieldType::kINT64: return FieldKind::kINT64;
    case nvinfer1::PluginFieldType::kCHAR: return FieldKind::kCHAR;
    default: return FieldKind::kOTHER;
    }
}

//! Logs `why` when it is not empty; true when it is empty.
bool ok(std::string const& why) noexcept
{
    if (!why.empty())
    {
        logError(why.c_str());
    }
    return why.empty();
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

bool cudaRuntimeUsable() noexcept
{
    int driver = 0;
    if (cudaDriverGetVersion(&driver) != cudaSuccess)
    {
        driver = 0;
    }
    try
    {
        return ok(checkCudaVersions(driver, CUDART_VERSION));
    }
    catch (std::exception const& e)
    {
        logError(e.what());
        return false;
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
    // The attributes include the input count; the serialization buffers are rebuilt on demand.
    auto* copy = new (std::nothrow) SelectiveScanPlugin(mAttrs);
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
    try
    {
        if (!ok(checkCounts(nbInputs, nbOutputs)))
        {
            return -1;
        }
        TensorInfo info[kMaxInputs];
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            info[i] = toInfo(in[i].desc);
        }
        mAttrs.nbInputs = nbInputs;
        return ok(checkDims(info, nbInputs)) ? 0 : -1;
    }
    catch (std::exception const& e)
    {
        logError(e.what());
        return -1;
    }
}

int32_t SelectiveScanPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (!checkCounts(nbInputs, nbOutputs).empty())
    {
        logError("SelectiveScan: expected 8 or 9 inputs and 1 output");
        return -1;
    }
    outputTypes[0] = inputTypes[kU]; // y has the I/O dtype of u
    return 0;
}

int32_t SelectiveScanPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
    nvinfer1::DimsExprs const* /* shapeInputs */, int32_t /* nbShapeInputs */, nvinfer1::DimsExprs* outputs,
    int32_t nbOutputs, nvinfer1::IExprBuilder& /* exprBuilder */) noexcept
{
    if (!checkCounts(nbInputs, nbOutputs).empty() || inputs[kU].nbDims != 3)
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
    if (!checkCounts(nbInputs, nbOutputs).empty() || pos < 0 || pos > nbInputs)
    {
        return false;
    }
    TensorInfo info[kMaxInputs + 1];
    for (int32_t i = 0; i <= nbInputs; ++i)
    {
        info[i] = toInfo(inOut[i].desc);
    }
    return supportsFormat(pos, info, nbInputs, nbOutputs);
}

int32_t SelectiveScanPlugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t SelectiveScanPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
    nvinfer1::PluginTensorDesc const* /* out */, int32_t nbOutputs) noexcept
{
    try
    {
        if (!ok(checkCounts(nbInputs, nbOutputs)))
        {
            return -1;
        }
        TensorInfo info[kMaxInputs];
        for (int32_t i = 0; i < nbInputs; ++i)
        {
            info[i] = toInfo(in[i]);
        }
        mAttrs.nbInputs = nbInputs;
        return ok(checkDims(info, nbInputs)) ? 0 : -1;
    }
    catch (std::exception const& e)
    {
        logError(e.what());
        return -1;
    }
}

int32_t SelectiveScanPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const* /* outputDesc */, void const* const* inputs, void* const* outputs,
    void* /* workspace */, cudaStream_t stream) noexcept
{
    try
    {
        TensorInfo info[kMaxInputs];
        for (int32_t i = 0; i < mAttrs.nbInputs; ++i)
        {
            info[i] = toInfo(inputDesc[i]);
        }
        // Everything but the launch itself is selectiveScanPluginCore.h (tested on the CPU by pluginCoreTest).
        std::string const why = enqueueScan(mAttrs, info, inputs, outputs,
            [stream](scan::ScanParams const& p) { return scan::launchSelectiveScan(p, stream); });
        return ok(why) ? 0 : -1;
    }
    catch (std::exception const& e)
    {
        logError(e.what());
        return -1;
    }
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
        mSerial = serialValues(mAttrs);
        mSerialFields.clear();
        mSerialFields.emplace_back("delta_softplus", &mSerial.deltaSoftplus, nvinfer1::PluginFieldType::kINT32, 1);
        mSerialFields.emplace_back("mode", mSerial.mode.c_str(), nvinfer1::PluginFieldType::kCHAR,
            static_cast<int32_t>(mSerial.mode.size() + 1));
        mSerialFields.emplace_back("nb_inputs", &mSerial.nbInputs, nvinfer1::PluginFieldType::kINT32, 1);
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
        SelectiveScanAttrs attrs; // defaults: delta_softplus=1, mode="all", nb_inputs=9
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            nvinfer1::PluginField const& f = fc->fields[i];
            if (!ok(applyField(attrs, f.name, toFieldKind(f.type), f.data, f.length)))
            {
                return nullptr;
            }
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
