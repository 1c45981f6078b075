// m4r_score_topk (scoreTopKCpu.h) against a plain reference: full score rows, item 0 and exclude ids -inf,
// stable sort on (score desc, id asc), first K. Data are multiples of 1/64 (|v| <= 3) so that every fp32 sum is exact in
// any order (the kernel's and the reference's agree bit for bit); fp16 cases round scores to fp16 (planting
// ties by rounding: sums need up to 22 significant bits) with an independent rounding routine. Covers ties across work items, exclude lists with
// duplicates / 0 / out-of-range ids, rows with fewer rankable items than K (-inf tail), batch 1/3/6/256,
// n_items not a multiple of the block or range, dims below/above/not a multiple of 16, 1 and 2 threads.
// Run twice by ctest: the run-time chosen path and M4R_TOPK_GENERIC=1.
#include "scoreTopKCpu.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

namespace
{
uint16_t toHalfBits(float f) // exact for the values used here (representable in fp16 by construction)
{
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint16_t const sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    if ((x & 0x7fffffffu) == 0)
        return sign;
    int const e = static_cast<int>((x >> 23) & 0xff) - 127;
    uint32_t const man = x & 0x7fffffu;
    if (e < -14) // subnormal: not produced by this test's data (multiples of 1/64)
        return sign;
    return static_cast<uint16_t>(sign | ((e + 15) << 10) | (man >> 13));
}

double roundToHalf(double x) // nearest fp16 value, ties to even (via nearbyint's default mode)
{
    if (x == 0 || !std::isfinite(x))
        return x;
    int e = static_cast<int>(std::floor(std::log2(std::fabs(x))));
    e = std::max(e, -14);
    double const ulp = std::ldexp(1.0, e - 10);
    return std::nearbyint(x / ulp) * ulp;
}

struct Case
{
    int64_t batch, n, dim, k, width;
    bool half;
    int threads;
};

int runCase(Case const& c, unsigned seed)
{
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> q(-192, 192); // value = q / 64: exact in fp16; every fp32 sum exact
    int const distinct = 7;                         // items repeat 7 base rows: ties everywhere
    std::vector<float> base(static_cast<size_t>(distinct * c.dim)), table(static_cast<size_t>(c.n * c.dim)),
        user(static_cast<size_t>(c.batch * c.dim));
    for (auto& v : base)
        v = q(rng) / 64.0f;
    for (int64_t i = 0; i < c.n; ++i)
        for (int64_t j = 0; j < c.dim; ++j)
            table[i * c.dim + j] = i % 13 == 5 ? q(rng) / 64.0f : base[(i % distinct) * c.dim + j];
    for (auto& v : user)
        v = q(rng) / 64.0f;
    std::vector<int64_t> ex(static_cast<size_t>(c.batch * c.width));
    std::uniform_int_distribution<int64_t> id(-3, c.n + 3);
    for (auto& v : ex)
        v = id(rng);
    if (c.batch > 1 && c.width > 0)
        std::fill(ex.begin() + c.width, ex.begin() + 2 * c.width, 0); // row 1: nothing excluded
    if (c.batch > 2 && c.width >= 4)
    {
        ex[2 * c.width] = ex[2 * c.width + 1] = 3; // duplicates
        ex[2 * c.width + 2] = 0;
        ex[2 * c.width + 3] = c.n; // out of range
    }
    // last row: all items excluded but up to 2 -> fewer rankable items than K when K > 2
    std::vector<int64_t> wide;
    int64_t const w = (c.batch > 0 && c.k > 2) ? c.n : c.width;
    std::vector<int64_t> exAll(static_cast<size_t>(c.batch * w), 0);
    for (int64_t r = 0; r < c.batch; ++r)
        std::copy(ex.begin() + r * c.width, ex.begin() + (r + 1) * c.width, exAll.begin() + r * w);
    if (w == c.n && c.batch > 0)
        for (int64_t i = 0; i < c.n; ++i)
            exAll[(c.batch - 1) * w + i] = (i == 4 || i == c.n - 2) ? -1 : i;

    std::vector<uint16_t> tableH, userH;
    if (c.half)
    {
        for (float v : table)
            tableH.push_back(toHalfBits(v));
        for (float v : user)
            userH.push_back(toHalfBits(v));
    }
    M4RScoreTopKArgs a{};
    a.user = c.half ? static_cast<void const*>(userH.data()) : user.data();
    a.table = c.half ? static_cast<void const*>(tableH.data()) : table.data();
    a.dtype = c.half ? M4R_TOPK_F16 : M4R_TOPK_F32;
    a.batch = c.batch;
    a.n_items = c.n;
    a.dim = c.dim;
    a.exclude = exAll.data();
    a.exclude_width = w;
    a.k = c.k;
    std::vector<float> scores(static_cast<size_t>(c.batch * c.k));
    std::vector<int64_t> items(static_cast<size_t>(c.batch * c.k));
    if (int rc = m4r_score_topk(&a, scores.data(), items.data(), c.threads, nullptr, nullptr); rc != 0)
    {
        std::printf("FAIL: m4r_score_topk returned %d\n", rc);
        return 1;
    }
    float const ninf = -std::numeric_limits<float>::infinity();
    std::vector<double> s(static_cast<size_t>(c.n));
    std::vector<int64_t> order(static_cast<size_t>(c.n));
    for (int64_t r = 0; r < c.batch; ++r)
    {
        for (int64_t i = 0; i < c.n; ++i)
        {
            double acc = 0;
            for (int64_t j = 0; j < c.dim; ++j)
                acc += static_cast<double>(user[r * c.dim + j]) * table[i * c.dim + j];
            s[i] = c.half ? roundToHalf(acc) : acc;
        }
        s[0] = ninf;
        for (int64_t j = 0; j < w; ++j)
        {
            int64_t const v = exAll[r * w + j];
            if (v >= 1 && v < c.n)
                s[v] = ninf;
        }
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return s[x] > s[y]; });
        for (int64_t i = 0; i < c.k; ++i)
        {
            int64_t const want = order[i], got = items[r * c.k + i];
            float const gotS = scores[r * c.k + i], wantS = static_cast<float>(s[want]);
            if (got != want || !(gotS == wantS))
            {
                std::printf("FAIL: batch=%lld n=%lld dim=%lld k=%lld half=%d threads=%d row %lld rank %lld: got item "
                            "%lld score %g, want item %lld score %g\n",
                    (long long) c.batch, (long long) c.n, (long long) c.dim, (long long) c.k, c.half ? 1 : 0, c.threads,
                    (long long) r, (long long) i, (long long) got, gotS, (long long) want, wantS);
                return 1;
            }
        }
    }
    return 0;
}
// Random (inexact) floats, every item a copy of one of 7 base rows: copies must tie exactly whatever their
// position (vector groups, zero-padded tails, 4-row tiles), so row r's top K are the lowest ids of its best base.
int runTieCase(int64_t batch, int64_t n, int64_t dim, int64_t k, bool half, int threads)
{
    std::mt19937 rng(99);
    std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
    std::vector<float> base(static_cast<size_t>(7 * dim)), user(static_cast<size_t>(batch * dim));
    for (auto& v : base)
        v = uni(rng);
    for (auto& v : user)
        v = uni(rng);
    std::vector<float> table(static_cast<size_t>(n * dim));
    for (int64_t i = 0; i < n; ++i)
        std::copy(base.begin() + (i % 7) * dim, base.begin() + (i % 7 + 1) * dim, table.begin() + i * dim);
    std::vector<uint16_t> th, uh;
    if (half) // fp16 bits of values rounded to fp16 (any rounding: copies stay identical)
    {
        for (float& v : table)
        {
            v = static_cast<float>(roundToHalf(v));
            th.push_back(toHalfBits(v));
        }
        for (float& v : user)
        {
            v = static_cast<float>(roundToHalf(v));
            uh.push_back(toHalfBits(v));
        }
    }
    M4RScoreTopKArgs a{};
    a.user = half ? static_cast<void const*>(uh.data()) : user.data();
    a.table = half ? static_cast<void const*>(th.data()) : table.data();
    a.dtype = half ? M4R_TOPK_F16 : M4R_TOPK_F32;
    a.batch = batch;
    a.n_items = n;
    a.dim = dim;
    a.k = k;
    std::vector<float> scores(static_cast<size_t>(batch * k));
    std::vector<int64_t> items(static_cast<size_t>(batch * k));
    if (m4r_score_topk(&a, scores.data(), items.data(), threads, nullptr, nullptr) != 0)
        return 1;
    for (int64_t r = 0; r < batch; ++r)
    {
        int best = 0;
        double bestScore = -1e30;
        for (int b = 0; b < 7; ++b)
        {
            double acc = 0;
            for (int64_t c = 0; c < dim; ++c)
                acc += static_cast<double>(user[r * dim + c]) * base[b * dim + c];
            if (acc > bestScore)
                bestScore = acc, best = b;
        }
        int64_t want = best == 0 ? 7 : best; // item 0 is padding
        for (int64_t i = 0; i < k; ++i, want += 7)
            if (items[r * k + i] != want)
            {
                std::printf("FAIL: tie case batch=%lld dim=%lld half=%d row %lld rank %lld: got item %lld, want %lld\n",
                    (long long) batch, (long long) dim, half ? 1 : 0, (long long) r, (long long) i,
                    (long long) items[r * k + i], (long long) want);
                return 1;
            }
    }
    return 0;
}
} // namespace

