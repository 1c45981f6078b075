// Load-time registration for libm4r_trt_plugin_static.so: the creator registers itself in the global
// plugin registry when the library is loaded (LD_PRELOAD, trtexec --staticPlugins, Triton's
// LD_PRELOAD). Do not pass this library to IPluginRegistry::loadLibrary; use libm4r_trt_plugin.so there.
#include "selectiveScanPlugin.h"

namespace m4r
{
namespace plugin
{
REGISTER_TENSORRT_PLUGIN(SelectiveScanPluginCreator);
} // namespace plugin
} // namespace m4r
