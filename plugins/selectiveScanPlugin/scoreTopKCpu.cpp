// Exact top-K of user @ table^T in one pass over the table (scoreTopKCpu.h, README-ScoreTopK.md).
//
// Work items are (item range, row group) pairs; each keeps, per row, a heap of its K best (score, id) pairs with
// the worst at the root, scanning its items in ascending id order in cache-sized blocks. Because ids ascend
// within a work item, an item enters a full heap only if its score is strictly above the root's (an equal score
// has a higher id, hence is worse), so the hot loop is one vector compare per 16 scores against the row's
// threshold; excluded ids are only looked up for the rare items that pass it (and while a heap fills, when they
// enter as -inf like ONNX's masked row). Partial lists are merged in the order (score desc, id asc).
// The AVX-512 path (AVX512F/BW/VL + F16C + FMA, chosen at run time) reads fp16 tables with in-register
// conversion; the generic path is plain C++ with the same order of decisions.
#include "scoreTopKCpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <thread>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define M4R_TOPK_X86 1
#include <immintrin.h>
#endif

namespace
{
struct Entry
{
    float s;
    int64_t id;
};

// a better than b: higher score, or equal score and lower id (ONNX TopK's order).
inline bool better(Entry const& a, Entry const& b)
{
    return a.s > b.s || (a.s == b.s && a.id < b.id);
}

float halfToFloat(uint16_t h)
{
    uint32_t const sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1f)
        bits = sign | 0x7f800000u | (man << 13);
    else if (exp != 0)
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    else if (man == 0)
        bits = sign;
    else
    {
        exp = 113;
        while ((man & 0x400u) == 0)
        {
            man <<= 1;
            --exp;
        }
        bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

uint16_t floatToHalf(float f) // round to nearest even, like F16C's cvtps_ph and ONNX Runtime's Cast
{
    uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    uint16_t const sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    uint32_t const ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)
        return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (ax >= 0x477ff000u) // rounds to >= 65520: inf
        return sign | 0x7c00u;
    if (ax < 0x38800000u) // subnormal half (or zero)
    {
        float const a = std::fabs(f) * 16777216.0f; // * 2^24: the subnormal's integer mantissa
        return sign | static_cast<uint16_t>(std::nearbyint(a));
    }
    uint32_t const m = ax + 0xc8000fffu + ((ax >> 13) & 1u); // rebias exponent (-112 << 23) and round
    return sign | static_cast<uint16_t>(m >> 13);
}

float roundHalf(float f)
{
    return halfToFloat(floatToHalf(f));
}

constexpr int64_t kRangeItems = 65536; // items per work item (at most kMaxRanges ranges)
constexpr int64_t kMaxRanges = 64;
constexpr int64_t kRowGroup = 64; // rows per work item
constexpr int64_t kMaxPartial = int64_t{1} << 22; // partial entries (ranges x batch x K) before ranges shrink

struct Plan
{
    M4RScoreTopKArgs a{};
    bool half = false, simd = false;
    float const* user = nullptr; // (batch, dim) fp32
    std::vector<float> userStore;
    std::vector<std::vector<int64_t>> excl; // per row: sorted unique ids in [1, n_items)
    int64_t rangeItems = 0, ranges = 0, rowGroups = 0, blockItems = 0;
    std::vector<Entry> part;      // (range, row, K)
    std::vector<int64_t> counts;  // (range, row)
    std::atomic<int> status{0};

    bool masked(int64_t row, int64_t id) const
    {
        if (id == 0)
            return true;
        auto const& e = excl[static_cast<size_t>(row)];
        return !e.empty() && std::binary_search(e.begin(), e.end(), id);
    }

    // Offers item id with score s (already rounded for fp16) to row's heap h holding n entries.
    void offer(int64_t row, Entry* h, int64_t& n, int64_t id, float s) const
    {
        int64_t const k = a.k;
        if (n < k)
        {
            h[n++] = Entry{masked(row, id) ? -std::numeric_limits<float>::infinity() : s, id};
            std::push_heap(h, h + n, better);
            return;
        }
        if (!(s > h[0].s) || masked(row, id))
            return;
        std::pop_heap(h, h + k, better);
        h[k - 1] = Entry{s, id};
        std::push_heap(h, h + k, better);
    }

