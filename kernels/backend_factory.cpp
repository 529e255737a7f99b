// make_backend: the one place that knows which backends are built in.
//   "cpu"               the reference backend (always)
//   "cuda" | "cuda:N"   the CUDA backend on device 0 | N (builds with CUDA only; PETREL_HAVE_CUDA comes from the
//                       petrel_kernels_cuda target). PETREL_CUDA_TF32=1 in the environment lets its fp32 GEMMs use
//                       TF32 tensor cores.
#include <cstdlib>
#include <stdexcept>

#include "kernels/cpu/cpu_backend.hpp"
#include "runtime/backend.hpp"

#ifdef PETREL_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "kernels/cuda/cuda_backend.hpp"
#endif

namespace petrel {

namespace {

/// Device index of "cuda" (0) or "cuda:N"; -1 when `name` is not of that form.
int cuda_device_index(const std::string& name) {
  if (name == "cuda") return 0;
  if (name.rfind("cuda:", 0) != 0 || name.size() == 5 || name.size() > 9) return -1;
  int v = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    v = v * 10 + (name[i] - '0');
  }
  return v;
}

} // namespace

int cuda_device_count() {
#ifdef PETREL_HAVE_CUDA
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
#else
  return 0;
#endif
}

std::string rank_backend_name(const std::string& name, int rank) {
  if (name != "cuda:each") return name;
  const int n = cuda_device_count();
  if (n < 1) throw std::invalid_argument("backend 'cuda:each' (a GPU per rank) but no CUDA device is visible");
  return "cuda:" + std::to_string(rank % n);
}

std::unique_ptr<backend> make_backend(const std::string& name) {
  if (name == "cpu") return std::make_unique<kernels::cpu_backend>();
  const int device = cuda_device_index(name);
  if (device >= 0) {
#ifdef PETREL_HAVE_CUDA
    kernels::cuda_backend_options opt;
    const char* tf32 = std::getenv("PETREL_CUDA_TF32");
    opt.allow_tf32 = tf32 && tf32[0] == '1';
    return std::make_unique<kernels::cuda_backend>(device, opt); // std::invalid_argument when there is no such GPU
#else
    throw std::invalid_argument("backend '" + name +
                                "' is not built in: this build has no CUDA (configure with -DPETREL_CUDA=ON on a "
                                "machine with nvcc), use --backend cpu");
#endif
  }
  if (name.rfind("cuda", 0) == 0)
    throw std::invalid_argument("bad backend name '" + name + "' (expected cuda or cuda:N with N a device number)");
  throw std::invalid_argument("unknown backend '" + name + "' (known: cpu, cuda, cuda:N)");
}

} // namespace petrel

#ifndef PETREL_HAVE_CUDA
#include "runtime/ep_device_plane.hpp"

namespace petrel::ep {
// Without CUDA there is no device plane (kernels/cuda/ep_device_plane.cu defines it in CUDA builds).
std::unique_ptr<device_plane> make_device_plane(backend& be, const device_plane_config&) {
  throw std::invalid_argument("the GPU expert exchange (cuda_ipc) needs the cuda backend; this build has no CUDA and "
                              "this rank runs '" + be.name() + "'");
}
std::vector<uint8_t> make_device_plane_bootstrap(device_exchange_kind kind) {
  if (kind == device_exchange_kind::cuda_ipc) return {};
  throw std::runtime_error("the NCCL expert exchange needs a build with CUDA");
}
} // namespace petrel::ep
#endif
