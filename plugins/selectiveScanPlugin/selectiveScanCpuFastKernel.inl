// Hot loops of the optimised CPU scan (selectiveScanCpuFast.cpp includes this file once per instruction set,
// inside a namespace, with that instruction set enabled for every function in it).
//
// A "block" is kLanes channels of one batch row, one channel per vector lane: the N states of the block are N
// vectors, B and C of the row are broadcast to all lanes, and the reduction over N stays within a lane.
// Needs (selectiveScanCpuFast.cpp): Vec / VecI (kLanes floats / int32), kLanes, kGroup (states updated in
// lockstep), kDecayExpMin, M4R_SCAN_FMA(a, b, c) = a * b + c (fused where the instruction set has FMA),
// M4R_SCAN_POLY_FMA(a, b, c) (the same with a scalar c), M4R_SCAN_MAX(a, b) = a > b ? a : b and
// M4R_SCAN_MIN(a, b) = a < b ? a : b (x86's maxps/minps: the second operand where either is NaN).
//
// The forward state update (forwardBlock -> updateGroup) is h = fma(2^(dt * A log2 e), h, dt u B): the decay's
// exp is a base-2 polynomial on the pre-scaled exponent (with M4R_SCAN_EXP2_TABLE, the AVX-512 build: a 16-entry
// table and a shorter polynomial) and the update one fused multiply-add where the ISA has it, so it does not
// round exactly like the reference loop (docs/native-cpu.md, "Rounding"). The backward keeps expDecayVec.

//! exp(x) for x clamped to [kDecayExpMin, 88]: Cody-Waite range reduction and Cephes' degree-6 polynomial
//! (<= 2 ulp from libm expf in that range). Written with plain vector arithmetic so it vectorises anywhere.
static inline Vec expDecayVec(Vec x)
{
    x = x < kDecayExpMin ? Vec{} + kDecayExpMin : x;
    x = x > 88.F ? Vec{} + 88.F : x;
    Vec const magic = Vec{} + 12582912.F; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    Vec const k = (x * 1.44269504088896341F + magic) - magic;
    Vec const r = (x - k * 0.693359375F) - k * -2.12194440e-4F;
    Vec p = Vec{} + 1.9875691500E-4F;
    p = M4R_SCAN_POLY_FMA(p, r, 1.3981999507E-3F);
    p = M4R_SCAN_POLY_FMA(p, r, 8.3334519073E-3F);
    p = M4R_SCAN_POLY_FMA(p, r, 4.1665795894E-2F);
    p = M4R_SCAN_POLY_FMA(p, r, 1.6666665459E-1F);
    p = M4R_SCAN_POLY_FMA(p, r, 5.0000001201E-1F);
    p = M4R_SCAN_POLY_FMA(p, r * r, r + 1.F);
    VecI const bits = (__builtin_convertvector(k, VecI) + 127) << 23;
    return p * (Vec) bits;
}

//! exp(x) on [-87, 88] (softplus and sigmoid arguments): the polynomial of expDecayVec.
static inline Vec expVec(Vec x)
{
    x = x < -87.F ? Vec{} - 87.F : x;
    x = x > 88.F ? Vec{} + 88.F : x;
    Vec const magic = Vec{} + 12582912.F;
    Vec const k = (x * 1.44269504088896341F + magic) - magic;
    Vec const r = (x - k * 0.693359375F) - k * -2.12194440e-4F;
    Vec p = Vec{} + 1.9875691500E-4F;
    p = M4R_SCAN_POLY_FMA(p, r, 1.3981999507E-3F);
    p = M4R_SCAN_POLY_FMA(p, r, 8.3334519073E-3F);
    p = M4R_SCAN_POLY_FMA(p, r, 4.1665795894E-2F);
    p = M4R_SCAN_POLY_FMA(p, r, 1.6666665459E-1F);
    p = M4R_SCAN_POLY_FMA(p, r, 5.0000001201E-1F);
    p = M4R_SCAN_POLY_FMA(p, r * r, r + 1.F);
    VecI const bits = (__builtin_convertvector(k, VecI) + 127) << 23;
    return p * (Vec) bits;
}

