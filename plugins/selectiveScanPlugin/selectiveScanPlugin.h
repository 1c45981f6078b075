/*
 * TensorRT IPluginV3 plugin for the m4r SelectiveScan op (name "SelectiveScan", namespace "m4r",
 * version "1"). The op is specified in README.md next to this file; the kernels live in
 * selectiveScanKernel.cu and know nothing of TensorRT.
 */
#ifndef M4R_SELECTIVE_SCAN_PLUGIN_H
#define M4R_SELECTIVE_SCAN_PLUGIN_H

#include "selectiveScanPluginCore.h"

#include <NvInferRuntime.h>

#include <string>
#include <vector>

namespace m4r
{
namespace plugin
{

constexpr char const* kPluginName = "SelectiveScan";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "m4r";

class SelectiveScanPlugin final : public nvinfer1::IPluginV3,
                                  public nvinfer1::IPluginV3OneCore,
                                  public nvinfer1::IPluginV3OneBuild,
                                  public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit SelectiveScanPlugin(SelectiveScanAttrs const& attrs);
    ~SelectiveScanPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    SelectiveScanAttrs mAttrs; //!< including nbInputs: serialized, refreshed by configurePlugin/onShapeChange
    // Storage behind getFieldsToSerialize(); rebuilt on each call so clones never share pointers.
    SerialValues mSerial{};
    std::vector<nvinfer1::PluginField> mSerialFields;
    nvinfer1::PluginFieldCollection mSerialFc{};
};

class SelectiveScanPluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    SelectiveScanPluginCreator();
    ~SelectiveScanPluginCreator() override = default;

    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
        nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFc{};
};

//! Logger for plugin diagnostics: the one TensorRT hands over through setLoggerFinder() when the
//! library was loaded dynamically, stderr otherwise (static registration).
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
void logError(char const* message) noexcept;

//! Load-time check: the installed driver supports the CUDA runtime linked into the plugin
//! (checkCudaVersions). Logs the error and returns false otherwise.
bool cudaRuntimeUsable() noexcept;

} // namespace plugin
} // namespace m4r

#endif // M4R_SELECTIVE_SCAN_PLUGIN_H
