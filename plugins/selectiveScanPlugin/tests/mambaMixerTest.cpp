// ctest mamba_mixer_vs_reference: the fused Mamba mixer (mambaMixerCpu.h) against an independent double-precision
// loop over the whole chain (in_proj, causal conv, SiLU, x_proj, dt_proj, softplus, scan, gate, out_proj), for
// ragged lengths (0, 1, middle, full, past the end) in mode last and every position in mode all, shapes on and
// off the GEMM's 16-column / 4-row blocks and the conv's 4 channels, d_conv 1..4, L = 1..300. Then rows in
// chunks (m4r::mixer::forwardRow with 64 positions per chunk, d_conv 4, 1 and 70, and the default chunk): L < T,
// L = T, L % T != 0 and L = 3T + 5, modes last (also with length < seqlen) and all, each against the reference,
// bitwise against one chunk over the whole row, and writing nothing past the output; and the scan in pieces
// (forwardRowInit + forwardRowAdvance over uneven ranges) bitwise against forwardRow.
#include "mambaMixerCpu.h"
#include "selectiveScanCpuRow.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace
{
struct Model
{
    int dm, di, n, r, k;
    std::vector<float> win, convw, convb, wx, wdt, dtb, A, D, wout;
};

Model makeModel(int dm, int di, int n, int r, int k, std::mt19937& g)
{
    std::uniform_real_distribution<float> u(-0.5f, 0.5f);
    auto fill = [&](size_t count, float scale) {
        std::vector<float> v(count);
        for (auto& x : v)
            x = u(g) * scale;
        return v;
    };
    Model m{dm, di, n, r, k, fill(2 * di * dm, 0.6f), fill(di * k, 1.0f), fill(di, 0.5f), fill((r + 2 * n) * di, 0.5f),
        fill(di * r, 1.0f), fill(di, 2.0f), fill(di * n, 1.0f), fill(di, 1.0f), fill(dm * di, 0.5f)};
    for (auto& a : m.A)
        a = -std::exp(a * 2.0f); // A = -exp(A_log)
    return m;
}

double silu(double v)
{
    return v / (1.0 + std::exp(-v));
}

// out (L or 1, dm) in double
std::vector<double> reference(Model const& m, std::vector<float> const& x, int L, int length, bool last)
{
    int const Lb = last ? std::clamp(length, 1, L) : L;
    int const di = m.di, n = m.n, r = m.r, k = m.k, dm = m.dm, nx = r + 2 * n;
    std::vector<double> xs(Lb * di), z(Lb * di), u(Lb * di), h(di * n, 0.0), y(Lb * di);
    for (int t = 0; t < Lb; ++t)
        for (int j = 0; j < 2 * di; ++j)
        {
            double s = 0;
            for (int c = 0; c < dm; ++c)
                s += double(m.win[j * dm + c]) * x[t * dm + c];
            (j < di ? xs[t * di + j] : z[t * di + j - di]) = s;
        }
    for (int t = 0; t < Lb; ++t)
        for (int c = 0; c < di; ++c)
        {
            double s = m.convb[c];
            for (int j = 0; j < k; ++j)
            {
                int const src = t - (k - 1) + j;
                if (src >= 0)
                    s += double(m.convw[c * k + j]) * xs[src * di + c];
            }
            u[t * di + c] = silu(s);
        }
    for (int t = 0; t < Lb; ++t)
    {
        std::vector<double> xd(nx, 0.0);
        for (int o = 0; o < nx; ++o)
            for (int c = 0; c < di; ++c)
                xd[o] += double(m.wx[o * di + c]) * u[t * di + c];
        for (int c = 0; c < di; ++c)
        {
            double dt = m.dtb[c];
            for (int q = 0; q < r; ++q)
                dt += double(m.wdt[c * r + q]) * xd[q];
            dt = dt <= 20.0 ? std::log1p(std::exp(dt)) : dt;
            double acc = 0;
            for (int s = 0; s < n; ++s)
            {
                double& hs = h[c * n + s];
                hs = std::exp(dt * m.A[c * n + s]) * hs + dt * u[t * di + c] * xd[r + s];
                acc += hs * xd[r + n + s];
            }
            y[t * di + c] = (acc + m.D[c] * u[t * di + c]) * silu(z[t * di + c]);
        }
    }
    int const rows = last ? 1 : Lb;
    std::vector<double> out(rows * dm, 0.0);
    for (int o = 0; o < rows; ++o)
    {
        int const t = last ? Lb - 1 : o;
        for (int j = 0; j < dm; ++j)
            for (int c = 0; c < di; ++c)
                out[o * dm + j] += double(m.wout[j * di + c]) * y[t * di + c];
    }
    return out;
}

double gWorst = 0.0; // largest error / scale seen

//! The model's weights as the kernel takes them (transposed).
struct Fused
{
    std::vector<float> winT, wxT, wdtT, woutT;
    M4RMixerWeights w;
    explicit Fused(Model const& m)
        : winT(2 * m.di * m.dm), wxT(m.wx.size()), wdtT(m.wdt.size()), woutT(m.wout.size())
    {
        m4r_mixer_transpose(m.win.data(), 2 * m.di, m.dm, winT.data());
        m4r_mixer_transpose(m.wx.data(), m.r + 2 * m.n, m.di, wxT.data());
        m4r_mixer_transpose(m.wdt.data(), m.di, m.r, wdtT.data());
        m4r_mixer_transpose(m.wout.data(), m.dm, m.di, woutT.data());
        w = M4RMixerWeights{m.dm, m.di, m.n, m.r, m.k, winT.data(), m.convw.data(), m.convb.data(), wxT.data(),
            wdtT.data(), m.dtb.data(), m.A.data(), m.D.data(), woutT.data()};
    }
};

std::vector<float> randomInput(Model const& m, int L, std::mt19937& g)
{
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> x(L * m.dm);
    for (auto& v : x)
        v = nd(g);
    return x;
}

//! Largest |y - ref| over the output; false (and a line) when above 2e-5 of the output's scale.
bool nearReference(Model const& m, std::vector<float> const& x, std::vector<float> const& y, int L, int length,
    bool last, char const* what)
{
    auto const ref = reference(m, x, L, length, last);
    double scale = 1e-3, err = 0;
    for (double v : ref)
        scale = std::max(scale, std::fabs(v));
    for (size_t i = 0; i < ref.size(); ++i)
        err = std::max(err, std::isfinite(y[i]) ? std::fabs(y[i] - ref[i]) : INFINITY);
    gWorst = std::max(gWorst, err / scale);
    bool const ok = err <= 2e-5 * scale;
    if (!ok)
        std::printf("FAIL: %s: dm %d di %d n %d r %d k %d L %d length %d %s: max err %.3g (scale %.3g)\n", what,
            m.dm, m.di, m.n, m.r, m.k, L, length, last ? "last" : "all", err, scale);
    return ok;
}

int check(Model const& m, int L, int length, bool last, std::mt19937& g)
{
    auto const x = randomInput(m, L, g);
    Fused const f(m);
    size_t const rows = last ? m.dm : size_t(L) * m.dm;
    std::vector<float> y(rows + size_t(m4r::mixer::kChunk) * m.dm, NAN); // room for a chunk's rows past y
    if (int rc = m4r_mixer_forward_row(&f.w, x.data(), L, length, last ? 1 : 0, y.data()); rc != 0)
    {
        std::printf("FAIL: rc %d\n", rc);
        return 1;
    }
    bool ok = nearReference(m, x, y, L, length, last, "reference");
    if (std::any_of(y.begin() + rows, y.end(), [](float v) { return !std::isnan(v); }))
    {
        std::printf("FAIL: L %d, %s: wrote past the output\n", L, last ? "last" : "all");
        ok = false;
    }
    return ok ? 0 : 1;
}

//! Chunks: m4r::mixer::forwardRow with `chunk` positions per chunk against the reference, bitwise against one
//! chunk over the whole row (the whole-row kernel), and writing nothing past its output rows.
int checkChunked(Model const& m, int chunk, int L, int length, bool last, std::mt19937& g)
{
    auto const x = randomInput(m, L, g);
    Fused const f(m);
    size_t const rows = last ? m.dm : size_t(L) * m.dm;
    float const guard = 12345.0f;
    std::vector<float> y(rows + size_t(chunk) * m.dm, guard), whole(rows, NAN); // room for a chunk's rows past y
    int const rc = m4r::mixer::forwardRow(&f.w, x.data(), L, length, last ? 1 : 0, y.data(), chunk);
    int const rcWhole = m4r::mixer::forwardRow(&f.w, x.data(), L, length, last ? 1 : 0, whole.data(), 1 << 20);
    if (rc != 0 || rcWhole != 0)
    {
        std::printf("FAIL: chunk %d: rc %d, whole row rc %d\n", chunk, rc, rcWhole);
        return 1;
    }
    char what[96];
    std::snprintf(what, sizeof what, "chunk %d, k %d, L %d, length %d, %s", chunk, m.k, L, length,
        last ? "last" : "all");
    bool ok = nearReference(m, x, y, L, length, last, what);
    if (std::memcmp(y.data(), whole.data(), rows * sizeof(float)) != 0)
    {
        std::printf("FAIL: %s: differs from one chunk over the row\n", what);
        ok = false;
    }
    if (std::any_of(y.begin() + rows, y.end(), [&](float v) { return v != guard; }))
    {
        std::printf("FAIL: %s: wrote past the output\n", what);
        ok = false;
    }
    return ok ? 0 : 1;
}

//! Rows in chunks of T: L < T, L = T, L % T != 0, L = 3T + 5, each in mode last (length = L and a shorter length:
//! the row ends inside an earlier chunk, or inside the only one) and mode all.
int chunkCases(Model const& m, int T, std::mt19937& g, int& cases)
{
    int failures = 0;
    for (int L : {T / 2 + 5, T, T + T / 2 + 4, 3 * T + 5})
    {
        int const shorter = L > T ? T + 2 : L - 7; // mode last, length < seqlen
        failures += checkChunked(m, T, L, L, true, g);
        failures += checkChunked(m, T, L, shorter, true, g);
        failures += checkChunked(m, T, 3 * T + 5, L - 3, true, g); // seqlen 3T + 5, the row ends at L - 3
        failures += checkChunked(m, T, L, L, false, g);
        cases += 4;
    }
    return failures;
}
//! The scan in pieces (forwardRowInit, then forwardRowAdvance over ranges that are not multiples of the time tile)
//! against forwardRow over the whole row, bitwise, every position and last only.
int checkScanPieces(std::mt19937& g)
{
    int const dim = 40, n = 16, steps = 197, pieces[] = {0, 1, 38, 102, 166, steps};
    std::normal_distribution<float> nd(0.0f, 1.0f);
    auto fill = [&](size_t count, float scale, float shift) {
        std::vector<float> v(count);
        for (auto& x : v)
            x = nd(g) * scale + shift;
        return v;
    };
    auto const u = fill(steps * dim, 1, 0), delta = fill(steps * dim, 1, -1), z = fill(steps * dim, 1, 0),
               bc = fill(steps * 2 * n, 1, 0), A = fill(dim * n, 0.5f, -1), D = fill(dim, 1, 0), bias = fill(dim, 0.5f, 0);
    int failures = 0;
    for (bool lastOnly : {false, true})
    {
        std::vector<float> whole(steps * dim, NAN), piecewise(steps * dim, NAN);
        std::vector<float> ws(m4r::scan::rowWorkspaceFloats(steps, n, dim));
        m4r::scan::ScanRow row{u.data(), dim, 1, delta.data(), dim, 1, z.data(), dim, 1, bc.data(), bc.data() + n, 2 * n,
            A.data(), D.data(), bias.data(), dim, steps, n, true, lastOnly, whole.data(), dim, 1};
        m4r::scan::forwardRow(row, ws.data());
        row.y = piecewise.data();
        m4r::scan::forwardRowInit(row, ws.data());
        for (size_t i = 0; i + 1 < std::size(pieces); ++i)
        {
            int const t0 = pieces[i], t1 = pieces[i + 1];
            m4r::scan::ScanRow at = row; // the views point at position t0
            at.u = u.data() + t0 * dim;
            at.delta = delta.data() + t0 * dim;
            at.z = z.data() + t0 * dim;
            at.B = bc.data() + t0 * 2 * n;
            at.C = at.B + n;
            at.y = piecewise.data() + (lastOnly ? 0 : t0 * dim);
            m4r::scan::forwardRowAdvance(at, t0, t1, ws.data());
        }
        size_t const count = lastOnly ? dim : whole.size();
        if (std::memcmp(whole.data(), piecewise.data(), count * sizeof(float)) != 0)
        {
            std::printf("FAIL: scan in pieces, %s: differs from forwardRow\n", lastOnly ? "last" : "all");
            ++failures;
        }
    }
    return failures;
}
} // namespace