    float dotGeneric(float const* u, int64_t item) const
    {
        int64_t const d = a.dim;
        float acc = 0.0f;
        if (half)
        {
            auto const* t = static_cast<uint16_t const*>(a.table) + item * d;
            for (int64_t c = 0; c < d; ++c)
                acc += u[c] * halfToFloat(t[c]);
        }
        else
        {
            auto const* t = static_cast<float const*>(a.table) + item * d;
            for (int64_t c = 0; c < d; ++c)
                acc += u[c] * t[c];
        }
        return half ? roundHalf(acc) : acc;
    }

    void blockGeneric(int64_t r0, int64_t r1, int64_t j0, int64_t j1, Entry* heaps, int64_t* n) const
    {
        for (int64_t r = r0; r < r1; ++r)
        {
            float const* u = user + r * a.dim;
            Entry* h = heaps + (r - r0) * a.k;
            for (int64_t j = j0; j < j1; ++j)
                offer(r, h, n[r - r0], j, dotGeneric(u, j));
        }
    }

#ifdef M4R_TOPK_X86
    void blockSimd(int64_t r0, int64_t r1, int64_t j0, int64_t j1, Entry* heaps, int64_t* n) const;
#endif

    void run(size_t item)
    {
        int64_t const range = static_cast<int64_t>(item) / rowGroups, group = static_cast<int64_t>(item) % rowGroups;
        int64_t const r0 = group * kRowGroup, r1 = std::min(a.batch, r0 + kRowGroup);
        int64_t const i0 = range * rangeItems, i1 = std::min(a.n_items, i0 + rangeItems);
        Entry* heaps = part.data() + (range * a.batch + r0) * a.k;
        int64_t* n = counts.data() + range * a.batch + r0;
        for (int64_t j = i0; j < i1; j += blockItems)
        {
            int64_t const je = std::min(i1, j + blockItems);
#ifdef M4R_TOPK_X86
            if (simd)
            {
                blockSimd(r0, r1, j, je, heaps, n);
                continue;
            }
#endif
            blockGeneric(r0, r1, j, je, heaps, n);
        }
        for (int64_t r = r0; r < r1; ++r) // best first
            std::sort_heap(heaps + (r - r0) * a.k, heaps + (r - r0) * a.k + n[r - r0], better);
    }

    static void entry(void* self, size_t item)
    {
        auto* p = static_cast<Plan*>(self);
        try
        {
            p->run(item);
        }
        catch (std::bad_alloc const&)
        {
            p->status.store(2, std::memory_order_relaxed);
        }
    }
};

bool useSimd()
{
#ifdef M4R_TOPK_X86
    static bool const ok = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma")
            && std::getenv("M4R_TOPK_GENERIC") == nullptr;
    }();
    return ok;
#else
    return false;
#endif
}
} // namespace

#ifdef M4R_TOPK_X86
#define M4R_TOPK_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_ps() (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace
{
template <bool Half>
M4R_TOPK_TARGET inline __m512 load16(void const* base, int64_t off, __mmask16 m)
{
    if constexpr (Half)
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<uint16_t const*>(base) + off));
    else
        return _mm512_maskz_loadu_ps(m, static_cast<float const*>(base) + off);
}

M4R_TOPK_TARGET inline __m512 quad(__m512 a, __m512 b, __m512 c, __m512 d)
{
    __m512 const ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    __m512 const cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    return _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
}

