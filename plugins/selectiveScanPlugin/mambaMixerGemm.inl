// GEMM micro-kernel of the fused Mamba mixer, included once per instruction set (mambaMixerCpu.cpp).
// c[m, n] = sum_k a[m, k] * bt[k, n], all row-major with leading dimensions
// lda, ldb, ldc. Four rows x 16 columns of c live in eight 8-lane accumulators; columns past the last
// multiple of 16 and rows past the last multiple of 4 take the narrower loops below.
static void gemm(float const* a, int64_t lda, float const* bt, int64_t ldb, float* c, int64_t ldc, int64_t m,
    int64_t n, int64_t k)
{
    int64_t const n16 = n / 16 * 16;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4)
    {
        float const* a0 = a + i * lda;
        for (int64_t j = 0; j < n16; j += 16)
        {
            MVec acc[4][2] = {};
            for (int64_t p = 0; p < k; ++p)
            {
                MVec b0, b1;
                std::memcpy(&b0, bt + p * ldb + j, sizeof(MVec));
                std::memcpy(&b1, bt + p * ldb + j + 8, sizeof(MVec));
                for (int r = 0; r < 4; ++r)
                {
                    float const av = a0[r * lda + p];
                    acc[r][0] += av * b0;
                    acc[r][1] += av * b1;
                }
            }
            for (int r = 0; r < 4; ++r)
            {
                std::memcpy(c + (i + r) * ldc + j, &acc[r][0], sizeof(MVec));
                std::memcpy(c + (i + r) * ldc + j + 8, &acc[r][1], sizeof(MVec));
            }
        }
        for (int64_t j = n16; j < n; ++j)
        {
            for (int r = 0; r < 4; ++r)
            {
                float s = 0.0f;
                for (int64_t p = 0; p < k; ++p)
                    s += a0[r * lda + p] * bt[p * ldb + j];
                c[(i + r) * ldc + j] = s;
            }
        }
    }
    for (; i < m; ++i)
    {
        float const* a0 = a + i * lda;
        for (int64_t j = 0; j < n16; j += 16)
        {
            MVec acc0 = {}, acc1 = {};
            for (int64_t p = 0; p < k; ++p)
            {
                MVec b0, b1;
                std::memcpy(&b0, bt + p * ldb + j, sizeof(MVec));
                std::memcpy(&b1, bt + p * ldb + j + 8, sizeof(MVec));
                acc0 += a0[p] * b0;
                acc1 += a0[p] * b1;
            }
            std::memcpy(c + i * ldc + j, &acc0, sizeof(MVec));
            std::memcpy(c + i * ldc + j + 8, &acc1, sizeof(MVec));
        }
        for (int64_t j = n16; j < n; ++j)
        {
            float s = 0.0f;
            for (int64_t p = 0; p < k; ++p)
                s += a0[p] * bt[p * ldb + j];
            c[i * ldc + j] = s;
        }
    }
}

// v[i] = silu(v[i]) = v / (1 + exp(-v)) over n floats; exp by Cody-Waite range reduction and a degree-6 polynomial
// (relative error ~2e-7 on [-87, 87]; arguments are clamped there, where silu is already v or 0 in fp32).
static void siluInPlace(float* v, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
    {
        MVec x;
        std::memcpy(&x, v + i, sizeof(MVec));
        MVec a = -x;
        a = a < 87.0f ? a : 87.0f;
        a = a > -87.0f ? a : -87.0f;
        MVec const t = a * 1.44269504f + 0.5f;
        MVecI ti = __builtin_convertvector(t, MVecI); // truncation; floor below
        ti += (__builtin_convertvector(ti, MVec) > t);  // -1 where truncation rounded up
        MVec const kk = __builtin_convertvector(ti, MVec);
        MVec const rr = (a - kk * 0.693359375f) - kk * -2.12194440e-4f;
        MVec p = 1.9875691500e-4f * rr + 1.3981999507e-3f;
        p = p * rr + 8.3334519073e-3f;
        p = p * rr + 4.1665795894e-2f;
        p = p * rr + 1.6666665459e-1f;
        p = p * rr + 5.0000001201e-1f;
        p = p * rr * rr + rr + 1.0f;
        MVecI const bits = (ti + 127) << 23;
        MVec scale;
        std::memcpy(&scale, &bits, sizeof(MVec));
        MVec const e = p * scale;
        MVec const out = x / (1.0f + e);
        std::memcpy(v + i, &out, sizeof(MVec));
    }
    for (; i < n; ++i)
        v[i] = v[i] / (1.0f + std::exp(-v[i]));
}
