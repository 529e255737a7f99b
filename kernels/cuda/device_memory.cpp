// device_memory on CUDA: pointer queries, copies on the calling thread's per-thread stream, pinned host memory
// and CUDA IPC handles. Used by the KV transfer engine (staged and IPC paths) and the kv_agent (checksums).
#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/device_memory.hpp"

namespace petrel::device_memory {

namespace {

void check(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) {
    cudaGetLastError(); // a failed call here must not poison the next, unrelated one
    throw std::runtime_error(what + ": " + cudaGetErrorString(e));
  }
}

/// False (once and for all) on a machine without a usable GPU, so host-only nodes never pay for CUDA.
bool have_devices() {
  static const bool yes = [] {
    int n = 0;
    bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
    cudaGetLastError();
    return ok;
  }();
  return yes;
}

/// Makes the device a copy runs on current for this thread: the destination's when it is a GPU's.
void select_device_for(void* dst, const void* src) {
  int d = device_of(dst);
  if (d < 0)
    d = device_of(src);
  if (d >= 0)
    check(cudaSetDevice(d), "cudaSetDevice(" + std::to_string(d) + ")");
}

} // namespace

bool built_with_cuda() { return true; }

bool is_device(const void* p) { return device_of(p) >= 0; }

int device_of(const void* p) {
  if (!p || !have_devices())
    return -1;
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return a.type == cudaMemoryTypeDevice ? a.device : -1;
}

void copy_ranges(void* dst_base, const void* src_base, const std::vector<copy_range>& ranges) {
  if (ranges.empty())
    return;
  select_device_for(dst_base, src_base);
  auto* dst = static_cast<uint8_t*>(dst_base);
  auto* src = static_cast<const uint8_t*>(src_base);
  for (auto& r : ranges)
    check(cudaMemcpyAsync(dst + r.dst_offset, src + r.src_offset, r.length, cudaMemcpyDefault, cudaStreamPerThread),
          "cudaMemcpyAsync of " + std::to_string(r.length) + " bytes");
  check(cudaStreamSynchronize(cudaStreamPerThread), "cudaStreamSynchronize after a KV copy");
}

void copy(void* dst, const void* src, size_t n) { copy_ranges(dst, src, {copy_range{0, 0, n}}); }

void* alloc_device(size_t n, int device) {
  check(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
  void* p = nullptr;
  check(cudaMalloc(&p, n), "cudaMalloc(" + std::to_string(n) + " bytes)");
  check(cudaMemset(p, 0, n), "cudaMemset");
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  return p;
}

void free_device(void* p) {
  if (p)
    cudaFree(p);
}

void* alloc_pinned(size_t n) {
  void* p = nullptr;
  check(cudaHostAlloc(&p, n, cudaHostAllocPortable), "cudaHostAlloc(" + std::to_string(n) + " bytes)");
  std::memset(p, 0, n);
  return p;
}

void free_pinned(void* p) {
  if (p)
    cudaFreeHost(p);
}

ipc_export export_ipc(const void* p) {
  int d = device_of(p);
  if (d < 0)
    throw std::runtime_error("CUDA IPC export: the pointer is not device memory");
  check(cudaSetDevice(d), "cudaSetDevice");
  cudaIpcMemHandle_t h{};
  check(cudaIpcGetMemHandle(&h, const_cast<void*>(p)), "cudaIpcGetMemHandle");
  ipc_export out;
  out.handle.assign(reinterpret_cast<const uint8_t*>(&h), reinterpret_cast<const uint8_t*>(&h) + sizeof h);
  out.device = d;
  return out;
}

void* open_ipc(const std::vector<uint8_t>& handle, int device) {
  cudaIpcMemHandle_t h{};
  if (handle.size() != sizeof h)
    throw std::runtime_error("CUDA IPC open: a handle has " + std::to_string(sizeof h) + " bytes, got " +
                             std::to_string(handle.size()));
  if (!have_devices())
    throw std::runtime_error("CUDA IPC open: this process sees no GPU");
  int n = 0;
  check(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
  // Map on the exporter's device when this process sees it; peer access is enabled lazily either way.
  check(cudaSetDevice(device >= 0 && device < n ? device : 0), "cudaSetDevice");
  std::memcpy(&h, handle.data(), sizeof h);
  void* p = nullptr;
  check(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
  return p;
}

void close_ipc(void* mapped) {
  if (mapped)
    cudaIpcCloseMemHandle(mapped);
}

} // namespace petrel::device_memory