//! log(x) for normal x > 0: Cephes' logf (mantissa in [sqrt(1/2), sqrt(2)), degree-8 polynomial).
static inline Vec logVec(Vec x)
{
    VecI const xi = (VecI) x;
    VecI e = ((xi >> 23) & 0xFF) - 126;
    Vec m = (Vec) ((xi & 0x007FFFFF) | 0x3F000000); // in [0.5, 1)
    VecI const small = m < 0.707106781186547524F;
    Vec const adj = (Vec) (small & (VecI) m); // m where m < sqrt(1/2), else 0
    e = e + small;                            // -1 where small (mask is -1)
    m = m - 1.F + adj;
    Vec const ef = __builtin_convertvector(e, Vec);
    Vec const z = m * m;
    Vec y = Vec{} + 7.0376836292E-2F;
    y = M4R_SCAN_POLY_FMA(y, m, -1.1514610310E-1F);
    y = M4R_SCAN_POLY_FMA(y, m, 1.1676998740E-1F);
    y = M4R_SCAN_POLY_FMA(y, m, -1.2420140846E-1F);
    y = M4R_SCAN_POLY_FMA(y, m, 1.4249322787E-1F);
    y = M4R_SCAN_POLY_FMA(y, m, -1.6668057665E-1F);
    y = M4R_SCAN_POLY_FMA(y, m, 2.0000714765E-1F);
    y = M4R_SCAN_POLY_FMA(y, m, -2.4999993993E-1F);
    y = M4R_SCAN_POLY_FMA(y, m, 3.3333331174E-1F);
    y = y * m * z;
    y = y + ef * -2.12194440e-4F;
    y = y - z * 0.5F;
    return (m + y) + ef * 0.693359375F;
}

//! In place: x -> softplus(x) with PyTorch's threshold (x above 20 unchanged). log1p(e^x) as
//! log(1 + e) * e / ((1 + e) - 1), which keeps log1p's accuracy for tiny e (Goldberg's trick).
//! Four positions per iteration: each is a long dependency chain (exp, log, a division), and four independent
//! ones in one basic block keep the out-of-order core busy.
static void softplusInPlace(Vec* x, int32_t steps)
{
    auto const one = [](Vec v) {
        Vec const e = expVec(v);
        Vec const w = e + 1.F;
        Vec const dw = w - 1.F;
        Vec const lp = dw == 0.F ? e : logVec(w) * (e / (dw == 0.F ? Vec{} + 1.F : dw));
        return v > 20.F ? v : lp;
    };
    int32_t t = 0;
    for (; t + 4 <= steps; t += 4)
    {
        Vec const y0 = one(x[t]);
        Vec const y1 = one(x[t + 1]);
        Vec const y2 = one(x[t + 2]);
        Vec const y3 = one(x[t + 3]);
        x[t] = y0;
        x[t + 1] = y1;
        x[t + 2] = y2;
        x[t + 3] = y3;
    }
    for (; t < steps; ++t)
    {
        x[t] = one(x[t]);
    }
}


// ---- forward: exp2 decay, FMA state update, kGroup states in lockstep ----------------------------------------

constexpr float kLog2e = 1.44269504088896341F;
constexpr float kDecayExp2Min = kDecayExpMin * kLog2e; //!< the -80 clamp, in log2 units
constexpr float kDecayExp2Max = 88.F * kLog2e;         //!< keeps 2^k finite (k <= 127), as expDecayVec's 88

