// Backward-pass loops of the optimised CPU scan (selectiveScanCpuFast.cpp includes this file after
// selectiveScanCpuFastKernel.inl in the 8-lane instruction-set namespaces; the forward has its own loops there).
// The states are recomputed with the natural-exp polynomial expDecayVec (mul + add, as the reference).

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