M4R_TOPK_TARGET inline __m512 lanes(__m512 x, __m512 y)
{
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Lane q of the result = the horizontal sum of acc[q].
M4R_TOPK_TARGET inline __m512 reduce16(__m512 const* acc)
{
    __m512 const v0 = quad(acc[0], acc[1], acc[2], acc[3]), v1 = quad(acc[4], acc[5], acc[6], acc[7]);
    __m512 const v2 = quad(acc[8], acc[9], acc[10], acc[11]), v3 = quad(acc[12], acc[13], acc[14], acc[15]);
    return lanes(lanes(v0, v1), lanes(v2, v3));
}

// Lane q: dot(u, table[j + q]) for q < 16.
template <bool Half>
M4R_TOPK_TARGET inline __m512 score1x16(float const* u, void const* table, int64_t j, int64_t d)
{
    __m512 acc[16];
    for (auto& x : acc)
        x = _mm512_setzero_ps();
    int64_t const base = j * d;
    // item by item: each item's row is read front to back (one sequential stream over the table)
    for (int q = 0; q < 16; ++q)
        for (int64_t c = 0; c < d; c += 16)
        {
            __mmask16 const m = d - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (d - c)) - 1u);
            acc[q] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, u + c), load16<Half>(table, base + q * d + c, m), acc[q]);
        }
    return reduce16(acc);
}

// Lane 4 * r + q: dot(u_r, table[j + q]) for r, q < 4 (u_r = u + r * d).
template <bool Half>
M4R_TOPK_TARGET inline __m512 score4x4(float const* u, void const* table, int64_t j, int64_t d)
{
    __m512 acc[16];
    for (auto& x : acc)
        x = _mm512_setzero_ps();
    int64_t const base = j * d;
    for (int64_t c = 0; c < d; c += 16)
    {
        __mmask16 const m = d - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (d - c)) - 1u);
        __m512 t[4];
        for (int q = 0; q < 4; ++q)
            t[q] = load16<Half>(table, base + q * d + c, m);
        for (int r = 0; r < 4; ++r)
        {
            __m512 const ur = _mm512_maskz_loadu_ps(m, u + r * d + c);
            for (int q = 0; q < 4; ++q)
                acc[4 * r + q] = _mm512_fmadd_ps(ur, t[q], acc[4 * r + q]);
        }
    }
    return reduce16(acc);
}

template <bool Half>
M4R_TOPK_TARGET inline __m512 rounded(__m512 v)
{
    if constexpr (Half)
        return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    else
        return v;
}

// Lanes 4r..4r+3: row r's threshold (its heap's worst score; -inf while the heap fills).
M4R_TOPK_TARGET inline __m512 thresholds4(Entry const* h, int64_t const* nn, int64_t k)
{
    alignas(64) float t[16];
    for (int q = 0; q < 16; ++q)
        t[q] = nn[q / 4] < k ? -std::numeric_limits<float>::infinity() : h[(q / 4) * k].s;
    return _mm512_load_ps(t);
}

// Items [j, j1) copied into a zero-padded buffer of `items` rows: tails score exactly like full groups (identical
// rows must tie exactly, whatever their position).
void const* tail(Plan const& p, std::vector<unsigned char>& pad, int64_t j, int64_t j1, int64_t items)
{
    size_t const row = static_cast<size_t>(p.a.dim) * (p.half ? 2 : 4);
    pad.assign(row * static_cast<size_t>(items), 0);
    std::memcpy(pad.data(), static_cast<unsigned char const*>(p.a.table) + static_cast<size_t>(j) * row,
        row * static_cast<size_t>(j1 - j));
    return pad.data();
}

