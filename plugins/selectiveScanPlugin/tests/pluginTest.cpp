// ctest (needs only the TensorRT headers): loads libm4r_trt_plugin.so like IPluginRegistry::loadLibrary
// does (dlopen + getCreators) and checks the creator and the plugin's build-time logic: attribute
// parsing, output types and shapes, format negotiation, validation, serialization round trip.
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

using namespace nvinfer1;

namespace
{
int gFailures = 0;

void check(bool ok, char const* what)
{
    if (!ok)
    {
        std::printf("FAIL: %s\n", what);
        ++gFailures;
    }
}

struct Views
{
    IPluginV3OneCore* core;
    IPluginV3OneBuild* build;
    IPluginV3OneRuntime* runtime;
};

Views views(IPluginV3* p)
{
    return {static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE)),
        static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD)),
        static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME))};
}

// Output rank for 9 inputs with u of rank 3. getOutputShapes only copies u's dimension expressions, so
// opaque non-null pointers stand in for them and the expression builder is never touched.
int32_t outputRank(IPluginV3OneBuild* build, bool& copiedDims)
{
    DimsExprs in[9]{};
    int32_t const ranks[9] = {3, 3, 2, 3, 3, 1, 3, 1, 1};
    for (int i = 0; i < 9; ++i)
    {
        in[i].nbDims = ranks[i];
        for (int j = 0; j < ranks[i]; ++j)
        {
            in[i].d[j] = reinterpret_cast<IDimensionExpr const*>(static_cast<uintptr_t>(0x1000 + 16 * (i * 8 + j)));
        }
    }
    DimsExprs out{};
    alignas(IExprBuilder) unsigned char unusedBuilder[sizeof(void*) * 4]{};
    if (build->getOutputShapes(in, 9, nullptr, 0, &out, 1, *reinterpret_cast<IExprBuilder*>(unusedBuilder)) != 0)
    {
        return -1;
    }
    copiedDims = true;
    for (int j = 0; j < out.nbDims; ++j)
    {
        copiedDims = copiedDims && out.d[j] == in[0].d[j];
    }
    return out.nbDims;
}

void setDesc(DynamicPluginTensorDesc* io, DataType io_t, int32_t dstate)
{
    DataType const types[10] = {io_t, io_t, DataType::kFLOAT, io_t, io_t, DataType::kFLOAT, io_t, DataType::kFLOAT,
        DataType::kINT32, io_t};
    int32_t const ranks[10] = {3, 3, 2, 3, 3, 1, 3, 1, 1, 2};
    for (int i = 0; i < 10; ++i)
    {
        io[i] = DynamicPluginTensorDesc{};
        io[i].desc.type = types[i];
        io[i].desc.format = TensorFormat::kLINEAR;
        io[i].desc.dims.nbDims = ranks[i];
        for (int j = 0; j < ranks[i]; ++j)
        {
            io[i].desc.dims.d[j] = -1; // dynamic at build time
        }
    }
    io[2].desc.dims.d[1] = dstate;
}

