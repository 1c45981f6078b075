// Hot loops of the optimised CPU scan (selectiveScanCpuFast.cpp includes this file once per instruction set,
// inside a namespace, with that instruction set enabled for every function in it).
//
// A "block" is kW channels of one batch row, one channel per vector lane: the N states of the block are N
// vectors, B and C of the row are broadcast to all lanes, and the reduction over N stays within a lane, so
// every lane evaluates exactly the reference's expressions in the reference's order (selectiveScanMath.h:
// updateState, then hc += h * C over n = 0..N-1). Only exp() differs: a polynomial instead of libm expf.
// Inputs arrive transposed to [t][lane] (dt, u, g) and [t][n] (B, C) by the caller.
// Needs: Vec, kW, kDecayExpMin, M4R_SCAN_POLY_FMA(a, b, c) = a * b + c, fused or not (selectiveScanCpuFast.cpp).
// Only the exp polynomial uses it; the state update and the sums round exactly like the reference.

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
    y = y * m - 1.1514610310E-1F;
    y = y * m + 1.1676998740E-1F;
    y = y * m - 1.2420140846E-1F;
    y = y * m + 1.4249322787E-1F;
    y = y * m - 1.6668057665E-1F;
    y = y * m + 2.0000714765E-1F;
    y = y * m - 2.4999993993E-1F;
    y = y * m + 3.3333331174E-1F;
    y = y * m * z;
    y = y + ef * -2.12194440e-4F;
    y = y - z * 0.5F;
    return (m + y) + ef * 0.693359375F;
}

//! In place: x -> softplus(x) with PyTorch's threshold (x above 20 unchanged). log1p(e^x) as
//! log(1 + e) * e / ((1 + e) - 1), which keeps log1p's accuracy for tiny e (Goldberg's trick).
static void softplusInPlace(Vec* x, int32_t steps)
{
    for (int32_t t = 0; t < steps; ++t)
    {
        Vec const v = x[t];
        Vec const e = expVec(v);
        Vec const w = e + 1.F;
        Vec const dw = w - 1.F;
        Vec const lp = dw == 0.F ? e : logVec(w) * (e / (dw == 0.F ? Vec{} + 1.F : dw));
        x[t] = v > 20.F ? v : lp;
    }
}

//! In place: g -> g * softplus'(x) = g * sigmoid(x) (1 above the threshold 20).
static void softplusGradInPlace(Vec* g, Vec const* x, int32_t steps)
{
    for (int32_t t = 0; t < steps; ++t)
    {
        Vec const e = expVec(x[t]);
        Vec const sig = e / (e + 1.F);
        g[t] = x[t] > 20.F ? g[t] : g[t] * sig;
    }
}

//! Forward over one block: states h (N vectors) from zero, for t = 0..stop. hcOut gets sum_n h_t * C_t per
//! position (all of them, or only the one at `stop` when lastOnly).
static void forwardBlock(Vec const* dt, Vec const* u, Vec const* a, float const* Bt, float const* Ct, int32_t n,
    int32_t stop, bool lastOnly, Vec* h, Vec* hcOut)
{
    for (int32_t s = 0; s < n; ++s)
    {
        h[s] = Vec{};
    }
    int32_t const fullUntil = lastOnly ? stop : stop + 1; // positions whose C.h is wanted start here (last)
    for (int32_t t = 0; t < fullUntil; ++t)
    {
        Vec const d = dt[t];
        Vec const dtu = d * u[t];
        float const* bt = Bt + static_cast<std::size_t>(t) * n;
        if (lastOnly)
        {
            for (int32_t s = 0; s < n; ++s)
            {
                h[s] = expDecayVec(d * a[s]) * h[s] + dtu * bt[s];
            }
        }
        else
        {
            float const* ct = Ct + static_cast<std::size_t>(t) * n;
            Vec hc = Vec{};
            for (int32_t s = 0; s < n; ++s)
            {
                h[s] = expDecayVec(d * a[s]) * h[s] + dtu * bt[s];
                hc += h[s] * ct[s];
            }
            hcOut[t] = hc;
        }
    }
    if (lastOnly)
    {
        Vec const d = dt[stop];
        Vec const dtu = d * u[stop];
        float const* bt = Bt + static_cast<std::size_t>(stop) * n;
        float const* ct = Ct + static_cast<std::size_t>(stop) * n;
        Vec hc = Vec{};
        for (int32_t s = 0; s < n; ++s)
        {
            h[s] = expDecayVec(d * a[s]) * h[s] + dtu * bt[s];
            hc += h[s] * ct[s];
        }
        hcOut[0] = hc;
    }
}

