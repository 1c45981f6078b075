// Load-time registration for libm4r_trt_plugin_static.so: the creator registers itself in the global
// plugin registry when the library is loaded (LD_PRELOAD, trtexec --staticPlugins, Triton's
// LD_PRELOAD). Do not pass this library to IPluginRegistry::loadLibrary; use libm4r_trt_plugin.so there.
//
// Not REGISTER_TENSORRT_PLUGIN: its PluginRegistrar registers under namespace "" while the creator reports
// "m4r" (NVIDIA's own plugins pass the creator's namespace). This registers under "m4r" explicitly, after
// checking that the driver supports the CUDA runtime linked into the plugin.
#include "selectiveScanPlugin.h"

#include <cstdio>
#include <cuda_runtime_api.h>

namespace m4r
{
namespace plugin
{
namespace
{
struct StaticRegistration
{
    StaticRegistration()
    {
        if (!cudaRuntimeUsable())
        {
            return; // logged; the registry then reports the missing creator by name
        }
        static SelectiveScanPluginCreator creator;
        nvinfer1::IPluginRegistry* registry = getPluginRegistry();
        if (registry == nullptr || !registry->registerCreator(creator, kPluginNamespace))
        {
            std::fprintf(stderr, "[m4r plugin] ERROR: could not register %s::%s v%s with TensorRT's plugin registry\n",
                kPluginNamespace, kPluginName, kPluginVersion);
        }
    }
};
StaticRegistration const gStaticRegistration{};
} // namespace
} // namespace plugin
} // namespace m4r
