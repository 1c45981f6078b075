// trt_recommend: top-K recommendations for one user history with TensorRT (C++ API, TensorRT 10.8+ / 11.x).
//
//   trt_recommend --model out/model.plan [--items out/items.txt] --plugin libm4r_trt_plugin.so
//                 [--k 10] TOKEN [TOKEN ...]
//
// Loads the SelectiveScan plugin library (IPluginRegistry::loadLibrary; the engine cannot deserialise
// without it), deserialises the engine, feeds the history (raw item tokens, oldest first, mapped through
// items.txt; the newest items that fit the engine's profile are kept) and prints rank, token and score of the
// top K items. Input tensors are read from the engine: item_seq and item_seq_len (int64 or int32), plus
// exclude_items (zeros = nothing excluded) where the ranking head has it.
#include "common.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>

using namespace m4r_recipe;

namespace
{
char const* const kUsage
    = "trt_recommend --model model.plan [--items items.txt] --plugin libm4r_trt_plugin.so [--k 10] TOKEN [TOKEN ...]";

class Logger : public nvinfer1::ILogger
{
    void log(Severity severity, char const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
            std::fprintf(stderr, "TensorRT: %s\n", msg);
    }
};

void check(cudaError_t rc, char const* what)
{
    if (rc != cudaSuccess)
        throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(rc));
}

struct DeviceBuffer
{
    void* ptr = nullptr;
    explicit DeviceBuffer(size_t bytes)
    {
        check(cudaMalloc(&ptr, bytes == 0 ? 1 : bytes), "cudaMalloc");
    }
    ~DeviceBuffer()
    {
        cudaFree(ptr);
    }
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
};

size_t elementSize(nvinfer1::DataType t)
{
    switch (t)
    {
    case nvinfer1::DataType::kINT64: return 8;
    case nvinfer1::DataType::kFLOAT:
    case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kHALF:
    case nvinfer1::DataType::kBF16: return 2;
    default: throw std::runtime_error("unsupported tensor data type in the engine");
    }
}

// int64 host values -> the engine's integer input type.
std::vector<char> integers(std::vector<int64_t> const& v, nvinfer1::DataType t)
{
    std::vector<char> out(v.size() * elementSize(t));
    for (size_t i = 0; i < v.size(); ++i)
    {
        if (t == nvinfer1::DataType::kINT64)
            std::memcpy(out.data() + 8 * i, &v[i], 8);
        else if (t == nvinfer1::DataType::kINT32)
        {
            int32_t const x = static_cast<int32_t>(v[i]);
            std::memcpy(out.data() + 4 * i, &x, 4);
        }
        else
            throw std::runtime_error("integer engine inputs must be int32 or int64");
    }
    return out;
}