//! Forward recomputation for the backward pass: every state H[t * n + s] and decay E[t * n + s] for
//! t = 0..stop, and hc per position (needed for the gate's gradient; only hcOut[stop] when lastOnly).
static void statesBlock(Vec const* dt, Vec const* u, Vec const* a, float const* Bt, float const* Ct, int32_t n,
    int32_t stop, bool lastOnly, Vec* H, Vec* E, Vec* hcOut)
{
    for (int32_t t = 0; t <= stop; ++t)
    {
        Vec const d = dt[t];
        Vec const dtu = d * u[t];
        float const* bt = Bt + static_cast<std::size_t>(t) * n;
        float const* ct = Ct + static_cast<std::size_t>(t) * n;
        Vec* ht = H + static_cast<std::size_t>(t) * n;
        Vec* et = E + static_cast<std::size_t>(t) * n;
        Vec const* hp = t > 0 ? ht - n : nullptr;
        if (lastOnly && t != stop && hp != nullptr)
        {
            for (int32_t s = 0; s < n; ++s)
            {
                et[s] = expDecayVec(d * a[s]);
                ht[s] = et[s] * hp[s] + dtu * bt[s];
            }
            continue;
        }
        Vec hc = Vec{};
        for (int32_t s = 0; s < n; ++s)
        {
            Vec const prev = hp != nullptr ? hp[s] : Vec{};
            et[s] = expDecayVec(d * a[s]);
            ht[s] = et[s] * prev + dtu * bt[s];
            hc += ht[s] * ct[s];
        }
        hcOut[t] = hc;
    }
}

//! Adjoint recurrence over one block, t = stop..0. g[t]: dL/d(sum_n h_t C_t) per lane. Accumulates (+=) the
//! lane-wise partial gradients dBacc/dCacc ([t][n], summed over lanes later), dAacc ([n]); writes
//! gDt[t] = dL/d dt_t and gDtu[t] = dL/d(dt_t u_t).
static void adjointBlock(Vec const* dt, Vec const* u, Vec const* a, float const* Bt, float const* Ct,
    Vec const* g, int32_t n, int32_t stop, bool lastOnly, Vec const* H, Vec const* E, Vec* G, Vec* dBacc, Vec* dCacc, Vec* dAacc, Vec* gDt,
    Vec* gDtu)
{
    for (int32_t s = 0; s < n; ++s)
    {
        G[s] = Vec{};
    }
    for (int32_t t = stop; t >= 0; --t)
    {
        Vec const d = dt[t];
        Vec const dtu = d * u[t];
        Vec const gt = g[t];
        std::size_t const off = static_cast<std::size_t>(t) * n;
        float const* bt = Bt + off;
        float const* ct = Ct + off;
        Vec const* ht = H + off;
        Vec const* et = E + off;
        Vec const* hp = t > 0 ? ht - n : nullptr;
        Vec* dBt = dBacc + off;
        Vec* dCt = dCacc + off;
        Vec sumGB = Vec{};
        Vec decay = Vec{};
        if (lastOnly && t != stop && hp != nullptr)
        {
            // No output at t (g[t] = 0): the same loop without the g[t] terms, which would add exact zeros.
            for (int32_t s = 0; s < n; ++s)
            {
                Vec const gs = G[s];
                dBt[s] += gs * dtu;
                sumGB += gs * bt[s];
                Vec const e = et[s];
                Vec const q = gs * hp[s] * e;
                dAacc[s] += q * d;
                decay += q * a[s];
                G[s] = gs * e;
            }
            gDt[t] = decay + sumGB * u[t];
            gDtu[t] = sumGB;
            continue;
        }
        for (int32_t s = 0; s < n; ++s)
        {
            Vec const gs = G[s] + gt * ct[s]; // dL/dh_t
            dCt[s] += gt * ht[s];
            dBt[s] += gs * dtu;
            sumGB += gs * bt[s];
            Vec const e = et[s];
            Vec const q = hp != nullptr ? gs * hp[s] * e : Vec{}; // dL/d(dt_t a_s)
            dAacc[s] += q * d;
            decay += q * a[s];
            G[s] = gs * e; // carried to t - 1
        }
        gDt[t] = decay + sumGB * u[t];
        gDtu[t] = sumGB;
    }
}