//! Minimax polynomial of 2^r on [-1/2, 1/2] (degree 6, relative error 2.0e-9 before fp32 rounding).
constexpr float kExp2C1 = 0.6931471824645996F;
constexpr float kExp2C2 = 0.24022647738456726F;
constexpr float kExp2C3 = 0.055503323674201965F;
constexpr float kExp2C4 = 0.00961843691766262F;
constexpr float kExp2C5 = 0.0013398875016719103F;
constexpr float kExp2C6 = 0.00015353361959569156F;

//! G states s = 0..G-1 of one position: h[s] = fma(2^clamp(d * a2[s]), h[s], dtu * b[s]); with kReadOut,
//! hc[s] += h[s] * c[s]. Each step of the exp is applied to all G states before the next, so G independent
//! dependency chains are in flight (the chain of one exp is ~12 dependent instructions). 2^x: x = k + r with
//! k = round(x) (the 1.5 * 2^23 trick leaves k in the low bits of x + magic), 2^r by the polynomial, and 2^k
//! added to the exponent bits (k in [-116, 127] after the clamp, so the result stays a normal float).
#if defined(M4R_SCAN_EXP2_TABLE)
//! 16-lane variant: 2^x = 2^(k / 16) with k = round(16 x): 2^(k mod 16 / 16) from a 16-entry table (one vector
//! permute), 2^(floor(k / 16)) added to the exponent bits, 2^(r / 16) for |r| <= 1/2 by a degree-3 Taylor
//! polynomial (relative error <= 9.5e-9). a2 = A * 16 log2(e) here (kDecayScale).
constexpr float kDecayScale = 16.F * kLog2e;
template <int G, bool kReadOut, bool kHigh>
static inline void updateGroup(Vec d, Vec dtu, Vec const* a2, float const* b, float const* c, Vec* h, Vec* hc)
{
    Vec const magic = Vec{} + 12582912.F; // 1.5 * 2^23
    Vec const table = {1.F, 1.0442737824274138F, 1.0905077326652577F, 1.1387886347566916F, 1.189207115002721F,
        1.2418578120734840F, 1.2968395546510096F, 1.3542555469368927F, 1.4142135623730951F, 1.4768261459394993F,
        1.5422108254079407F, 1.6104903319492543F, 1.6817928305074290F, 1.7562521603732995F, 1.8340080864093424F,
        1.9152065613971474F};
    constexpr float c1 = 0.04332169878499658F;   // ln2 / 16
    constexpr float c2 = 9.383847019793e-4F;     // (ln2 / 16)^2 / 2
    constexpr float c3 = 1.3550924043e-5F;       // (ln2 / 16)^3 / 6
    Vec x[G];
    Vec rt[G];
    Vec p[G];
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j)
    {
        x[j] = d * a2[j];
        x[j] = M4R_SCAN_MAX(Vec{} + kDecayExp2Min * 16.F, x[j]);
        if (kHigh) // the upper clamp; not needed when every dt >= 0 and A <= 0 (x <= 0)
        {
            x[j] = M4R_SCAN_MIN(Vec{} + kDecayExp2Max * 16.F, x[j]);
        }
        rt[j] = x[j] + magic;
    }
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j)
    {
        x[j] = x[j] - (rt[j] - magic);
        p[j] = M4R_SCAN_POLY_FMA(Vec{} + c3, x[j], c2);
    }
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j)
    {
        p[j] = M4R_SCAN_POLY_FMA(p[j], x[j], c1);
    }
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j)
    {
        p[j] = p[j] * x[j];
        Vec const t = (Vec) _mm512_mask_permutexvar_ps((__m512) table, (__mmask16) -1, (__m512i) rt[j], (__m512) table);
        p[j] = M4R_SCAN_FMA(t, p[j], t);
    }
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j)
    {
        Vec const e = (Vec) ((VecI) p[j] + (((VecI) rt[j] >> 4) << 23));
        h[j] = M4R_SCAN_FMA(e, h[j], dtu * b[j]);
        if (kReadOut)
        {
            hc[j] = M4R_SCAN_FMA(h[j], Vec{} + c[j], hc[j]);
        }
    }
}
#else
constexpr float kDecayScale = kLog2e;
template <int G, bool kReadOut, bool kHigh>
static inline void updateGroup(Vec d, Vec dtu, Vec const* a2, float const* b, float const* c, Vec* h, Vec* hc)
{
    Vec const magic = Vec{} + 12582912.F; // 1.5 * 2^23
    Vec x[G];
    Vec rt[G];
    Vec p[G];
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j)
    {
        x[j] = d * a2[j];
        x[j] = M4R_SCAN_MAX(Vec{} + kDecayExp2Min, x[j]); // x < min ? min : x (NaN stays NaN)
        if (kHigh) // x > max ? max : x; not needed when every dt >= 0 and A <= 0 (x <= 0)
        {
            x[j] = M4R_SCAN_MIN(Vec{} + kDecayExp2Max, x[j]);
        }
        rt[j] = x[j] + magic;
    }
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j)
    {
        x[j] = x[j] - (rt[j] - magic); // r in [-1/2, 1/2], exact
        p[j] = M4R_SCAN_POLY_FMA(Vec{} + kExp2C6, x[j], kExp2C5);
    }
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j)
    {
        p[j] = M4R_SCAN_POLY_FMA(p[j], x[j], kExp2C4);
    }
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j)
    {
        p[j] = M4R_SCAN_POLY_FMA(p[j], x[j], kExp2C3);
    }
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j)
    {
        p[j] = M4R_SCAN_POLY_FMA(p[j], x[j], kExp2C2);
    }
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j)
    {
        p[j] = M4R_SCAN_POLY_FMA(p[j], x[j], kExp2C1);
    }
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j)
    {
        p[j] = M4R_SCAN_POLY_FMA(p[j], x[j], 1.F);
    }