template <bool Half>
M4R_TOPK_TARGET void blockSimdT(Plan const& p, int64_t r0, int64_t r1, int64_t j0, int64_t j1, Entry* heaps, int64_t* n)
{
    int64_t const d = p.a.dim, k = p.a.k;
    void const* table = p.a.table;
    float const inf = std::numeric_limits<float>::infinity();
    alignas(64) float s[16];
    std::vector<unsigned char> pad;
    int64_t r = r0;
    // 4-row tiles x 4 items: each table vector feeds 4 rows.
    for (; r + 4 <= r1; r += 4)
    {
        float const* u = p.user + r * d;
        Entry* h = heaps + (r - r0) * k;
        int64_t* nn = n + (r - r0);
        bool filling = nn[0] < k || nn[1] < k || nn[2] < k || nn[3] < k;
        __m512 thr = thresholds4(h, nn, k);
        int64_t j = j0;
        for (; j + 4 <= j1; j += 4)
        {
            __m512 const v = rounded<Half>(score4x4<Half>(u, table, j, d));
            __mmask16 m = filling ? __mmask16(0xffff) : _mm512_cmp_ps_mask(v, thr, _CMP_GT_OQ);
            if (m == 0)
                continue;
            _mm512_store_ps(s, v);
            for (int q = 0; q < 16; ++q) // row-major lanes: each row's items stay in ascending order
                if (m & (1u << q))
                    p.offer(r + q / 4, h + (q / 4) * k, nn[q / 4], j + q % 4, s[q]);
            filling = nn[0] < k || nn[1] < k || nn[2] < k || nn[3] < k;
            thr = thresholds4(h, nn, k);
        }
        if (j < j1) // the last 1-3 items, zero-padded to 4: the same arithmetic as every other item
        {
            __m512 const v = rounded<Half>(score4x4<Half>(u, tail(p, pad, j, j1, 4), 0, d));
            _mm512_store_ps(s, v);
            for (int q = 0; q < 16; ++q)
                if (j + q % 4 < j1)
                    p.offer(r + q / 4, h + (q / 4) * k, nn[q / 4], j + q % 4, s[q]);
        }
    }
    for (; r < r1; ++r)
    {
        float const* u = p.user + r * d;
        Entry* h = heaps + (r - r0) * k;
        int64_t& nn = n[r - r0];
        __m512 thr = _mm512_set1_ps(nn < k ? -inf : h[0].s);
        int64_t j = j0;
        for (; j + 16 <= j1; j += 16)
        {
            __m512 const v = rounded<Half>(score1x16<Half>(u, table, j, d));
            __mmask16 m = nn < k ? __mmask16(0xffff) : _mm512_cmp_ps_mask(v, thr, _CMP_GT_OQ);
            if (m == 0)
                continue;
            _mm512_store_ps(s, v);
            for (int q = 0; q < 16; ++q)
                if (m & (1u << q))
                    p.offer(r, h, nn, j + q, s[q]);
            thr = _mm512_set1_ps(nn < k ? -inf : h[0].s);
        }
        if (j < j1) // the last 1-15 items, zero-padded to 16
        {
            _mm512_store_ps(s, rounded<Half>(score1x16<Half>(u, tail(p, pad, j, j1, 16), 0, d)));
            for (int q = 0; j + q < j1; ++q)
                p.offer(r, h, nn, j + q, s[q]);
        }
    }
}
} // namespace

void Plan::blockSimd(int64_t r0, int64_t r1, int64_t j0, int64_t j1, Entry* heaps, int64_t* n) const
{
    if (half)
        blockSimdT<true>(*this, r0, r1, j0, j1, heaps, n);
    else
        blockSimdT<false>(*this, r0, r1, j0, j1, heaps, n);
}
#endif

