// ctest mamba_mixer_step_vs_reference: the fused streaming step (mambaMixerStepCpu.h) against
//  (1) an independent double-precision step (in_proj, conv window, SiLU, x_proj, dt_proj, softplus with threshold
//      20, clamped exp, state update, read-out, gate, out_proj) on random states, for row counts on and off the
//      32-row block, d_state on and off the 8-lane vectors, d_conv 1..4, in place (outputs aliasing the states);
//  (2) the full-sequence mixer (mambaMixerCpu.h, mode "all"): L steps from the empty state give its outputs at
//      every position (ragged: each row stops at its own length).
#include "mambaMixerCpu.h"
#include "mambaMixerStepCpu.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace
{
struct Model
{
    int dm, di, n, r, k;
    std::vector<float> win, convw, convb, wx, wdt, dtb, A, D, wout;
    std::vector<float> inT, xT, dtT, outT;
    M4RMixerWeights w{};
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
        fill(di * r, 1.0f), fill(di, 2.0f), fill(di * n, 1.0f), fill(di, 1.0f), fill(dm * di, 0.5f), {}, {}, {}, {},
        {}};
    for (auto& a : m.A)
        a = -std::exp(a * 2.0f);
    m.dtb[0] = 25.0f; // above softplus' threshold
    auto tr = [](std::vector<float> const& in, int rows, int cols) {
        std::vector<float> out(in.size());
        m4r_mixer_transpose(in.data(), rows, cols, out.data());
        return out;
    };
    m.inT = tr(m.win, 2 * di, dm);
    m.xT = tr(m.wx, r + 2 * n, di);
    m.dtT = tr(m.wdt, di, r);
    m.outT = tr(m.wout, dm, di);
    m.w = M4RMixerWeights{dm, di, n, r, k, m.inT.data(), m.convw.data(), m.convb.data(), m.xT.data(), m.dtT.data(),
        m.dtb.data(), m.A.data(), m.D.data(), m.outT.data()};
    return m;
}

double silu(double v)
{
    return v / (1.0 + std::exp(-v));
}

// One row, double precision: y (dm), conv' (di, k-1), h' (di, n).
void referenceStep(Model const& m, float const* x, float const* conv, float const* h, std::vector<double>& y,
    std::vector<double>& convOut, std::vector<double>& hOut)
{
    int const di = m.di, n = m.n, r = m.r, k = m.k, dm = m.dm, nx = r + 2 * n, kw = k - 1;
    std::vector<double> xz(2 * di), u(di), xd(nx), g(di);
    for (int j = 0; j < 2 * di; ++j)
    {
        double s = 0;
        for (int c = 0; c < dm; ++c)
            s += double(m.win[j * dm + c]) * x[c];
        xz[j] = s;
    }
    convOut.assign(di * kw, 0.0);
    for (int c = 0; c < di; ++c)
    {
        double s = m.convb[c];
        for (int j = 0; j < k; ++j)
            s += double(m.convw[c * k + j]) * (j < kw ? double(conv[c * kw + j]) : xz[c]);
        for (int j = 0; j < kw; ++j)
            convOut[c * kw + j] = j + 1 < kw ? conv[c * kw + j + 1] : xz[c];
        u[c] = silu(s);
    }
    for (int j = 0; j < nx; ++j)
    {
        double s = 0;
        for (int c = 0; c < di; ++c)
            s += double(m.wx[j * di + c]) * u[c];
        xd[j] = s;
    }
    hOut.assign(di * n, 0.0);
    for (int c = 0; c < di; ++c)
    {
        double d = m.dtb[c];
        for (int j = 0; j < r; ++j)
            d += double(m.wdt[c * r + j]) * xd[j];
        d = d > 20.0 ? d : std::log1p(std::exp(d));
        double yc = 0;
        for (int s = 0; s < n; ++s)
        {
            double const hn = std::exp(std::max(d * m.A[c * n + s], -80.0)) * h[c * n + s] + d * u[c] * xd[r + s];
            hOut[c * n + s] = hn;
            yc += hn * xd[r + n + s];
        }
        g[c] = (yc + m.D[c] * u[c]) * silu(xz[di + c]);
    }
    y.assign(dm, 0.0);
    for (int o = 0; o < dm; ++o)
        for (int c = 0; c < di; ++c)
            y[o] += double(m.wout[o * di + c]) * g[c];
}

