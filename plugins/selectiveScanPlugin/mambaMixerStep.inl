// The streaming step's per-row math (mambaMixerStepCpu.cpp), included once per instruction set after
// mambaMixerGemm.inl. MVec/MVecI are 8-lane float/int vectors.

// One channel's state update and read-out: h' = exp(max(dt A, -80)) h + (dt u) B; returns C . h'.
// The exp is the scan kernel's 8-lane one (selectiveScanCpuFastKernel.inl, updateGroup): 2^(dt log2(e) A) with
// k = round(x) from the 1.5 * 2^23 trick, a degree-6 minimax polynomial of 2^r on [-1/2, 1/2] and k added to
// the exponent bits; the update is h' = e h + (dt u) B with the compiler free to fuse it (FMA where the ISA has
// it). Four vectors (32 states) per iteration, so that four exp chains are in flight.
// In place (no vector return values: the baseline build has no AVX registers to return them in).
__attribute__((always_inline)) static inline void stepDecay(MVec& x)
{
    MVec const lo = MVec{} - 80.0f * 1.44269504088896341f; // the -80 clamp, in log2 units
    MVec const hi = MVec{} + 88.0f * 1.44269504088896341f;
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    MVec const rt = x + 12582912.0f; // 1.5 * 2^23
    MVec const r = x - (rt - 12582912.0f);
    MVec p = 1.5353361959569156e-4f * r + 1.3398875016719103e-3f;
    p = p * r + 9.61843691766262e-3f;
    p = p * r + 5.5503323674201965e-2f;
    p = p * r + 2.4022647738456726e-1f;
    p = p * r + 6.931471824645996e-1f;
    p = p * r + 1.0f;
    x = (MVec) ((MVecI) p + ((MVecI) rt << 23));
}

static float stateStep(float const* a, float const* hIn, float* hOut, float const* b, float const* c, float dt,
    float dtu, int64_t n)
{
    float const d2 = dt * 1.44269504088896341f; // dt * log2(e)
    int64_t s = 0;
    MVec acc[4] = {};
    for (; s + 32 <= n; s += 32)
    {
        MVec e[4];
        for (int q = 0; q < 4; ++q)
        {
            MVec av;
            std::memcpy(&av, a + s + 8 * q, sizeof(MVec));
            e[q] = d2 * av;
            stepDecay(e[q]);
        }
        for (int q = 0; q < 4; ++q)
        {
            MVec hv, bv, cv;
            std::memcpy(&hv, hIn + s + 8 * q, sizeof(MVec));
            std::memcpy(&bv, b + s + 8 * q, sizeof(MVec));
            std::memcpy(&cv, c + s + 8 * q, sizeof(MVec));
            MVec const hn = e[q] * hv + dtu * bv;
            std::memcpy(hOut + s + 8 * q, &hn, sizeof(MVec));
            acc[q] += hn * cv;
        }
    }
    for (; s + 8 <= n; s += 8)
    {
        MVec av, hv, bv, cv;
        std::memcpy(&av, a + s, sizeof(MVec));
        std::memcpy(&hv, hIn + s, sizeof(MVec));
        std::memcpy(&bv, b + s, sizeof(MVec));
        std::memcpy(&cv, c + s, sizeof(MVec));
        MVec e = d2 * av;
        stepDecay(e);
        MVec const hn = e * hv + dtu * bv;
        std::memcpy(hOut + s, &hn, sizeof(MVec));
        acc[0] += hn * cv;
    }
    MVec const sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    float y = 0.0f;
    for (int i = 0; i < 8; ++i)
        y += sum[i];
    for (; s < n; ++s)
    {
        float const hn = std::exp(std::max(dt * a[s], -80.0f)) * hIn[s] + dtu * b[s];
        hOut[s] = hn;
        y += hn * c[s];
    }
    return y;
}

// log(x) for normal x > 0, 8 lanes: Cephes' logf (mantissa in [sqrt(1/2), sqrt(2)), degree-8 polynomial), as the
// scan kernel's logVec.
__attribute__((always_inline)) static inline void stepLog(MVec& x)
{
    MVecI const xi = (MVecI) x;
    MVecI e = ((xi >> 23) & 0xFF) - 126;
    MVec m = (MVec) ((xi & 0x007FFFFF) | 0x3F000000);
    MVecI const small = m < 0.707106781186547524f;
    MVec const adj = (MVec) (small & (MVecI) m);
    e = e + small;
    m = m - 1.0f + adj;
    MVec const ef = __builtin_convertvector(e, MVec);
    MVec const z = m * m;
    MVec y = 7.0376836292e-2f * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y = y + ef * -2.12194440e-4f;
    y = y - z * 0.5f;
    x = (m + y) + ef * 0.693359375f;
}

// In place: v[i] = softplus(v[i] + bias[i]) with PyTorch's threshold 20, over n floats. log1p(e^x) as
// log(1 + e) * e / ((1 + e) - 1) (Goldberg), e^x by stepDecay's polynomial on x log2(e).
static void softplusBiasInPlace(float* v, float const* bias, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
    {
        MVec x, bv;
        std::memcpy(&x, v + i, sizeof(MVec));
        std::memcpy(&bv, bias + i, sizeof(MVec));
        x = x + bv;
        MVec e = x * 1.44269504088896341f; // e^x, clamped at e^-80 like the decay (softplus(x) = e^x down there)
        stepDecay(e);
        MVec const w = e + 1.0f;
        MVec const dw = w - 1.0f;
        MVec lw = w;
        stepLog(lw);
        MVec const lp = dw == 0.0f ? e : lw * (e / (dw == 0.0f ? MVec{} + 1.0f : dw));
        MVec const out = x > 20.0f ? x : lp;
        std::memcpy(v + i, &out, sizeof(MVec));
    }
    for (; i < n; ++i)
    {
        float const x = v[i] + bias[i];
        v[i] = x > 20.0f ? x : std::log1p(std::exp(x));
    }
}