// ctest runs this test per instruction set of the scan (CMakeLists.txt): by default (AVX-512 on a CPU that has
// it), with $M4R_SCAN_NO_AVX512 (AVX2) and with $M4R_SCAN_GENERIC (baseline). The one that ran must be the one
// asked for, so that each run really covers its path.
bool isaAsAsked(char const* isa)
{
    if (std::getenv("M4R_SCAN_GENERIC") != nullptr)
        return std::strcmp(isa, "generic") == 0;
    if (std::getenv("M4R_SCAN_NO_AVX512") != nullptr)
        return std::strcmp(isa, "avx512") != 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
        && __builtin_cpu_supports("avx512bw"))
        return std::strcmp(isa, "avx512") == 0;
#endif
    return true;
}

int main()
{
    std::mt19937 g(7);
    int failures = 0, cases = 0;
    char const* isa = m4r::scan::rowIsa();
    std::printf("mamba_mixer_vs_reference: scan isa %s\n", isa);
    if (!isaAsAsked(isa))
    {
        std::printf("FAIL: the scan dispatched to %s, not the instruction set the environment asks for\n", isa);
        return 1;
    }
    struct Shape
    {
        int dm, di, n, r, k;
    };
    for (Shape s : {Shape{64, 128, 32, 4, 4}, Shape{8, 16, 4, 1, 2}, Shape{13, 24, 5, 3, 1}, Shape{20, 40, 16, 2, 3},
             Shape{11, 18, 3, 2, 4}}) // d_inner 18: channels past the conv's and the scan's vectors
    {
        Model const m = makeModel(s.dm, s.di, s.n, s.r, s.k, g);
        for (int L : {1, 2, 5, 50, 300})
        {
            for (int length : {0, 1, L / 2, L, L + 3})
            {
                failures += check(m, L, length, true, g);
                ++cases;
            }
            failures += check(m, L, L, false, g);
            ++cases;
        }
    }
    int chunkFailures = 0, chunkCount = 0;
    for (int k : {4, 1}) // a conv carried across chunks, and none
    {
        Model const m = makeModel(20, 40, 16, 2, k, g);
        chunkFailures += chunkCases(m, m4r::scan::kTimeTile, g, chunkCount);
    }
    chunkFailures += chunkCases(makeModel(64, 128, 32, 4, 4, g), m4r::mixer::kChunk, g, chunkCount); // ML-100K's
    chunkFailures += chunkCases(makeModel(8, 16, 4, 1, 70, g), 64, g, chunkCount); // d_conv - 1 > T: a carry of carries
    chunkFailures += checkScanPieces(g);
    chunkCount += 2;
    std::printf("mamba_mixer_vs_reference: %d of %d chunk cases failed\n", chunkFailures, chunkCount);
    failures += chunkFailures;
    cases += chunkCount;
    std::printf("mamba_mixer_vs_reference: %d of %d cases failed; largest error %.3g of the output scale\n", failures,
        cases, gWorst);
    return failures == 0 ? 0 : 1;
}