#pragma GCC unroll 16
    for (int j = 0; j < G; ++j)
    {
        Vec const e = (Vec) ((VecI) p[j] + ((VecI) rt[j] << 23));
        h[j] = M4R_SCAN_FMA(e, h[j], dtu * b[j]);
        if (kReadOut)
        {
            hc[j] = M4R_SCAN_FMA(h[j], Vec{} + c[j], hc[j]);
        }
    }
}
#endif

//! One position of a block: all n states, and sum_s h * C into *hcOut when kReadOut.
template <bool kReadOut, bool kHigh>
static inline void updateStates(
    Vec d, Vec dtu, Vec const* a2, float const* b, float const* c, int32_t n, Vec* h, Vec* hcOut)
{
    Vec hc[kGroup] = {};
    int32_t s = 0;
    for (; s + kGroup <= n; s += kGroup)
    {
        updateGroup<kGroup, kReadOut, kHigh>(d, dtu, a2 + s, b + s, kReadOut ? c + s : nullptr, h + s, hc);
    }
    for (; s < n; ++s)
    {
        updateGroup<1, kReadOut, kHigh>(d, dtu, a2 + s, b + s, kReadOut ? c + s : nullptr, h + s, hc);
    }
    if (kReadOut)
    {
#pragma GCC unroll 16
        for (int w = kGroup / 2; w > 0; w /= 2) // pairwise sum of the kGroup partial sums
        {
#pragma GCC unroll 16
            for (int j = 0; j < w; ++j)
            {
                hc[j] += hc[j + w];
            }
        }
        *hcOut = hc[0];
    }
}

