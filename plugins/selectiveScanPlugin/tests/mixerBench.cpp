// mixer_bench (not a ctest): per-call CPU time of the fused Mamba mixer kernels on one thread, at the ML-100K
// export's shape (d_model 64, d_inner 128, d_state 32, dt_rank 4, d_conv 4), random weights:
//   scan      m4r_scan_native_forward, one row, mode last (the scan inside a 1 x L mixer call)
//   mixer     m4r_mixer_forward_row, mode last, `batch` rows one after another (what one ONNX Runtime thread does)
//   step      m4r_mixer_step_rows, `batch` rows
//   cold      mixer, but every call follows a pass that writes one byte per cache line over 64 MB (more than the
//             L3), as when the call comes after another model's: the weights, x and the kernel's scratch come
//             back from DRAM. Only the kernel call is timed.
// Usage: mixer_bench [seconds per point, default 0.5] [scan|mixer|step|cold: only those]. Prints the median CPU ms
// per call over repeated calls (CLOCK_THREAD_CPUTIME_ID), so that a loaded machine inflates the numbers less than
// wall time would.
#include "mambaMixerCpu.h"
#include "mambaMixerStepCpu.h"
#include "selectiveScanCpuFast.h"
#include "selectiveScanCpuRow.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace
{
double cpuNow()
{
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

//! Median CPU ms of fn() over repeats filling about `seconds`; before each, `before` (not timed) when given.
double medianMs(std::function<void()> const& fn, double seconds, std::function<void()> const& before = nullptr)
{
    fn(); // warm the scratch and caches
    std::vector<double> times;
    double const start = cpuNow();
    while (times.size() < 5 || (cpuNow() - start < seconds && times.size() < 100000))
    {
        if (before)
            before();
        double const t0 = cpuNow();
        fn();
        times.push_back((cpuNow() - t0) * 1e3);
    }
    std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
    return times[times.size() / 2];
}
} // namespace

int main(int argc, char** argv)
{
    double const seconds = argc > 1 ? std::atof(argv[1]) : 0.5;
    std::string const only = argc > 2 ? argv[2] : "";
    auto const run = [&](char const* what) { return only.empty() || only == what; };
    int const dm = 64, di = 128, n = 32, r = 4, k = 4, nx = r + 2 * n;
    std::mt19937 g(1);
    std::uniform_real_distribution<float> ud(-0.3f, 0.3f);
    auto f = [&](size_t c) {
        std::vector<float> v(c);
        for (auto& x : v)
            x = ud(g);
        return v;
    };
    auto winT = f(dm * 2 * di), cw = f(di * k), cb = f(di), wxT = f(di * nx), wdtT = f(r * di), dtb = f(di),
         A = f(di * n), D = f(di), woT = f(di * dm);
    for (int c = 0; c < di; ++c)
        for (int s = 0; s < n; ++s)
            A[c * n + s] = -(s + 1.0f) * (1.0f + A[c * n + s]); // like a trained A = -exp(A_log) ~ -(s + 1)
    M4RMixerWeights const w{dm, di, n, r, k, winT.data(), cw.data(), cb.data(), wxT.data(), wdtT.data(), dtb.data(),
        A.data(), D.data(), woT.data()};
    std::printf("forward isa %s; median CPU ms per call, 1 thread\n", m4r::scan::rowIsa());

    for (int L : {50, 200, 1000})
    {
        if (!run("scan"))
            break;
        auto u = f(size_t(di) * L), dl = f(size_t(di) * L), z = f(size_t(di) * L), B = f(size_t(n) * L),
             C = f(size_t(n) * L);
        std::vector<float> y(di);
        double const ms = medianMs(
            [&] {
                m4r_scan_native_forward(u.data(), dl.data(), A.data(), B.data(), C.data(), D.data(), z.data(),
                    dtb.data(), nullptr, 1, di, L, n, 1, 1, M4R_SCAN_F32, y.data(), 1);
            },
            seconds);
        std::printf("scan   1 x %4d last: %8.4f ms (%.2f ns per state update)\n", L, ms, ms * 1e6 / (double(L) * di * n));
    }
    struct Point
    {
        int batch, L;
    };
    //! Median ms of m4r_mixer_forward_row (mode last) over p.batch rows, one after another.
    auto const mixerMs = [&](Point p, double secs, std::function<void()> const& before) {
        auto x = f(size_t(p.batch) * p.L * dm);
        std::vector<float> y(size_t(p.batch) * dm);
        return medianMs(
            [&] {
                for (int b = 0; b < p.batch; ++b)
                    m4r_mixer_forward_row(&w, x.data() + size_t(b) * p.L * dm, p.L, p.L, 1, y.data() + b * dm);
            },
            secs, before);
    };
    for (Point p : {Point{1, 50}, Point{1, 200}, Point{1, 1000}, Point{256, 50}, Point{256, 200}})
    {
        if (!run("mixer"))
            break;
        double const ms = mixerMs(p, p.batch > 1 ? 4 * seconds : seconds, nullptr);
        std::printf("mixer %3d x %4d last: %8.4f ms\n", p.batch, p.L, ms);
    }
    std::vector<unsigned char> evict(run("cold") ? size_t(64) << 20 : 0);
    auto const touch = [&] {
        for (size_t i = 0; i < evict.size(); i += 64)
            evict[i] += 1;
    };
    for (Point p : {Point{1, 50}, Point{1, 200}, Point{1, 1000}, Point{256, 200}})
    {
        if (!run("cold"))
            break;
        double const ms = mixerMs(p, p.batch > 1 ? 4 * seconds : 2 * seconds, touch);
        std::printf("mixer %3d x %4d last, cold caches: %8.4f ms\n", p.batch, p.L, ms);
    }
    for (int rows : {1, 256})
    {
        if (!run("step"))
            break;
        auto x = f(size_t(rows) * dm), conv = f(size_t(rows) * di * (k - 1)), h = f(size_t(rows) * di * n);
        std::vector<float> y(size_t(rows) * dm);
        double const ms = medianMs(
            [&] { m4r_mixer_step_rows(&w, rows, x.data(), conv.data(), h.data(), y.data(), conv.data(), h.data()); },
            seconds);
        std::printf("step  %3d rows     : %8.4f ms\n", rows, ms);
    }
    return 0;
}