std::string fieldText(PluginField const& f)
{
    std::string s(static_cast<char const*>(f.data), static_cast<size_t>(f.length));
    return s.substr(0, s.find('\0'));
}
} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::printf("usage: %s libm4r_trt_plugin.so\n", argv[0]);
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
    {
        std::printf("FAIL: dlopen: %s\n", dlerror());
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    check(getCreators != nullptr && dlsym(lib, "setLoggerFinder") != nullptr, "entry points exported");
    int32_t nb = 0;
    IPluginCreatorInterface* const* creators = getCreators(nb);
    check(nb == 1, "one creator");
    check(std::strcmp(creators[0]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0, "creator is V3One");
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    check(std::strcmp(creator->getPluginName(), "SelectiveScan") == 0, "name");
    check(std::strcmp(creator->getPluginVersion(), "1") == 0, "version");
    check(std::strcmp(creator->getPluginNamespace(), "m4r") == 0, "namespace");
    check(creator->getFieldNames()->nbFields == 2, "two fields");

    // Fields as an ONNX parser passes them: string without NUL, plus attributes the plugin ignores.
    int32_t const softplus = 0;
    char const mode[] = {'l', 'a', 's', 't'};
    PluginField fields[] = {PluginField("delta_softplus", &softplus, PluginFieldType::kINT32, 1),
        PluginField("mode", mode, PluginFieldType::kCHAR, 4), PluginField("plugin_version", "1", PluginFieldType::kCHAR, 1)};
    PluginFieldCollection fc{3, fields};
    IPluginV3* plugin = creator->createPlugin("scan0", &fc, TensorRTPhase::kBUILD);
    check(plugin != nullptr, "createPlugin(mode=last)");
    if (plugin == nullptr)
    {
        return 1;
    }
    Views v = views(plugin);
    check(v.core != nullptr && v.build != nullptr && v.runtime != nullptr, "capabilities");
    check(std::strcmp(v.core->getPluginNamespace(), "m4r") == 0, "plugin namespace");
    check(v.build->getNbOutputs() == 1, "one output");

    bool copied = false;
    check(outputRank(v.build, copied) == 2 && copied, "mode last: y is (B, D) from u's dims");

    DataType inTypes[9] = {DataType::kBF16, DataType::kBF16, DataType::kFLOAT, DataType::kBF16, DataType::kBF16,
        DataType::kFLOAT, DataType::kBF16, DataType::kFLOAT, DataType::kINT32};
    DataType outType = DataType::kFLOAT;
    check(v.build->getOutputDataTypes(&outType, 1, inTypes, 9) == 0 && outType == DataType::kBF16, "y dtype = u dtype");
    check(v.build->getOutputDataTypes(&outType, 1, inTypes, 7) != 0, "7 inputs rejected");

    DynamicPluginTensorDesc io[10];
    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        setDesc(io, t, 16);
        bool all = true;
        for (int pos = 0; pos < 10; ++pos)
        {
            all = all && v.build->supportsFormatCombination(pos, io, 9, 1);
        }
        check(all, "contract types accepted (fp32/fp16/bf16)");
        check(v.build->supportsFormatCombination(1, io, 8, 1), "8 inputs (no lengths) accepted");
    }
    setDesc(io, DataType::kHALF, 16);
    io[0].desc.type = DataType::kINT8;
    check(!v.build->supportsFormatCombination(0, io, 9, 1), "int8 u rejected");
    setDesc(io, DataType::kHALF, 16);
    io[2].desc.type = DataType::kHALF;
    check(!v.build->supportsFormatCombination(2, io, 9, 1), "fp16 A rejected (parameters stay fp32)");
    setDesc(io, DataType::kHALF, 16);
    io[3].desc.type = DataType::kFLOAT;
    check(!v.build->supportsFormatCombination(3, io, 9, 1), "B dtype != u dtype rejected");
    setDesc(io, DataType::kHALF, 16);
    io[8].desc.type = DataType::kINT64;
    check(!v.build->supportsFormatCombination(8, io, 9, 1), "int64 lengths rejected");
    setDesc(io, DataType::kHALF, 16);
    io[9].desc.type = DataType::kFLOAT;
    check(!v.build->supportsFormatCombination(9, io, 9, 1), "y dtype != u dtype rejected");
    setDesc(io, DataType::kHALF, 16);
    io[0].desc.format = TensorFormat::kHWC8;
    check(!v.build->supportsFormatCombination(0, io, 9, 1), "non-linear format rejected");

    setDesc(io, DataType::kHALF, 64);
    check(v.build->configurePlugin(io, 9, io + 9, 1) == 0, "N = 64 accepted");
    setDesc(io, DataType::kHALF, 65);
    check(v.build->configurePlugin(io, 9, io + 9, 1) != 0, "N = 65 rejected");
    setDesc(io, DataType::kHALF, 16);
    io[0].desc.dims.nbDims = 2;
    check(v.build->configurePlugin(io, 9, io + 9, 1) != 0, "rank-2 u rejected");
    setDesc(io, DataType::kHALF, 16);
    io[0].desc.dims.d[0] = 4;
    io[8].desc.dims.d[0] = 3;
    check(v.build->configurePlugin(io, 9, io + 9, 1) != 0, "lengths batch != u batch rejected");
    setDesc(io, DataType::kHALF, 16);
    check(v.build->configurePlugin(io, 9, io + 9, 1) == 0, "configurePlugin with lengths");

    // Serialization round trip: the runtime-phase plugin gets exactly the serialized fields.
    PluginFieldCollection const* ser = v.runtime->getFieldsToSerialize();
    check(ser != nullptr && ser->nbFields == 3, "three serialized fields");
    if (ser != nullptr && ser->nbFields == 3)
    {
        check(*static_cast<int32_t const*>(ser->fields[0].data) == 0, "delta_softplus serialized");
        check(fieldText(ser->fields[1]) == "last", "mode serialized");
        check(std::strcmp(ser->fields[2].name, "nb_inputs") == 0 && *static_cast<int32_t const*>(ser->fields[2].data) == 9,
            "nb_inputs serialized (9 after configurePlugin with lengths)");
        IPluginV3* restored = creator->createPlugin("scan0", ser, TensorRTPhase::kRUNTIME);
        check(restored != nullptr, "createPlugin(runtime)");
        if (restored != nullptr)
        {
            check(outputRank(views(restored).build, copied) == 2, "restored plugin keeps mode last");
            delete restored;
        }
    }
    IPluginV3* cloned = plugin->clone();
    check(cloned != nullptr && outputRank(views(cloned).build, copied) == 2, "clone keeps mode last");
    delete cloned;
    delete plugin;

    // Defaults (no fields): mode all -> y (B, D, L).
    PluginFieldCollection empty{0, nullptr};
    IPluginV3* defaults = creator->createPlugin("scan1", &empty, TensorRTPhase::kBUILD);
    check(defaults != nullptr && outputRank(views(defaults).build, copied) == 3 && copied, "default mode all");
    delete defaults;

    char const bad[] = "first";
    PluginField badField("mode", bad, PluginFieldType::kCHAR, 6);
    PluginFieldCollection badFc{1, &badField};
    check(creator->createPlugin("scan2", &badFc, TensorRTPhase::kBUILD) == nullptr, "mode 'first' rejected");

    std::printf("%s (%d failures)\n", gFailures == 0 ? "PASS" : "FAIL", gFailures);
    return gFailures == 0 ? 0 : 1;
}
