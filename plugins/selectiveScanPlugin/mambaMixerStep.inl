// The streaming step's per-row math (mambaMixerStepCpu.cpp), included once per instruction set after
// mambaMixerGemm.inl. MVec/MVecI are 8-lane float/int vectors.

// One channel's state update and read-out: h' = exp(max(dt A, -80)) h + (dt u) B; returns C . h'.
static float stateStep(float const* a, float const* hIn, float* hOut, float const* b, float const* c, float dt,
    float dtu, int64_t n)
{
    int64_t s = 0;
    MVec acc = {};
    for (; s + 8 <= n; s += 8)
    {
        MVec av, hv, bv, cv;
        std::memcpy(&av, a + s, sizeof(MVec));
        std::memcpy(&hv, hIn + s, sizeof(MVec));
        std::memcpy(&bv, b + s, sizeof(MVec));
        std::memcpy(&cv, c + s, sizeof(MVec));
        MVec e = dt * av;
        e = e > -80.0f ? e : -80.0f;
        e = e < 87.0f ? e : 87.0f;
        // e^e: Cody-Waite range reduction and a degree-6 polynomial, as siluInPlace (mambaMixerGemm.inl)
        MVec const t = e * 1.44269504f + 0.5f;
        MVecI ti = __builtin_convertvector(t, MVecI);
        ti += (__builtin_convertvector(ti, MVec) > t);
        MVec const kk = __builtin_convertvector(ti, MVec);
        MVec const rr = (e - kk * 0.693359375f) - kk * -2.12194440e-4f;
        MVec p = 1.9875691500e-4f * rr + 1.3981999507e-3f;
        p = p * rr + 8.3334519073e-3f;
        p = p * rr + 4.1665795894e-2f;
        p = p * rr + 1.6666665459e-1f;
        p = p * rr + 5.0000001201e-1f;
        p = p * rr * rr + rr + 1.0f;
        MVecI const bits = (ti + 127) << 23;
        MVec scale;
        std::memcpy(&scale, &bits, sizeof(MVec));
        MVec const hn = p * scale * hv + dtu * bv;
        std::memcpy(hOut + s, &hn, sizeof(MVec));
        acc += hn * cv;
    }
    float y = 0.0f;
    for (int i = 0; i < 8; ++i)
        y += acc[i];
    for (; s < n; ++s)
    {
        float const hn = std::exp(std::max(dt * a[s], -80.0f)) * hIn[s] + dtu * b[s];
        hOut[s] = hn;
        y += hn * c[s];
    }
    return y;
}