float toFloat(char const* p, nvinfer1::DataType t)
{
    if (t == nvinfer1::DataType::kFLOAT)
    {
        float f;
        std::memcpy(&f, p, 4);
        return f;
    }
    uint16_t h;
    std::memcpy(&h, p, 2);
    uint32_t bits;
    if (t == nvinfer1::DataType::kBF16)
        bits = static_cast<uint32_t>(h) << 16;
    else // IEEE half
    {
        uint32_t const sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
        if (exp == 0x1f)
            bits = sign | 0x7f800000u | (man << 13);
        else if (exp != 0)
            bits = sign | ((exp + 112) << 23) | (man << 13);
        else if (man == 0)
            bits = sign;
        else
        {
            float const f = std::ldexp(static_cast<float>(man), -24);
            std::memcpy(&bits, &f, 4);
            bits |= sign;
        }
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

int run(Args const& args)
{
    if (args.library.empty())
        throw UsageError("--plugin libm4r_trt_plugin.so is required (m4r build-plugin prints its path)");
    auto const tokens = readItems(args.items);
    std::ifstream in(args.model, std::ios::binary);
    if (!in)
        throw UsageError("--model " + args.model + ": cannot read it; pass a model.plan from m4r build-engine");
    std::vector<char> plan((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());

    Logger logger;
    std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
    if (!runtime)
        throw std::runtime_error("createInferRuntime failed");
    if (runtime->getPluginRegistry().loadLibrary(args.library.c_str()) == nullptr)
        throw UsageError("--plugin " + args.library + ": IPluginRegistry::loadLibrary failed (see the TensorRT log)");
    std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(plan.data(), plan.size()));
    if (!engine)
        throw UsageError("--model " + args.model + ": not a TensorRT engine for this TensorRT version and GPU");
    std::unique_ptr<nvinfer1::IExecutionContext> context(engine->createExecutionContext());
    if (!context)
        throw std::runtime_error("createExecutionContext failed");

    int64_t const maxLen = engine->getProfileShape("item_seq", 0, nvinfer1::OptProfileSelector::kMAX).d[1];
    auto const ids = encodeHistory(args.history, tokens, maxLen);
    int64_t const len = static_cast<int64_t>(ids.size());

    cudaStream_t stream;
    check(cudaStreamCreate(&stream), "cudaStreamCreate");
    std::vector<std::unique_ptr<DeviceBuffer>> buffers;
    struct Output
    {
        std::string name;
        nvinfer1::DataType type;
        std::vector<char> host;
        void* device;
    };
    std::vector<Output> outputs;
    int32_t const nIo = engine->getNbIOTensors();
    for (int32_t i = 0; i < nIo; ++i) // inputs first: output shapes depend on them
    {
        char const* name = engine->getIOTensorName(i);
        if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kINPUT)
            continue;
        std::string const n = name;
        nvinfer1::DataType const t = engine->getTensorDataType(name);
        std::vector<int64_t> values;
        nvinfer1::Dims dims{};
        if (n == "item_seq")
        {
            values = ids;
            dims.nbDims = 2;
            dims.d[0] = 1;
            dims.d[1] = len;
        }
        else if (n == "item_seq_len" || n == "exclude_items")
        {
            values = {n == "item_seq_len" ? len : 0};
            dims.nbDims = n == "item_seq_len" ? 1 : 2;
            dims.d[0] = 1;
            dims.d[1] = 1;
        }
        else
            throw UsageError("--model " + args.model + ": unexpected input '" + n + "'; rebuild it from m4r export");
        auto const bytes = integers(values, t);
        buffers.push_back(std::make_unique<DeviceBuffer>(bytes.size()));
        check(cudaMemcpyAsync(buffers.back()->ptr, bytes.data(), bytes.size(), cudaMemcpyHostToDevice, stream),
            "cudaMemcpy");
        if (!context->setInputShape(name, dims) || !context->setTensorAddress(name, buffers.back()->ptr))
            throw std::runtime_error("the engine rejected input " + n);
    }
    for (int32_t i = 0; i < nIo; ++i)
    {
        char const* name = engine->getIOTensorName(i);
        if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kOUTPUT)
            continue;
        nvinfer1::Dims const dims = context->getTensorShape(name);
        int64_t count = 1;
        for (int32_t d = 0; d < dims.nbDims; ++d)
            count *= dims.d[d];
        nvinfer1::DataType const t = engine->getTensorDataType(name);
        size_t const bytes = static_cast<size_t>(count) * elementSize(t);
        buffers.push_back(std::make_unique<DeviceBuffer>(bytes));
        outputs.push_back({name, t, std::vector<char>(bytes), buffers.back()->ptr});
        if (!context->setTensorAddress(name, buffers.back()->ptr))
            throw std::runtime_error(std::string("the engine rejected output ") + name);
    }
    if (!context->enqueueV3(stream))
        throw std::runtime_error("enqueueV3 failed (see the TensorRT log)");
    for (auto& o : outputs)
        check(cudaMemcpyAsync(o.host.data(), o.device, o.host.size(), cudaMemcpyDeviceToHost, stream), "cudaMemcpy");
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    cudaStreamDestroy(stream);

    auto find = [&](char const* name) -> Output* {
        for (auto& o : outputs)
            if (o.name == name)
                return &o;
        return nullptr;
    };
    std::vector<int64_t> items;
    std::vector<float> scores;
    if (Output* s = find("scores"))
    {
        size_t const es = elementSize(s->type), n = s->host.size() / es;
        std::vector<float> row(n);
        for (size_t i = 0; i < n; ++i)
            row[i] = toFloat(s->host.data() + i * es, s->type);
        items = topK(row.data(), static_cast<int64_t>(n), args.k);
        for (int64_t i : items)
            scores.push_back(row[i]);
    }
    else if (Output* ts = find("topk_scores"))
    {
        Output* ti = find("topk_items");
        size_t const es = elementSize(ts->type), n = std::min<size_t>(args.k, ts->host.size() / es);
        for (size_t r = 0; r < n; ++r)
        {
            float const sc = toFloat(ts->host.data() + r * es, ts->type);
            if (!std::isfinite(sc))
                break;
            int64_t item = 0;
            if (ti->type == nvinfer1::DataType::kINT64)
                std::memcpy(&item, ti->host.data() + 8 * r, 8);
            else
            {
                int32_t v;
                std::memcpy(&v, ti->host.data() + 4 * r, 4);
                item = v;
            }
            scores.push_back(sc);
            items.push_back(item);
        }
    }
    else
        throw UsageError("--model " + args.model + ": no scores or topk_scores output (embedding head)");
    printRanking(items, scores, tokens);
    return 0;
}
} // namespace

int main(int argc, char** argv)
{
    try
    {
        return run(parseArgs(argc, argv, "--plugin", kUsage));
    }
    catch (UsageError const& e)
    {
        std::fprintf(stderr, "Error: %s\n", e.what());
        return 2;
    }
    catch (std::exception const& e)
    {
        std::fprintf(stderr, "Error: %s\n", e.what());
        return 1;
    }
}
