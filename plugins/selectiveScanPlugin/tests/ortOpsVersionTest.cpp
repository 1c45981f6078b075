// libm4r_ort_ops.so loaded by an ONNX Runtime older than its headers: RegisterCustomOps must return an error
// status naming both versions (not crash, not register anything). The "runtime" here is a fake OrtApiBase
// that, like a real old onnxruntime, returns no API table for versions it does not know.
#include <onnxruntime_c_api.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <string>

namespace
{
std::string gMessage;
int gCreated = 0;

OrtStatus* ORT_API_CALL fakeCreateStatus(OrtErrorCode, char const* msg) NO_EXCEPTION
{
    gMessage = msg;
    ++gCreated;
    static int token;
    return reinterpret_cast<OrtStatus*>(&token);
}

OrtApi gApiV1{}; // only CreateStatus is filled in: all an old runtime's table needs to offer here

OrtApi const* ORT_API_CALL fakeGetApi(uint32_t version) NO_EXCEPTION
{
    return version <= 16 ? &gApiV1 : nullptr;
}

char const* ORT_API_CALL fakeVersion() NO_EXCEPTION
{
    return "1.16.3";
}
} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: %s libm4r_ort_ops.so\n", argv[0]);
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
    {
        std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
        return 1;
    }
    using Register = OrtStatus*(ORT_API_CALL*)(OrtSessionOptions*, OrtApiBase const*);
    auto reg = reinterpret_cast<Register>(dlsym(lib, "RegisterCustomOps"));
    if (reg == nullptr)
    {
        std::fprintf(stderr, "RegisterCustomOps is not exported\n");
        return 1;
    }
    gApiV1.CreateStatus = fakeCreateStatus;
    OrtApiBase base{fakeGetApi, fakeVersion};
    OrtStatus* status = reg(nullptr, &base);
    std::string const need = "needs onnxruntime >= 1." + std::to_string(ORT_API_VERSION);
    bool ok = status != nullptr && gCreated == 1 && gMessage.find(need) != std::string::npos
        && gMessage.find("1.16.3") != std::string::npos;
    std::printf("status message: %s\n", gMessage.c_str());
    if (!ok)
    {
        std::fprintf(stderr, "FAIL: expected an error status containing '%s' and '1.16.3'\n", need.c_str());
        return 1;
    }
    std::printf("PASS\n");
    return 0;
}