int main()
{
    std::printf("score_topk path: %s\n", m4r_score_topk_isa());
    Case const cases[] = {
        {1, 1037, 24, 10, 6, false, 1},
        {1, 1037, 24, 10, 6, true, 1},
        {3, 70013, 5, 20, 8, false, 2}, // two ranges (65536 items each): partial lists merged
        {3, 70013, 5, 20, 8, true, 1},
        {6, 2001, 64, 7, 5, true, 2},  // one 4-row tile + 2 single rows
        {6, 2001, 33, 7, 5, false, 1},
        {256, 1501, 16, 12, 9, false, 2}, // 4 row groups
        {256, 1501, 17, 12, 9, true, 1},
        {2, 9, 3, 8, 4, false, 1},  // K close to n_items: -inf tail from the last row
        {1, 50, 1, 1, 0, true, 2},  // no exclude input
        {4, 300, 20, 300, 3, false, 2}, // K = n_items
    };
    int failures = 0, i = 0;
    for (Case const& c : cases)
        failures += runCase(c, 1234u + static_cast<unsigned>(i++));
    for (bool half : {false, true})
    {
        failures += runTieCase(1, 1013, 37, 40, half, 1);
        failures += runTieCase(6, 1013, 37, 40, half, 2);
        failures += runTieCase(5, 70001, 19, 30, half, 2);
        // 21 items: ids 16-20 are a tail group (1x16 path, batch 3) / id 20 (4x4 path, batch 8) and tie
        // with copies scored in full groups; a copy scored with other arithmetic would move ahead of them
        failures += runTieCase(3, 21, 37, 2, half, 1);
        failures += runTieCase(8, 21, 37, 2, half, 1);
    }
    // bad arguments are refused
    M4RScoreTopKArgs bad{};
    bad.n_items = 5;
    bad.k = 6;
    float s;
    int64_t it;
    if (m4r_score_topk(&bad, &s, &it, 1, nullptr, nullptr) != 1)
    {
        std::printf("FAIL: k > n_items accepted\n");
        ++failures;
    }
    std::printf(failures ? "score_topk: %d case(s) FAILED\n" : "score_topk: all cases match the reference\n", failures);
    return failures ? 1 : 0;
}