namespace
{
int prepare(Plan& p)
{
    M4RScoreTopKArgs const& a = p.a;
    if (a.batch < 0 || a.n_items < 1 || a.dim < 0 || a.k < 1 || a.k > a.n_items || a.exclude_width < 0
        || (a.batch > 0 && (a.user == nullptr || a.table == nullptr))
        || (a.exclude_width > 0 && a.batch > 0 && a.exclude == nullptr)
        || (a.dtype != M4R_TOPK_F32 && a.dtype != M4R_TOPK_F16))
        return 1;
    p.half = a.dtype == M4R_TOPK_F16;
    p.simd = useSimd();
    size_t const ud = static_cast<size_t>(a.batch * a.dim);
    if (p.half)
    {
        p.userStore.resize(ud);
        auto const* u = static_cast<uint16_t const*>(a.user);
        for (size_t i = 0; i < ud; ++i)
            p.userStore[i] = halfToFloat(u[i]);
        p.user = p.userStore.data();
    }
    else
        p.user = static_cast<float const*>(a.user);
    p.excl.resize(static_cast<size_t>(a.batch));
    for (int64_t r = 0; r < a.batch; ++r)
    {
        auto& e = p.excl[static_cast<size_t>(r)];
        for (int64_t c = 0; c < a.exclude_width; ++c)
        {
            int64_t const id = a.exclude[r * a.exclude_width + c];
            if (id >= 1 && id < a.n_items)
                e.push_back(id);
        }
        std::sort(e.begin(), e.end());
        e.erase(std::unique(e.begin(), e.end()), e.end());
    }
    int64_t ranges = std::min((a.n_items + kRangeItems - 1) / kRangeItems, kMaxRanges);
    ranges = std::max<int64_t>(1, std::min(ranges, kMaxPartial / std::max<int64_t>(1, a.batch * a.k)));
    p.rangeItems = (a.n_items + ranges - 1) / ranges;
    p.ranges = (a.n_items + p.rangeItems - 1) / p.rangeItems;
    p.rowGroups = (a.batch + kRowGroup - 1) / kRowGroup;
    int64_t const rowBytes = std::max<int64_t>(1, a.dim * (p.half ? 2 : 4));
    p.blockItems = std::max<int64_t>(64, ((int64_t{128} << 10) / rowBytes) & ~int64_t{15});
    p.part.resize(static_cast<size_t>(p.ranges * a.batch * a.k));
    p.counts.assign(static_cast<size_t>(p.ranges * a.batch), 0);
    return 0;
}

void merge(Plan const& p, float* outScores, int64_t* outItems)
{
    M4RScoreTopKArgs const& a = p.a;
    std::vector<Entry> all;
    for (int64_t r = 0; r < a.batch; ++r)
    {
        all.clear();
        for (int64_t g = 0; g < p.ranges; ++g)
        {
            Entry const* h = p.part.data() + (g * a.batch + r) * a.k;
            all.insert(all.end(), h, h + p.counts[static_cast<size_t>(g * a.batch + r)]);
        }
        std::partial_sort(all.begin(), all.begin() + a.k, all.end(), better);
        for (int64_t i = 0; i < a.k; ++i)
        {
            outScores[r * a.k + i] = all[static_cast<size_t>(i)].s;
            outItems[r * a.k + i] = all[static_cast<size_t>(i)].id;
        }
    }
}

void threadsFor(void* ctx, void (*fn)(void*, size_t), size_t count, void* arg)
{
    size_t const threads = std::min(count, static_cast<size_t>(*static_cast<int32_t*>(ctx)));
    std::atomic<size_t> next{0};
    auto worker = [&] {
        for (size_t i; (i = next.fetch_add(1)) < count;)
            fn(arg, i);
    };
    std::vector<std::thread> pool;
    for (size_t t = 1; t < threads; ++t)
        pool.emplace_back(worker);
    worker();
    for (auto& t : pool)
        t.join();
}
} // namespace

extern "C" int m4r_score_topk(M4RScoreTopKArgs const* args, float* outScores, int64_t* outItems, int32_t numThreads,
    M4RParallelFor pfor, void* pforCtx)
{
    if (args == nullptr || (args->batch > 0 && (outScores == nullptr || outItems == nullptr)))
        return 1;
    try
    {
        Plan p;
        p.a = *args;
        if (int const rc = prepare(p); rc != 0)
            return rc;
        if (p.a.batch == 0)
            return 0;
        size_t const work = static_cast<size_t>(p.ranges * p.rowGroups);
        if (pfor != nullptr)
            pfor(pforCtx, &Plan::entry, work, &p);
        else if (numThreads > 1 && work > 1)
            threadsFor(&numThreads, &Plan::entry, work, &p);
        else
            for (size_t i = 0; i < work; ++i)
                Plan::entry(&p, i);
        if (int const rc = p.status.load(); rc != 0)
            return rc;
        merge(p, outScores, outItems);
        return 0;
    }
    catch (std::bad_alloc const&)
    {
        return 2;
    }
}

extern "C" char const* m4r_score_topk_isa(void)
{
    return useSimd() ? "avx512" : "generic";
}