//! Forward over one block for `count` positions (at most a time tile), states h (n vectors) carried in and out.
//! dt[i], u[i] are position i; a2 = A * kDecayScale per lane. B and C of position i are Bt[i * ldbc + s],
//! Ct[i * ldbc + s]. hcOut[i] gets sum_s h * C at position i (every position, or when lastOnly only `stop`, into
//! hcOut[0]).
template <bool kHigh>
static void forwardBlock(Vec const* dt, Vec const* u, Vec const* a2, float const* Bt, float const* Ct, int64_t ldbc,
    int32_t n, int32_t count, int32_t stop, bool lastOnly, Vec* h, Vec* hcOut)
{
    for (int32_t t = 0; t < count; ++t)
    {
        Vec const d = dt[t];
        Vec const dtu = d * u[t];
        float const* bt = Bt + t * ldbc;
        float const* ct = Ct + t * ldbc;
        if (!lastOnly)
        {
            updateStates<true, kHigh>(d, dtu, a2, bt, ct, n, h, hcOut + t);
        }
        else if (t == stop)
        {
            updateStates<true, kHigh>(d, dtu, a2, bt, ct, n, h, hcOut);
        }
        else
        {
            updateStates<false, kHigh>(d, dtu, a2, bt, ct, n, h, nullptr);
        }
    }
}

//! lanes values of (t, c0 + l), l < lanes, from a strided view into a vector (zero past `lanes`).
static inline Vec loadLanes(float const* p, int64_t stride, int32_t lanes)
{
    Vec v = Vec{};
    if (lanes == kLanes && stride == 1)
    {
        std::memcpy(&v, p, sizeof(Vec));
        return v;
    }
    for (int32_t l = 0; l < lanes; ++l)
    {
        v[l] = p[l * stride];
    }
    return v;
}

static inline void storeLanes(float* p, int64_t stride, int32_t lanes, Vec v)
{
    if (lanes == kLanes && stride == 1)
    {
        std::memcpy(p, &v, sizeof(Vec));
        return;
    }
    for (int32_t l = 0; l < lanes; ++l)
    {
        p[l * stride] = v[l];
    }
}

//! The forward's workspace (rowWorkspaceFloats floats, 64-byte aligned here): one time tile of dt, u and sum_s h C
//! per block, then per channel block n vectors of A * kDecayScale and n of states h, then a flag per block.
struct RowWork
{
    int32_t tile, blocks;
    Vec* dt;
    Vec* u;
    Vec* hc;
    Vec* a2; // (blocks, n)
    Vec* h;  // (blocks, n)
    bool* nonPositiveA; // per block: every A <= 0 (then dt * A <= 0 after softplus, no upper clamp needed)
};

static RowWork rowWork(m4r::scan::ScanRow const& p, float* workspace)
{
    RowWork w{};
    w.tile = std::min(p.steps, m4r::scan::kTimeTile);
    w.blocks = (p.dim + kLanes - 1) / kLanes;
    auto const addr = reinterpret_cast<std::uintptr_t>(workspace);
    w.dt = reinterpret_cast<Vec*>((addr + 63) & ~std::uintptr_t{63});
    w.u = w.dt + w.tile;
    w.hc = w.u + w.tile;
    w.a2 = w.hc + w.tile;
    w.h = w.a2 + static_cast<std::size_t>(w.blocks) * p.n;
    w.nonPositiveA = reinterpret_cast<bool*>(w.h + static_cast<std::size_t>(w.blocks) * p.n);
    return w;
}

//! Starts a row (m4r::scan::forwardRowInit): a2 = A * kDecayScale, h = 0 and the flags, from p.A, dim and n.
static void startRow(m4r::scan::ScanRow const& p, float* workspace)
{
    RowWork const w = rowWork(p, workspace);
    for (int32_t k = 0; k < w.blocks; ++k)
    {
        int32_t const c0 = k * kLanes;
        int32_t const lanes = std::min(kLanes, p.dim - c0);
        bool nonPositive = true;
        for (int32_t s = 0; s < p.n; ++s)
        {
            w.a2[k * p.n + s] = loadLanes(p.A + static_cast<int64_t>(c0) * p.n + s, p.n, lanes) * kDecayScale;
            w.h[k * p.n + s] = Vec{};
            for (int32_t l = 0; l < kLanes; ++l)
            {
                nonPositive = nonPositive && w.a2[k * p.n + s][l] <= 0.F; // false for NaN
            }
        }
        w.nonPositiveA[k] = nonPositive;
    }
}

