// ctest: the CPU reference against hand-computed values and against an independent double-precision loop.
#include "selectiveScanCpu.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace
{
int gFailures = 0;

void expectNear(double got, double want, double tol, char const* what)
{
    if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want))))
    {
        std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
        ++gFailures;
    }
}

// Written from the op contract, deliberately without selectiveScanMath.h.
std::vector<double> naiveScan(std::vector<float> const& u, std::vector<float> const& delta, std::vector<float> const& A,
    std::vector<float> const& B, std::vector<float> const& C, std::vector<float> const& D, std::vector<float> const& z,
    std::vector<float> const& bias, std::vector<int32_t> const& lengths, int Bn, int Dn, int L, int N, bool softplus,
    bool last)
{
    std::vector<double> y(last ? Bn * Dn : Bn * Dn * L, 0.0);
    for (int b = 0; b < Bn; ++b)
    {
        int const n = std::min(std::max(lengths[b], 1), L);
        for (int d = 0; d < Dn; ++d)
        {
            std::vector<double> h(N, 0.0);
            for (int t = 0; t < L; ++t)
            {
                int const i = (b * Dn + d) * L + t;
                double dt = static_cast<double>(delta[i]) + bias[d];
                if (softplus)
                {
                    dt = dt > 20.0 ? dt : std::log1p(std::exp(dt));
                }
                double acc = 0.0;
                for (int s = 0; s < N; ++s)
                {
                    int const j = (b * N + s) * L + t;
                    h[s] = std::exp(dt * A[d * N + s]) * h[s] + dt * u[i] * B[j];
                    acc += h[s] * C[j];
                }
                double const zz = z[i];
                double const out = (acc + D[d] * static_cast<double>(u[i])) * zz / (1.0 + std::exp(-zz));
                if (!last)
                {
                    y[i] = out;
                }
                else if (t == n - 1)
                {
                    y[b * Dn + d] = out;
                }
            }
        }
    }
    return y;
}

void testKnownValues()
{
    // One channel, one state, two steps, no softplus: h0 = 0.5 * 1 * 1, y0 = 2 h0 + 0.5 * 1 = 1.5;
    // h1 = exp(-1) h0 + 1 * 2 * 0.5, y1 = h1 + 0.5 * 2 = 2.18394; the gate multiplies by silu(1), silu(2).
    float const u[] = {1.F, 2.F}, delta[] = {0.5F, 1.F}, A[] = {-1.F}, B[] = {1.F, 0.5F}, C[] = {2.F, 1.F};
    float const D[] = {0.5F}, z[] = {1.F, 2.F};
    float y[2];
    m4r_scan_cpu_f32(u, delta, A, B, C, D, nullptr, nullptr, nullptr, 1, 1, 2, 1, 0, 0, y);
    expectNear(y[0], 1.5, 1e-6, "known y0 (no gate)");
    expectNear(y[1], 2.1839397205857214, 1e-6, "known y1 (no gate)");
    m4r_scan_cpu_f32(u, delta, A, B, C, D, z, nullptr, nullptr, 1, 1, 2, 1, 0, 0, y);
    expectNear(y[0], 1.0965878679450074, 1e-6, "known y0 (silu gate)");
    expectNear(y[1], 3.8472154487434724, 1e-6, "known y1 (silu gate)");
    // delta_softplus with delta = 0: dt = ln 2.
    float const zero[] = {0.F, 0.F};
    m4r_scan_cpu_f32(u, zero, A, B, C, D, nullptr, nullptr, nullptr, 1, 1, 1, 1, 1, 0, y);
    expectNear(y[0], 1.8862943611198906, 1e-6, "known softplus");
    // mode last with lengths = 1 reports position 0.
    int32_t const len[] = {1};
    m4r_scan_cpu_f32(u, delta, A, B, C, D, nullptr, nullptr, len, 1, 1, 2, 1, 0, 1, y);
    expectNear(y[0], 1.5, 1e-6, "known last, length 1");
}

void testAgainstNaive(bool softplus)
{
    int const Bn = 4, Dn = 5, L = 17, N = 7;
    std::mt19937 rng(1234);
    std::normal_distribution<float> normal(0.F, 1.F);
    auto fill = [&](int count, float scale) {
        std::vector<float> v(count);
        for (auto& x : v)
        {
            x = scale * normal(rng);
        }
        return v;
    };
    auto u = fill(Bn * Dn * L, 1.F), delta = fill(Bn * Dn * L, 0.5F), z = fill(Bn * Dn * L, 1.F);
    auto B = fill(Bn * N * L, 1.F), C = fill(Bn * N * L, 1.F), D = fill(Dn, 1.F), bias = fill(Dn, 0.3F);
    std::vector<float> A(Dn * N);
    for (int i = 0; i < Dn * N; ++i)
    {
        A[i] = -std::exp(0.5F * normal(rng)); // A = -exp(A_log) < 0
    }
    if (!softplus)
    {
        for (auto& x : delta)
        {
            x = std::fabs(x); // keep dt >= 0 as softplus would
        }
    }
    std::vector<int32_t> const lengths = {0, L + 5, 1, 9}; // clamped to 1, L, 1, 9
    for (int last = 0; last <= 1; ++last)
    {
        std::vector<float> y(last ? Bn * Dn : Bn * Dn * L);
        int const rc = m4r_scan_cpu_f32(u.data(), delta.data(), A.data(), B.data(), C.data(), D.data(), z.data(),
            bias.data(), lengths.data(), Bn, Dn, L, N, softplus ? 1 : 0, last, y.data());
        if (rc != M4R_SCAN_OK)
        {
            std::printf("FAIL: m4r_scan_cpu_f32 returned %d\n", rc);
            ++gFailures;
            return;
        }
        auto const want = naiveScan(u, delta, A, B, C, D, z, bias, lengths, Bn, Dn, L, N, softplus, last != 0);
        for (size_t i = 0; i < y.size(); ++i)
        {
            expectNear(y[i], want[i], 2e-5, last ? "random, mode last" : "random, mode all");
        }
    }
}

void testBadArguments()
{
    float x = 0.F;
    if (m4r_scan_cpu_f32(nullptr, &x, &x, &x, &x, &x, &x, &x, nullptr, 1, 1, 1, 1, 1, 0, &x) != M4R_SCAN_BAD_ARGUMENT
        || m4r_scan_cpu_f32(&x, &x, &x, &x, &x, &x, &x, &x, nullptr, 1, 1, 0, 1, 1, 0, &x) != M4R_SCAN_BAD_ARGUMENT)
    {
        std::printf("FAIL: bad arguments accepted\n");
        ++gFailures;
    }
}
} // namespace

int main()
{
    testKnownValues();
    testAgainstNaive(true);
    testAgainstNaive(false);
    testBadArguments();
    std::printf("%s (%d failures)\n", gFailures == 0 ? "PASS" : "FAIL", gFailures);
    return gFailures == 0 ? 0 : 1;
}