int failures = 0;

void check(char const* what, double got, double want, double tol, int where)
{
    if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want))))
    {
        if (failures < 10)
            std::printf("FAIL %s [%d]: got %.8g want %.8g\n", what, where, got, want);
        ++failures;
    }
}

void testRandomStates(int rows, int dm, int di, int n, int r, int k, bool inPlace, std::mt19937& g)
{
    Model const m = makeModel(dm, di, n, r, k, g);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    int const kw = k - 1;
    std::vector<float> x(rows * dm), conv(rows * di * kw), h(rows * di * n);
    for (auto* v : {&x, &conv, &h})
        for (auto& e : *v)
            e = nd(g);
    std::vector<float> y(rows * dm), convOut(conv.size()), hOut(h.size());
    std::vector<float> convIn = conv, hIn = h;
    float* co = inPlace ? conv.data() : convOut.data();
    float* ho = inPlace ? h.data() : hOut.data();
    if (m4r_mixer_step_rows(&m.w, rows, x.data(), conv.data(), h.data(), y.data(), co, ho) != 0)
    {
        std::printf("FAIL step returned an error (rows %d)\n", rows);
        ++failures;
        return;
    }
    std::vector<double> ry, rc, rh;
    for (int b = 0; b < rows; ++b)
    {
        referenceStep(m, x.data() + b * dm, convIn.data() + b * di * kw, hIn.data() + b * di * n, ry, rc, rh);
        for (int i = 0; i < dm; ++i)
            check("y", y[b * dm + i], ry[i], 2e-4, b);
        for (int i = 0; i < di * kw; ++i)
            check("conv_state", co[b * di * kw + i], rc[i], 1e-5, b);
        for (int i = 0; i < di * n; ++i)
            check("ssm_state", ho[b * di * n + i], rh[i], 1e-4, b);
    }
}

// Rows stepped from the empty state over their own lengths equal the full-sequence mixer at every position.
void testAgainstSequence(int rows, int L, int dm, int di, int n, int r, int k, std::mt19937& g)
{
    Model const m = makeModel(dm, di, n, r, k, g);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> x(rows * L * dm);
    for (auto& e : x)
        e = nd(g);
    std::vector<float> full(rows * L * dm);
    for (int b = 0; b < rows; ++b)
        m4r_mixer_forward_row(&m.w, x.data() + b * L * dm, L, L, 0, full.data() + b * L * dm);
    std::vector<int> lengths(rows);
    for (int b = 0; b < rows; ++b)
        lengths[b] = b == 0 ? 1 : 1 + int(g() % L);
    int const kw = k - 1;
    std::vector<float> conv(rows * di * kw, 0.0f), h(rows * di * n, 0.0f), xt(rows * dm), y(rows * dm);
    for (int t = 0; t < L; ++t)
    {
        for (int b = 0; b < rows; ++b)
            std::copy_n(x.data() + (b * L + t) * dm, dm, xt.data() + b * dm);
        m4r_mixer_step_rows(&m.w, rows, xt.data(), conv.data(), h.data(), y.data(), conv.data(), h.data());
        for (int b = 0; b < rows; ++b)
            if (t < lengths[b])
                for (int i = 0; i < dm; ++i)
                    check("step vs sequence", y[b * dm + i], full[(b * L + t) * dm + i], 2e-4, b * 1000 + t);
    }
}
} // namespace

int main()
{
    std::mt19937 g(7);
    int const shapes[][5] = {{64, 128, 32, 4, 4}, {16, 24, 13, 3, 3}, {8, 16, 8, 1, 1}, {5, 7, 3, 2, 2}};
    for (auto const& s : shapes)
        for (int rows : {1, 3, 32, 37})
            for (bool inPlace : {false, true})
                testRandomStates(rows, s[0], s[1], s[2], s[3], s[4], inPlace, g);
    testAgainstSequence(5, 40, 64, 128, 32, 4, 4, g);
    testAgainstSequence(35, 9, 16, 24, 13, 3, 2, g);
    M4RMixerWeights bad{};
    if (m4r_mixer_step_rows(&bad, 1, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr) != 1)
    {
        std::printf("FAIL bad arguments not refused\n");
        ++failures;
    }
    if (failures != 0)
    {
        std::printf("%d mismatches\n", failures);
        return 1;
    }
    std::printf("mamba mixer step: OK\n");
    return 0;
}