//! One block over positions [a, b) of a piece that starts at t0 (the views point at position t0): the block's
//! states advance, and its outputs (every position, or with lastOnly the last one, steps - 1) are stored.
static void advanceBlock(m4r::scan::ScanRow const& p, RowWork const& w, int32_t k, int32_t t0, int32_t a, int32_t b)
{
    int32_t const c0 = k * kLanes;
    int32_t const lanes = std::min(kLanes, p.dim - c0);
    int64_t const i0 = a - t0; // the views' index of position a
    Vec const bias = p.bias != nullptr ? loadLanes(p.bias + c0, 1, lanes) : Vec{};
    for (int64_t i = 0; i < b - a; ++i)
    {
        w.dt[i] = loadLanes(p.delta + (i0 + i) * p.dT + c0 * p.dC, p.dC, lanes) + bias;
        w.u[i] = loadLanes(p.u + (i0 + i) * p.uT + c0 * p.uC, p.uC, lanes);
    }
    if (p.softplus)
    {
        softplusInPlace(w.dt, b - a);
    }
    float const* Bt = p.B + i0 * p.bcT;
    float const* Ct = p.C + i0 * p.bcT;
    int32_t const stop = p.steps - 1 - a; // the last position, relative to a (outside [0, b - a): not here)
    Vec* const h = w.h + k * p.n;
    if (p.softplus && w.nonPositiveA[k]) // dt = softplus(.) >= 0, A <= 0: dt * A <= 0
    {
        forwardBlock<false>(w.dt, w.u, w.a2 + k * p.n, Bt, Ct, p.bcT, p.n, b - a, stop, p.lastOnly, h, w.hc);
    }
    else
    {
        forwardBlock<true>(w.dt, w.u, w.a2 + k * p.n, Bt, Ct, p.bcT, p.n, b - a, stop, p.lastOnly, h, w.hc);
    }
    Vec const dSkip = p.D != nullptr ? loadLanes(p.D + c0, 1, lanes) : Vec{};
    for (int32_t t = p.lastOnly ? std::max(0, stop) : 0; t < b - a; ++t)
    {
        Vec y = w.hc[p.lastOnly ? 0 : t] + dSkip * w.u[t]; // skipOutput, as selectiveScanMath.h
        if (p.z != nullptr)
        {
            Vec const zv = loadLanes(p.z + (i0 + t) * p.zT + c0 * p.zC, p.zC, lanes);
            y = y * (zv / (1.F + expVec(-zv))); // gate: y * silu(z)
        }
        storeLanes(p.y + (p.lastOnly ? 0 : (i0 + t) * p.yT) + c0 * p.yC, p.yC, lanes, y);
    }
}

//! Advances a started row over positions [t0, t1) (m4r::scan::forwardRowAdvance; the views point at position
//! t0), in time tiles of kTimeTile positions with every block's states kept across tiles: the tile's B and C
//! (and the states) stay in L1 while all blocks use them, instead of each block streaming the whole row's B.
static void advanceRow(m4r::scan::ScanRow const& p, int32_t t0, int32_t t1, float* workspace)
{
    RowWork const w = rowWork(p, workspace);
    for (int32_t a = t0; a < t1; a += w.tile)
    {
        int32_t const b = std::min(t1, a + w.tile);
        for (int32_t k = 0; k < w.blocks; ++k)
        {
            advanceBlock(p, w, k, t0, a, b);
        }
    }
}

//! One row on strided fp32 views (m4r::scan::ScanRow, selectiveScanCpuRow.h), channel blocks of kLanes: start,
//! then advance over every position. workspace: rowWorkspaceFloats(steps, n, dim) floats.
static void forwardRow(m4r::scan::ScanRow const& p, float* workspace)
{
    startRow(p, workspace);
    advanceRow(p, 0, p.steps, workspace);
}
