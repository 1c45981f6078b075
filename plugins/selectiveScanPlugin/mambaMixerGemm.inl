// GEMM micro-kernel of the fused Mamba mixer, included once per instruction set (mambaMixerCpu.cpp: baseline,
// AVX2, AVX-512; mambaMixerStepCpu.cpp: baseline, AVX2). c[m, n] = sum_k a[m, k] * bt[k, n], all row-major with
// leading dimensions lda, ldb, ldc. Four rows x two vectors of columns (16 with 8-lane MVec, 32 with 16-lane)
// live in eight accumulators (one row for the last m % 4 rows). The last n % (2 lanes) columns go through the
// same kernel on a zero-padded copy of those columns of bt (x_proj has dt_rank + 2 d_state columns, e.g. 68),
// so no column takes a scalar loop; with one vector of columns when they fit in one (x_proj's 4 extra columns
// cost a quarter of a full tile instead of half). A column's sum is the same sequence of operations whatever
// the tile's width, so the result does not depend on it.

constexpr int64_t kML = static_cast<int64_t>(sizeof(MVec) / sizeof(float)); //!< lanes per vector (8 or 16)
constexpr int64_t kTW = 2 * kML;                                                //!< columns per tile

//! c[rows < 4, V vectors of columns] from a (rows, k) and a (V kML)-column panel of bt; cols <= V kML of them are
//! stored.
template <int R, int V = 2>
static inline void gemmTile(float const* a, int64_t lda, float const* bt, int64_t ldb, float* c, int64_t ldc,
    int64_t k, int64_t cols)
{
    MVec acc[R][V] = {};
    int64_t p = 0;
    if (R == 1) // one row: four partial sums, so that the k loop is not one chain of dependent FMAs
    {
        MVec part[3][V] = {};
        for (; p + 4 <= k; p += 4)
        {
            for (int q = 0; q < 4; ++q)
            {
                MVec* dst = q == 0 ? acc[0] : part[q - 1];
                for (int h = 0; h < V; ++h)
                {
                    MVec b;
                    std::memcpy(&b, bt + (p + q) * ldb + h * kML, sizeof(MVec));
                    dst[h] += a[p + q] * b;
                }
            }
        }
        for (int h = 0; h < V; ++h)
            acc[0][h] += (part[0][h] + part[1][h]) + part[2][h];
    }
    for (; p < k; ++p)
    {
        MVec b[V];
        for (int h = 0; h < V; ++h)
            std::memcpy(&b[h], bt + p * ldb + h * kML, sizeof(MVec));
        for (int r = 0; r < R; ++r)
        {
            float const av = a[r * lda + p];
            for (int h = 0; h < V; ++h)
                acc[r][h] += av * b[h];
        }
    }
    for (int r = 0; r < R; ++r)
    {
        if (cols == V * kML)
        {
            std::memcpy(c + r * ldc, &acc[r][0], V * sizeof(MVec));
        }
        else
        {
            for (int64_t j = 0; j < cols; ++j)
                c[r * ldc + j] = acc[r][j / kML][j % kML];
        }
    }
}

//! The rows of c in tiles of 4 (then single rows), for the columns [j0, j0 + cols) from panel (ld ldp) of V vectors.
template <int V>
static void gemmColumns(float const* a, int64_t lda, float const* panel, int64_t ldp, float* c, int64_t ldc,
    int64_t m, int64_t k, int64_t cols)
{
    int64_t i = 0;
    for (; i + 4 <= m; i += 4)
        gemmTile<4, V>(a + i * lda, lda, panel, ldp, c + i * ldc, ldc, k, cols);
    for (; i < m; ++i)
        gemmTile<1, V>(a + i * lda, lda, panel, ldp, c + i * ldc, ldc, k, cols);
}

static void gemm(float const* a, int64_t lda, float const* bt, int64_t ldb, float* c, int64_t ldc, int64_t m,
    int64_t n, int64_t k)
{
    int64_t const nT = n / kTW * kTW;
    thread_local std::vector<float> panel; // the last n % kTW columns of bt, zero-padded to kTW
    if (nT < n)
    {
        panel.assign(static_cast<size_t>(k) * kTW, 0.0f);
        for (int64_t p = 0; p < k; ++p)
            for (int64_t j = nT; j < n; ++j)
                panel[p * kTW + (j - nT)] = bt[p * ldb + j];
    }
    int64_t i = 0;
    for (; i + 4 <= m; i += 4)
    {
        for (int64_t j = 0; j < nT; j += kTW)
            gemmTile<4>(a + i * lda, lda, bt + j, ldb, c + i * ldc + j, ldc, k, kTW);
    }
    for (; i < m; ++i)
    {
        for (int64_t j = 0; j < nT; j += kTW)
            gemmTile<1>(a + i * lda, lda, bt + j, ldb, c + i * ldc + j, ldc, k, kTW);
    }
    if (n - nT > kML)
        gemmColumns<2>(a, lda, panel.data(), kTW, c + nT, ldc, m, k, n - nT);
    else if (nT < n)
        gemmColumns<1>(a, lda, panel.data(), kTW, c + nT, ldc, m, k, n - nT);
}

// v[i] = silu(v[i]) = v / (1 + exp(-v)) over n floats; exp by Cody-Waite range reduction and a degree-6 polynomial
// (relative error ~2e-7 on [-87, 87]; arguments are clamped there, where silu is already v or 0 in fp32).
static void siluInPlace(float* v, int64_t n)
{
    int64_t i = 0;
    for (; i + kML <= n; i += kML)
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
