// ort_recommend: top-K recommendations for one user history with ONNX Runtime (C++ API).
//
//   ort_recommend --model out/model.onnx [--items out/items.txt] [--ort-ops libm4r_ort_ops.so]
//                 [--k 10] [--threads 1] TOKEN [TOKEN ...]
//
// Loads the exported model (with the custom-op library when given: SelectiveScan then runs the native CPU
// kernel; without it ONNX Runtime runs the node's function body), maps the raw item tokens (oldest first)
// to indices through items.txt, and prints rank, token and score of the top K items. The model's inputs are
// read from the file: item_seq and item_seq_len, plus exclude_items (fed as zeros = nothing excluded)
// where the ranking head has it. Heads: scores (top-K taken here) and topk (the model's own top-K).
#include "common.h"

#include <onnxruntime_cxx_api.h>

#include <array>
#include <cstdio>

using namespace m4r_recipe;

namespace
{
char const* const kUsage = "ort_recommend --model model.onnx [--items items.txt] [--ort-ops libm4r_ort_ops.so] "
                           "[--k 10] [--threads 1] TOKEN [TOKEN ...]";

int64_t maxSeqLen(Ort::Session& session)
{
    Ort::AllocatorWithDefaultOptions alloc;
    auto meta = session.GetModelMetadata();
    auto value = meta.LookupCustomMetadataMapAllocated("m4r.max_seq_len", alloc);
    return value ? std::atoll(value.get()) : 0;
}

int run(Args const& args)
{
    auto const tokens = readItems(args.items);
    // errors only: ONNX Runtime's optimizer notes (e.g. on fp16 graphs) are not the user's concern
    Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "ort_recommend");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(args.threads);
    options.SetInterOpNumThreads(1);
    if (!args.library.empty())
    {
        // Fails with ONNX Runtime's message (missing file, wrong architecture, onnxruntime older than the
        // headers the library was built with) instead of silently running the function body.
        options.RegisterCustomOpsLibrary(args.library.c_str());
    }
    Ort::Session session(env, args.model.c_str(), options);

    auto const ids = encodeHistory(args.history, tokens, maxSeqLen(session));
    int64_t const len = static_cast<int64_t>(ids.size());
    std::vector<int64_t> itemSeq = ids, itemSeqLen{len}, exclude{0};
    std::array<int64_t, 2> seqShape{1, len}, excludeShape{1, 1};
    std::array<int64_t, 1> lenShape{1};
    auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);

    Ort::AllocatorWithDefaultOptions alloc;
    std::vector<Ort::AllocatedStringPtr> nameHolder;
    std::vector<char const*> inputNames;
    std::vector<Ort::Value> inputs;
    for (size_t i = 0; i < session.GetInputCount(); ++i)
    {
        nameHolder.push_back(session.GetInputNameAllocated(i, alloc));
        std::string const name = nameHolder.back().get();
        inputNames.push_back(nameHolder.back().get());
        if (name == "item_seq")
            inputs.push_back(Ort::Value::CreateTensor<int64_t>(mem, itemSeq.data(), itemSeq.size(), seqShape.data(), 2));
        else if (name == "item_seq_len")
            inputs.push_back(Ort::Value::CreateTensor<int64_t>(mem, itemSeqLen.data(), 1, lenShape.data(), 1));
        else if (name == "exclude_items")
            inputs.push_back(Ort::Value::CreateTensor<int64_t>(mem, exclude.data(), 1, excludeShape.data(), 2));
        else
            throw UsageError("--model " + args.model + ": unexpected input '" + name + "'; re-export it with m4r export");
    }
    std::vector<std::string> outputNames;
    for (size_t i = 0; i < session.GetOutputCount(); ++i)
        outputNames.emplace_back(session.GetOutputNameAllocated(i, alloc).get());
    std::vector<char const*> outputPtrs;
    for (auto const& n : outputNames)
        outputPtrs.push_back(n.c_str());

    auto outputs = session.Run(Ort::RunOptions{nullptr}, inputNames.data(), inputs.data(), inputs.size(),
        outputPtrs.data(), outputPtrs.size());

    auto find = [&](char const* name) -> Ort::Value* {
        for (size_t i = 0; i < outputNames.size(); ++i)
            if (outputNames[i] == name)
                return &outputs[i];
        return nullptr;
    };
    std::vector<int64_t> items;
    std::vector<float> scores;
    if (Ort::Value* s = find("scores"))
    {
        int64_t const n = s->GetTensorTypeAndShapeInfo().GetShape().back();
        float const* row = s->GetTensorData<float>();
        items = topK(row, n, args.k);
        for (int64_t i : items)
            scores.push_back(row[i]);
    }
    else if (Ort::Value* ts = find("topk_scores"))
    {
        Ort::Value* ti = find("topk_items");
        size_t const n = std::min<size_t>(args.k, ts->GetTensorTypeAndShapeInfo().GetElementCount());
        for (size_t r = 0; r < n; ++r)
        {
            if (!std::isfinite(ts->GetTensorData<float>()[r]))
                break;
            scores.push_back(ts->GetTensorData<float>()[r]);
            items.push_back(ti->GetTensorData<int64_t>()[r]);
        }
    }
    else
    {
        throw UsageError("--model " + args.model + ": no scores or topk_scores output (embedding head); "
                         "export it with --head scores or --head topk");
    }
    printRanking(items, scores, tokens);
    return 0;
}
} // namespace

int main(int argc, char** argv)
{
    try
    {
        return run(parseArgs(argc, argv, "--ort-ops", kUsage));
    }
    catch (UsageError const& e)
    {
        std::fprintf(stderr, "Error: %s\n", e.what());
        return 2;
    }
    catch (Ort::Exception const& e)
    {
        std::fprintf(stderr, "Error: ONNX Runtime: %s\n", e.what());
        return 1;
    }
    catch (std::exception const& e)
    {
        std::fprintf(stderr, "Error: %s\n", e.what());
        return 1;
    }
}
