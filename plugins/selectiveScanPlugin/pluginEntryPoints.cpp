// Entry points of the *dynamic* plugin library (libm4r_trt_plugin.so), looked up by
// IPluginRegistry::loadLibrary, trtexec --dynamicPlugins and plugins serialized into version-compatible
// engines. This library deliberately does NOT self-register at load time: loadLibrary() fails when a
// creator with the same name/version/namespace is already registered. The statically registering variant
// is a separate library (pluginStaticRegistration.cpp, libm4r_trt_plugin_static.so).
#include "selectiveScanPlugin.h"

#define M4R_PLUGIN_EXPORT extern "C" __attribute__((visibility("default")))

M4R_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    m4r::plugin::setLoggerFinder(finder);
}

M4R_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    // A driver too old for the CUDA runtime linked into the plugin: no creators, and the logged error
    // says why (loadLibrary then fails here instead of every enqueue failing later).
    if (!m4r::plugin::cudaRuntimeUsable())
    {
        nbCreators = 0;
        return nullptr;
    }
    // Function-local statics: constructed on first call, after the library is fully loaded.
    static m4r::plugin::SelectiveScanPluginCreator selectiveScanCreator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&selectiveScanCreator};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}
