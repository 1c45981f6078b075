// ctest without TensorRT (CI has no TensorRT headers) and without a GPU: the plugin's rules and its enqueue
// path (selectiveScanPluginCore.h, what selectiveScanPlugin.cpp delegates to), with the kernel launch run
// on host threads by the kernel emulation through the real dispatch. Checks format/dtype negotiation,
// cross-input shape validation, the serialization round trip (delta_softplus, mode, nb_inputs) and that
// enqueue wires every input to the kernel (B vs C, lengths, z) by comparing with the CPU reference.
#include "kernelEmulation.h" // first: it redefines the CUDA keywords

#include "selectiveScanCpu.h"
#include "selectiveScanPluginCore.h"

#include <cstdio>
#include <random>
#include <string>

using namespace m4r::plugin;

namespace
{
int gFailures = 0;

void check(bool ok, std::string const& what)
{
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    gFailures += ok ? 0 : 1;
}

bool contains(std::string const& s, char const* part)
{
    return s.find(part) != std::string::npos;
}

//! inputs + output of one node with io type `t`: u (2, 5, 7), N = 3, lengths (2), y (2, 5, 7).
void makeInfo(TensorInfo* io, DType t)
{
    DType const types[10] = {t, t, DType::kFLOAT, t, t, DType::kFLOAT, t, DType::kFLOAT, DType::kINT32, t};
    int64_t const shapes[10][3] = {{2, 5, 7}, {2, 5, 7}, {5, 3}, {2, 3, 7}, {2, 3, 7}, {5}, {2, 5, 7}, {5}, {2},
        {2, 5, 7}};
    int32_t const ranks[10] = {3, 3, 2, 3, 3, 1, 3, 1, 1, 3};
    for (int i = 0; i < 10; ++i)
    {
        io[i] = TensorInfo{};
        io[i].type = types[i];
        io[i].nbDims = ranks[i];
        for (int j = 0; j < ranks[i]; ++j)
        {
            io[i].d[j] = shapes[i][j];
        }
    }
}

void testFormats()
{
    TensorInfo io[10];
    for (DType t : {DType::kFLOAT, DType::kHALF, DType::kBF16})
    {
        makeInfo(io, t);
        bool all = true;
        for (int pos = 0; pos < 10; ++pos)
        {
            all = all && supportsFormat(pos, io, 9, 1);
        }
        check(all, "contract types accepted (fp32/fp16/bf16)");
        io[8] = io[9]; // 8 inputs: position 8 is the output y
        check(supportsFormat(8, io, 8, 1), "8 inputs (no lengths): y accepted at position 8");
    }
    struct Case
    {
        int pos;
        DType type;
        char const* what;
    };
    Case const rejected[] = {{0, DType::kINT32, "int32 u rejected"}, {1, DType::kFLOAT, "delta dtype != u rejected"},
        {2, DType::kHALF, "fp16 A rejected (parameters stay fp32)"}, {3, DType::kFLOAT, "B dtype != u rejected"},
        {4, DType::kBF16, "C dtype != u rejected"}, {5, DType::kHALF, "fp16 D rejected"},
        {6, DType::kFLOAT, "z dtype != u rejected"}, {7, DType::kHALF, "fp16 delta_bias rejected"},
        {8, DType::kINT64, "int64 lengths rejected"}, {9, DType::kFLOAT, "y dtype != u rejected"}};
    for (Case const& c : rejected)
    {
        makeInfo(io, DType::kHALF);
        io[c.pos].type = c.type;
        check(!supportsFormat(c.pos, io, 9, 1), c.what);
    }
    makeInfo(io, DType::kHALF);
    io[0].linear = false;
    check(!supportsFormat(0, io, 9, 1), "non-linear format rejected");
    makeInfo(io, DType::kHALF);
    check(!supportsFormat(0, io, 7, 1) && !supportsFormat(0, io, 9, 2), "7 inputs / 2 outputs rejected");
}

void testDims()
{
    TensorInfo io[10];
    makeInfo(io, DType::kFLOAT);
    check(checkDims(io, 9).empty(), "consistent shapes accepted");
    struct Case
    {
        int input, axis;
        int64_t value;
        char const* expect;
    };
    Case const bad[] = {{1, 2, 6, "delta.shape[2] = 6 does not match u.shape[2] = 7"},
        {6, 1, 4, "z.shape[1] = 4 does not match u.shape[1] = 5"},
        {2, 0, 4, "A.shape[0] = 4 does not match u.shape[1] = 5"},
        {3, 0, 1, "B.shape[0] = 1 does not match u.shape[0] = 2"},
        {3, 1, 4, "B.shape[1] = 4 does not match A.shape[1] = 3"},
        {4, 2, 8, "C.shape[2] = 8 does not match u.shape[2] = 7"},
        {4, 1, 2, "C.shape[1] = 2 does not match A.shape[1] = 3"},
        {5, 0, 6, "D.shape[0] = 6 does not match u.shape[1] = 5"},
        {7, 0, 1, "delta_bias.shape[0] = 1 does not match u.shape[1] = 5"},
        {8, 0, 3, "lengths.shape[0] = 3 does not match u.shape[0] = 2"}};
    for (Case const& c : bad)
    {
        makeInfo(io, DType::kFLOAT);
        io[c.input].d[c.axis] = c.value;
        std::string const why = checkDims(io, 9);
        check(contains(why, c.expect), std::string("mismatch named: ") + c.expect + " (got: " + why + ")");
    }
    makeInfo(io, DType::kFLOAT);
    io[3].d[0] = -1; // unknown while building: not compared
    io[0].d[2] = -1;
    check(checkDims(io, 9).empty(), "dims of -1 are not compared");
    makeInfo(io, DType::kFLOAT);
    io[8].d[0] = 3;
    check(checkDims(io, 8).empty(), "without lengths its shape is not read");
    makeInfo(io, DType::kFLOAT);
    io[2].d[1] = 65;
    check(contains(checkDims(io, 9), "above 64"), "N = 65 rejected");
    makeInfo(io, DType::kFLOAT);
    io[0].nbDims = 2;
    check(contains(checkDims(io, 9), "input u has rank 2"), "rank-2 u rejected with its name");
}

SelectiveScanAttrs roundTrip(SelectiveScanAttrs const& in, bool& ok)
{
    SerialValues const v = serialValues(in);
    SelectiveScanAttrs out; // a fresh runtime-phase plugin starts from the defaults
    ok = applyField(out, "delta_softplus", FieldKind::kINT32, &v.deltaSoftplus, 1).empty()
        && applyField(out, "mode", FieldKind::kCHAR, v.mode.c_str(), static_cast<int32_t>(v.mode.size() + 1)).empty()
        && applyField(out, "nb_inputs", FieldKind::kINT32, &v.nbInputs, 1).empty();
    return out;
}

void testFields()
{
    SelectiveScanAttrs defaults;
    check(defaults.deltaSoftplus && !defaults.lastOnly && defaults.nbInputs == 9, "defaults: softplus, all, 9 inputs");
    for (bool softplus : {false, true})
    {
        for (bool last : {false, true})
        {
            for (int32_t nb : {8, 9})
            {
                SelectiveScanAttrs a;
                a.deltaSoftplus = softplus;
                a.lastOnly = last;
                a.nbInputs = nb;
                bool ok = false;
                SelectiveScanAttrs const b = roundTrip(a, ok);
                check(ok && b.deltaSoftplus == softplus && b.lastOnly == last && b.nbInputs == nb,
                    "serialization round trip softplus=" + std::to_string(softplus) + " last=" + std::to_string(last)
                        + " nb_inputs=" + std::to_string(nb));
            }
        }
    }
    // As an ONNX parser passes attributes: int64 integers, strings without the NUL, extra attributes.
    SelectiveScanAttrs a;
    int64_t const zero = 0;
    char const last[] = {'l', 'a', 's', 't'};
    check(applyField(a, "delta_softplus", FieldKind::kINT64, &zero, 1).empty() && !a.deltaSoftplus,
        "int64 delta_softplus = 0");
    check(applyField(a, "mode", FieldKind::kCHAR, last, 4).empty() && a.lastOnly, "mode without NUL");
    check(applyField(a, "plugin_version", FieldKind::kCHAR, "1", 1).empty(), "unknown attribute ignored");
    check(!applyField(a, "mode", FieldKind::kCHAR, "first", 6).empty(), "mode 'first' rejected");
    check(!applyField(a, "delta_softplus", FieldKind::kCHAR, "1", 1).empty(), "string delta_softplus rejected");
    int32_t const seven = 7;
    check(!applyField(a, "nb_inputs", FieldKind::kINT32, &seven, 1).empty(), "nb_inputs = 7 rejected");
}

void testCudaVersions()
{
    std::string const old = checkCudaVersions(12040, 13000);
    check(contains(old, "built with CUDA 13.0") && contains(old, "supports CUDA up to 12.4"),
        "driver older than the runtime: both versions named (" + old + ")");
    check(checkCudaVersions(13010, 13000).empty(), "newer driver accepted");
    check(checkCudaVersions(0, 13000).empty(), "no driver: left to TensorRT");
}

//! enqueue of a deserialized plugin (attributes from the serialized fields), through the emulated launch,
//! against the CPU reference. Rows of different lengths (0, in range, over-long) make mode "last" depend
//! on lengths; B and C differ, so swapping them changes y.
template <typename T>
void testEnqueue(DType ioType, bool last, bool softplus, int32_t nbInputs, char const* label)
{
    int32_t const Bn = 3, Dn = 70, L = 37, N = 20;
    std::mt19937 rng(1234u + static_cast<unsigned>(last) * 7u + static_cast<unsigned>(nbInputs));
    std::normal_distribution<float> normal(0.F, 1.F);
    auto fill = [&](size_t n, float scale, float shift) {
        std::vector<float> v(n);
        for (auto& x : v)
        {
            x = shift + scale * normal(rng);
        }
        return v;
    };
    size_t const nx = static_cast<size_t>(Bn) * Dn * L, nbc = static_cast<size_t>(Bn) * N * L;
    auto u = fill(nx, 1.F, 0.F), delta = fill(nx, 0.2F, softplus ? 0.F : 0.4F), z = fill(nx, 1.F, 0.F);
    auto B = fill(nbc, 1.F, 0.F), C = fill(nbc, 1.F, 0.5F), D = fill(Dn, 1.F, 0.F), bias = fill(Dn, 0.1F, 0.1F);
    auto A = fill(static_cast<size_t>(Dn) * N, 0.5F, 0.F);
    for (auto& a : A)
    {
        a = -std::exp(a);
    }
    std::vector<int32_t> lengths = {L + 4, 0, 11};
    auto const ioU = emu::toIo<T>(u), ioDelta = emu::toIo<T>(delta), ioZ = emu::toIo<T>(z);
    auto const ioB = emu::toIo<T>(B), ioC = emu::toIo<T>(C);
    size_t const ny = last ? static_cast<size_t>(Bn) * Dn : nx;
    std::vector<T> y(ny, emu::fromF<T>(NAN));
    std::vector<float> want(ny, NAN);

    SelectiveScanAttrs built;
    built.deltaSoftplus = softplus;
    built.lastOnly = last;
    built.nbInputs = nbInputs;
    bool ok = false;
    SelectiveScanAttrs const attrs = roundTrip(built, ok); // as TensorRT deserializes it: no shape call yet

    TensorInfo info[10];
    makeInfo(info, ioType);
    int64_t const dims[9][3] = {{Bn, Dn, L}, {Bn, Dn, L}, {Dn, N}, {Bn, N, L}, {Bn, N, L}, {Dn}, {Bn, Dn, L}, {Dn},
        {Bn}};
    for (int i = 0; i < 9; ++i)
    {
        for (int j = 0; j < info[i].nbDims; ++j)
        {
            info[i].d[j] = dims[i][j];
        }
    }
    void const* inputs[9] = {ioU.data(), ioDelta.data(), A.data(), ioB.data(), ioC.data(), D.data(), ioZ.data(),
        bias.data(), nbInputs > 8 ? lengths.data() : nullptr};
    void* outputs[1] = {y.data()};
    std::string const why = enqueueScan(attrs, info, inputs, outputs, emu::emulatedLaunch);
    m4r_scan_cpu_f32(u.data(), delta.data(), A.data(), B.data(), C.data(), D.data(), z.data(), bias.data(),
        nbInputs > 8 ? lengths.data() : nullptr, Bn, Dn, L, N, softplus ? 1 : 0, last ? 1 : 0, want.data());
    double const err = emu::worstRelError(y, want);
    check(ok && why.empty() && err <= 1e-5,
        std::string("enqueue (emulated) vs CPU reference: ") + label + ", max rel err " + std::to_string(err)
            + (why.empty() ? "" : " (" + why + ")"));
}

void testEnqueueErrors()
{
    TensorInfo info[10];
    makeInfo(info, DType::kINT32);
    float buf[64]{};
    void const* inputs[9] = {buf, buf, buf, buf, buf, buf, buf, buf, buf};
    void* outputs[1] = {buf};
    bool launched = false;
    auto launch = [&](m4r::scan::ScanParams const&) {
        launched = true;
        return cudaSuccess;
    };
    SelectiveScanAttrs attrs;
    check(contains(enqueueScan(attrs, info, inputs, outputs, launch), "unsupported I/O data type") && !launched,
        "int32 I/O refused before launch");
    makeInfo(info, DType::kFLOAT);
    info[2].d[1] = 65;
    check(contains(enqueueScan(attrs, info, inputs, outputs, launch), "above 64") && !launched,
        "N = 65 refused before launch");
    makeInfo(info, DType::kFLOAT);
    auto failing = [](m4r::scan::ScanParams const&) { return cudaErrorInvalidDeviceFunction; };
    check(contains(enqueueScan(attrs, info, inputs, outputs, failing), "kernel launch failed"),
        "launch error reported");
}
//! seqlen 0 through the plugin's enqueue (README "Empty inputs"): mode "last" -> y = 0, never stale memory.
void testEnqueueSeqZero()
{
    int32_t const Bn = 2, Dn = 9, N = 4;
    std::vector<float> A(static_cast<size_t>(Dn) * N, -1.F), D(Dn, 1.F), bias(Dn, 0.F);
    std::vector<int32_t> lengths = {0, 3};
    float dummy = 1.F;
    for (bool last : {true, false})
    {
        std::vector<float> y(Bn * Dn, NAN);
        SelectiveScanAttrs attrs;
        attrs.lastOnly = last;
        attrs.nbInputs = 9;
        TensorInfo info[10];
        makeInfo(info, DType::kFLOAT);
        int64_t const dims[9][3] = {{Bn, Dn, 0}, {Bn, Dn, 0}, {Dn, N}, {Bn, N, 0}, {Bn, N, 0}, {Dn}, {Bn, Dn, 0},
            {Dn}, {Bn}};
        for (int i = 0; i < 9; ++i)
        {
            for (int j = 0; j < info[i].nbDims; ++j)
            {
                info[i].d[j] = dims[i][j];
            }
        }
        void const* inputs[9] = {&dummy, &dummy, A.data(), &dummy, &dummy, D.data(), &dummy, bias.data(),
            lengths.data()};
        void* outputs[1] = {y.data()};
        std::string const why = enqueueScan(attrs, info, inputs, outputs, emu::emulatedLaunch);
        bool zeros = true;
        for (float v : y)
        {
            zeros = zeros && (last ? v == 0.F : std::isnan(v)); // "all": y is empty, the buffer untouched
        }
        check(why.empty() && zeros,
            std::string("seqlen 0, mode ") + (last ? "last: y = 0" : "all: empty y, no launch")
                + (why.empty() ? "" : " (" + why + ")"));
    }
}
} // namespace

int main()
{
    testEnqueueSeqZero();
    testFormats();
    testDims();
    testFields();
    testCudaVersions();
    testEnqueue<float>(DType::kFLOAT, true, false, 9, "fp32 last softplus=0 lengths");
    testEnqueue<float>(DType::kFLOAT, false, true, 9, "fp32 all softplus=1 lengths");
    testEnqueue<__half>(DType::kHALF, true, true, 9, "fp16 last softplus=1 lengths");
    testEnqueue<__nv_bfloat16>(DType::kBF16, true, false, 8, "bf16 last softplus=0 no lengths");
    testEnqueueErrors();
    std::printf("%s (%d failures)\n", gFailures == 0 ? "PASS" : "FAIL", gFailures);
    return gFailures == 0 ? 0 : 1;
}
