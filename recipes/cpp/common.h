// Shared by ort_recommend and trt_recommend: command line, items.txt, top-K selection.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace m4r_recipe
{

// A mistake of the caller (bad argument, unknown token): printed as "Error: ..." with exit code 2.
struct UsageError : std::runtime_error
{
    using std::runtime_error::runtime_error;
};

struct Args
{
    std::string model;                // model.onnx or model.plan
    std::string items;                // items.txt (default: beside the model)
    std::string library;              // custom-op library / TensorRT plugin (optional for ORT)
    int k = 10;
    int threads = 1;
    std::vector<std::string> history; // raw item tokens, oldest first
};

inline std::string besideModel(std::string const& model, char const* name)
{
    auto const slash = model.find_last_of('/');
    return (slash == std::string::npos ? std::string() : model.substr(0, slash + 1)) + name;
}

inline Args parseArgs(int argc, char** argv, char const* libraryFlag, char const* usage)
{
    Args a;
    for (int i = 1; i < argc; ++i)
    {
        std::string const arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc)
                throw UsageError(arg + " needs a value; usage: " + usage);
            return argv[++i];
        };
        if (arg == "--model")
            a.model = value();
        else if (arg == "--items")
            a.items = value();
        else if (arg == libraryFlag)
            a.library = value();
        else if (arg == "--k" || arg == "--threads")
        {
            std::string const v = value();
            int n = 0;
            try
            {
                n = std::stoi(v);
            }
            catch (std::exception const&)
            {
                n = 0;
            }
            if (n < 1)
                throw UsageError(arg + " " + v + ": expected a positive integer");
            (arg == "--k" ? a.k : a.threads) = n;
        }
        else if (arg == "-h" || arg == "--help")
        {
            std::printf("usage: %s\n", usage);
            std::exit(0);
        }
        else if (arg.rfind("--", 0) == 0)
            throw UsageError("unknown option " + arg + "; usage: " + usage);
        else
            a.history.push_back(arg);
    }
    if (a.model.empty())
        throw UsageError(std::string("--model is required; usage: ") + usage);
    if (a.history.empty())
        throw UsageError(std::string("give at least one item token (the user's history, oldest first); usage: ") + usage);
    if (!std::ifstream(a.model, std::ios::binary))  // before items.txt, which is looked for beside it
        throw UsageError("--model " + a.model + ": cannot read it (no such file?); pass the file written by m4r export");
    if (a.items.empty())
        a.items = besideModel(a.model, "items.txt");
    return a;
}

// items.txt: line i holds the raw token of item index i (line 0 is the padding token).
inline std::vector<std::string> readItems(std::string const& path)
{
    std::ifstream in(path);
    if (!in)
        throw UsageError("--items " + path + ": cannot read it; pass the items.txt written by m4r export");
    std::vector<std::string> tokens;
    for (std::string line; std::getline(in, line);)
    {
        if (!line.empty() && line.back() == '\r')
            line.pop_back();
        tokens.push_back(line);
    }
    if (tokens.size() < 2)
        throw UsageError("--items " + path + ": expected one token per item (at least 2 lines)");
    return tokens;
}

// Raw tokens -> item indices, newest maxLen kept (as the exported model expects).
inline std::vector<int64_t> encodeHistory(
    std::vector<std::string> const& history, std::vector<std::string> const& tokens, int64_t maxLen)
{
    std::unordered_map<std::string, int64_t> index;
    for (size_t i = 1; i < tokens.size(); ++i)
        index.emplace(tokens[i], static_cast<int64_t>(i));
    std::vector<int64_t> ids;
    for (auto const& t : history)
    {
        auto const it = index.find(t);
        if (it == index.end())
            throw UsageError("item token '" + t + "' is not in items.txt; pass tokens the model was trained on");
        ids.push_back(it->second);
    }
    if (maxLen > 0 && static_cast<int64_t>(ids.size()) > maxLen)
        ids.erase(ids.begin(), ids.end() - maxLen);
    return ids;
}

// Top-k of one score row: finite scores only (masked items are -inf), score descending, index ascending
// on ties (the rule m4r's Python helpers use).
inline std::vector<int64_t> topK(float const* scores, int64_t n, int k)
{
    std::vector<int64_t> idx;
    for (int64_t i = 0; i < n; ++i)
        if (std::isfinite(scores[i]))
            idx.push_back(i);
    auto const better = [&](int64_t a, int64_t b) { return scores[a] > scores[b] || (scores[a] == scores[b] && a < b); };
    size_t const keep = std::min<size_t>(static_cast<size_t>(k), idx.size());
    std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(), better);
    idx.resize(keep);
    return idx;
}

// One line per recommendation: rank<TAB>token<TAB>score (9 significant digits).
inline void printRanking(std::vector<int64_t> const& items, std::vector<float> const& scores,
    std::vector<std::string> const& tokens)
{
    for (size_t r = 0; r < items.size(); ++r)
    {
        int64_t const i = items[r];
        std::string const token = i >= 0 && i < static_cast<int64_t>(tokens.size()) ? tokens[i] : "?";
        std::printf("%zu\t%s\t%.9g\n", r + 1, token.c_str(), scores[r]);
    }
}

} // namespace m4r_recipe
