// cuda backend: device, streams, caching allocator, error classes, cuBLAS GEMMs, CUDA graphs, op wrappers.
// The kernels themselves are in backend_elementwise.cu, backend_attention.cu and backend_moe.cu.
#include "kernels/cuda/cuda_backend.hpp"

#include <algorithm>
#include <chrono>
#include <thread>
#include <cstring>
#include <functional>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "kernels/cuda/cuda_backend_internal.cuh"

namespace petrel::kernels {

// -- errors -------------------------------------------------------------------------------------------------

namespace cudabe {

bool is_sticky(cudaError_t e) {
  switch (e) {
  case cudaErrorIllegalAddress:
  case cudaErrorLaunchFailure:
  case cudaErrorHardwareStackError:
  case cudaErrorIllegalInstruction:
  case cudaErrorMisalignedAddress:
  case cudaErrorInvalidAddressSpace:
  case cudaErrorInvalidPc:
  case cudaErrorAssert:
  case cudaErrorECCUncorrectable:
  case cudaErrorLaunchTimeout:
  case cudaErrorNvlinkUncorrectable:
  case cudaErrorContextIsDestroyed:
  case cudaErrorUnknown:
    return true;
  default:
    return false;
  }
}

[[noreturn]] static void die_sticky(cudaError_t e, const char* op) {
  std::fprintf(stderr,
               "petrel cuda backend: sticky CUDA error in %s: %s (%s). The CUDA context is unusable; the process exits "
               "with code %d so that its supervisor restarts it.\n",
               op, cudaGetErrorName(e), cudaGetErrorString(e), cuda_sticky_exit_code);
  std::fflush(stderr);
  std::_Exit(cuda_sticky_exit_code);
}

void check(cudaError_t e, const char* op) {
  if (e == cudaSuccess) return;
  if (is_sticky(e)) die_sticky(e, op);
  (void)cudaGetLastError(); // clear a recoverable error so that it does not leak into the next check
  std::string msg = std::string("cuda backend: ") + op + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  if (e == cudaErrorMemoryAllocation) throw cuda_oom_error(msg, int(e));
  throw cuda_error(msg, int(e));
}

void check_launch(const char* op) { check(cudaGetLastError(), op); }

} // namespace cudabe

using cudabe::check;

namespace {

void check_cublas(cublasStatus_t st, const char* op) {
  if (st == CUBLAS_STATUS_SUCCESS) return;
  // An execution failure may be a sticky device fault underneath: classify by the runtime's error.
  cudaError_t e = cudaPeekAtLastError();
  if (cudabe::is_sticky(e)) check(e, op);
  std::string msg = std::string("cuda backend: ") + op + ": cuBLAS " + cublasGetStatusName(st) + " (" +
                    cublasGetStatusString(st) + ")";
  if (st == CUBLAS_STATUS_ALLOC_FAILED) throw cuda_oom_error(msg, int(st));
  throw cuda_error(msg, int(st));
}

void require(bool ok, const char* op, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string("cuda backend: ") + op + ": " + what);
}

void require_view(const mat_view& v, const char* op, const char* name) {
  require(v.rows >= 0 && v.cols >= 0 && (v.rows <= 1 || v.ld >= v.cols), op,
          std::string(name) + " has a bad shape (rows " + std::to_string(v.rows) + ", cols " + std::to_string(v.cols) +
              ", ld " + std::to_string(v.ld) + ")");
  require(v.rows == 0 || v.cols == 0 || v.data != nullptr, op, std::string(name) + " is null");
}

} // namespace

int cuda_device_count(std::string* why) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (why) *why = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    (void)cudaGetLastError();
    return 0;
  }
  if (n == 0 && why) *why = "the driver reports no CUDA device";
  return n;
}

// -- state ---------------------------------------------------------------------------------------------------

struct cuda_backend::impl {
  cudaStream_t compute = nullptr, aux = nullptr;
  cublasHandle_t cublas = nullptr;
  void* cublas_ws = nullptr;
  int sms = 132;

  // Caching allocator: blocks by size class; stream order on `compute` makes immediate reuse safe.
  std::mutex mu;
  std::unordered_map<void*, size_t> live;               // pointer -> size class
  std::unordered_map<size_t, std::vector<void*>> cache; // size class -> free blocks
  cuda_allocator_stats stats;
  std::vector<std::pair<void*, size_t>> freed_in_capture;

  struct graph_entry {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    std::vector<std::pair<void*, size_t>> held; // blocks freed while capturing: the graph still uses them
  };
  std::map<int, graph_entry> graphs;
  int next_graph = 1;
  struct step_graph {
    int runs = 0;     // eager runs so far
    int graph = 0;    // id once captured
    bool eager_only = false;
  };
  std::map<uint64_t, step_graph> step_graphs;

  struct ws_slot {
    void* p = nullptr;
    size_t bytes = 0;
  };
  ws_slot ws[4];
  std::vector<void*> retired_ws; // outgrown workspaces, freed with the backend (see workspace())

  // Host copies go through pinned memory: a pageable copy blocks inside the driver until the stream reaches it,
  // and other threads' cudaMalloc then wait for the driver lock it holds. With EP ranks as threads sharing a GPU,
  // the stream may be waiting for exactly that other thread's next launch (a deadlock until the wait times out).
  // copy_to_device writes into a ring and records `ring_done` after each copy; a wrap waits for it first.
  static constexpr size_t bounce_bytes = size_t(8) << 20;
  char* bounce = nullptr;
  size_t ring_at = 0;
  cudaEvent_t ring_done = nullptr;
  std::function<void()> wait_hook; // set_wait_hook

  void flush_cache_locked() {
    for (auto& [cls, v] : cache)
      for (void* p : v) {
        cudaFree(p);
        stats.bytes_reserved -= cls;
      }
    stats.bytes_cached = 0;
    cache.clear();
  }
  void return_block_locked(void* p, size_t cls) {
    cache[cls].push_back(p);
    stats.bytes_cached += cls;
  }
};

size_t cuda_backend::size_class(size_t bytes) {
  if (bytes == 0) bytes = 1;
  constexpr size_t small = 512, large = size_t(2) << 20, boundary = size_t(1) << 20;
  if (bytes <= boundary) return (bytes + small - 1) / small * small;
  return (bytes + large - 1) / large * large;
}

cuda_backend::cuda_backend(int device, cuda_backend_options opt) : device_(device), opt_(opt), impl_(new impl) {
  std::string why;
  int count = cuda_device_count(&why);
  if (count == 0) throw std::invalid_argument("backend 'cuda': no CUDA device is present (" + why + ")");
  if (device < 0 || device >= count)
    throw std::invalid_argument("backend 'cuda:" + std::to_string(device) + "': no such device (this machine has " +
                                std::to_string(count) + ", numbered from 0)");
  check(cudaSetDevice(device_), "cudaSetDevice");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device_), "cudaGetDeviceProperties");
  impl_->sms = prop.multiProcessorCount;
  check(cudaStreamCreateWithFlags(&impl_->compute, cudaStreamNonBlocking), "cudaStreamCreate(compute)");
  check(cudaStreamCreateWithFlags(&impl_->aux, cudaStreamNonBlocking), "cudaStreamCreate(aux)");
  check_cublas(cublasCreate(&impl_->cublas), "cublasCreate");
  check_cublas(cublasSetStream(impl_->cublas, impl_->compute), "cublasSetStream");
  // A fixed workspace keeps cuBLAS from allocating inside a graph capture.
  check(cudaMalloc(&impl_->cublas_ws, opt_.cublas_workspace_bytes), "cudaMalloc(cuBLAS workspace)");
  check_cublas(cublasSetWorkspace(impl_->cublas, impl_->cublas_ws, opt_.cublas_workspace_bytes), "cublasSetWorkspace");
  check(cudaHostAlloc(reinterpret_cast<void**>(&impl_->bounce), impl::bounce_bytes, cudaHostAllocDefault),
        "cudaHostAlloc(copy bounce buffer)");
  check(cudaEventCreateWithFlags(&impl_->ring_done, cudaEventDisableTiming), "cudaEventCreate");
  set_allow_tf32(opt_.allow_tf32);
}

cuda_backend::~cuda_backend() {
  if (!impl_) return;
  // At process exit the runtime may already be unloading (a static backend): then there is nothing to free.
  if (cudaSetDevice(device_) != cudaSuccess) return;
  if (capturing_) {
    cudaGraph_t g = nullptr;
    cudaStreamEndCapture(impl_->compute, &g);
    if (g) cudaGraphDestroy(g);
  }
  cudaStreamSynchronize(impl_->compute);
  cudaStreamSynchronize(impl_->aux);
  for (auto& [id, g] : impl_->graphs) {
    if (g.exec) cudaGraphExecDestroy(g.exec);
    if (g.graph) cudaGraphDestroy(g.graph);
    for (auto& [p, cls] : g.held) cudaFree(p);
  }
  for (auto& [p, cls] : impl_->freed_in_capture) cudaFree(p);
  for (auto& w : impl_->ws) cudaFree(w.p);
  for (void* p : impl_->retired_ws) cudaFree(p);
  if (impl_->bounce) cudaFreeHost(impl_->bounce);
  if (impl_->ring_done) cudaEventDestroy(impl_->ring_done);
  impl_->flush_cache_locked();
  // Buffers still alive past their backend are freed here too: the device memory must go back.
  for (auto& [p, cls] : impl_->live) cudaFree(p);
  if (impl_->cublas) cublasDestroy(impl_->cublas);
  cudaFree(impl_->cublas_ws);
  cudaStreamDestroy(impl_->compute);
  cudaStreamDestroy(impl_->aux);
}

std::string cuda_backend::name() const { return "cuda:" + std::to_string(device_); }
void* cuda_backend::compute_stream() const { return impl_->compute; }
void* cuda_backend::aux_stream() const { return impl_->aux; }

void cuda_backend::set_allow_tf32(bool allow) {
  opt_.allow_tf32 = allow;
  check_cublas(cublasSetMathMode(impl_->cublas, allow ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_PEDANTIC_MATH),
               "cublasSetMathMode");
}

// -- memory --------------------------------------------------------------------------------------------------

device_buffer cuda_backend::allocate(size_t bytes) {
  check(cudaSetDevice(device_), "cudaSetDevice");
  const size_t cls = size_class(bytes);
  void* p = nullptr;
  {
    std::lock_guard lock(impl_->mu);
    auto& st = impl_->stats;
    st.allocations++;
    auto it = impl_->cache.find(cls);
    if (it != impl_->cache.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
      st.bytes_cached -= cls;
      st.cache_hits++;
    } else {
      cudaError_t e = cudaMalloc(&p, cls);
      if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        // Give the cached blocks back and try once more; blocks still in flight on the stream are safe to free
        // (cudaFree waits for the device).
        impl_->flush_cache_locked();
        st.cache_flushes++;
        e = cudaMalloc(&p, cls);
      }
      if (e != cudaSuccess) {
        if (e == cudaErrorMemoryAllocation) {
          (void)cudaGetLastError();
          size_t free_b = 0, total_b = 0;
          cudaMemGetInfo(&free_b, &total_b);
          throw cuda_oom_error("cuda backend: out of device memory allocating " + std::to_string(bytes) +
                                   " bytes on cuda:" + std::to_string(device_) + " (free " +
                                   std::to_string(free_b >> 20) + " MiB of " + std::to_string(total_b >> 20) +
                                   " MiB; this backend holds " + std::to_string(st.bytes_reserved >> 20) + " MiB)",
                               int(e));
        }
        check(e, "cudaMalloc");
      }
      st.device_mallocs++;
      st.bytes_reserved += cls;
    }
    impl_->live.emplace(p, cls);
    st.bytes_in_use += cls;
    if (st.bytes_in_use > st.peak_bytes_in_use) st.peak_bytes_in_use = st.bytes_in_use;
  }
  check(cudaMemsetAsync(p, 0, cls, impl_->compute), "allocate(zero fill)");
  return device_buffer(this, p, bytes);
}

void cuda_backend::deallocate(void* ptr, size_t) {
  if (!ptr) return;
  std::lock_guard lock(impl_->mu);
  auto it = impl_->live.find(ptr);
  if (it == impl_->live.end()) {
    std::fprintf(stderr, "petrel cuda backend: deallocate of a pointer this backend did not allocate (%p), ignored\n",
                 ptr);
    return;
  }
  const size_t cls = it->second;
  impl_->live.erase(it);
  impl_->stats.bytes_in_use -= cls;
  if (capturing_)
    impl_->freed_in_capture.emplace_back(ptr, cls);
  else
    impl_->return_block_locked(ptr, cls);
}

cuda_allocator_stats cuda_backend::allocator_stats() const {
  std::lock_guard lock(impl_->mu);
  return impl_->stats;
}

void cuda_backend::release_cached_memory() {
  check(cudaStreamSynchronize(impl_->compute), "release_cached_memory(synchronize)");
  std::lock_guard lock(impl_->mu);
  impl_->flush_cache_locked();
}

void* cuda_backend::workspace(int slot, size_t bytes) {
  auto& w = impl_->ws[slot];
  if (w.bytes >= bytes && w.p) return w.p;
  if (capturing_)
    throw cuda_error("cuda backend: an op needs " + std::to_string(bytes) +
                         " bytes of workspace during a graph capture; run the same step once before capturing",
                     int(cudaErrorStreamCaptureUnsupported));
  // The outgrown block is kept until the backend goes: freeing it now would wait for the whole device (cudaFree
  // synchronises), which never goes idle while a peer rank of this process spins in a receive.
  if (w.p) impl_->retired_ws.push_back(w.p);
  w.p = nullptr;
  w.bytes = 0;
  size_t want = size_class(bytes + bytes / 4);
  cudaError_t e = cudaMalloc(&w.p, want);
  if (e == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    std::lock_guard lock(impl_->mu);
    impl_->flush_cache_locked();
    e = cudaMalloc(&w.p, want);
  }
  check(e, "cudaMalloc(workspace)");
  w.bytes = want;
  return w.p;
}

namespace {

// The host waits for a stream or an event by polling, never inside cudaStreamSynchronize/cudaEventSynchronize.
// Measured on the H100 (a served EP group whose ranks are threads sharing one GPU): a rank blocked in
// cudaStreamSynchronize while its stream waited for a peer kept that peer's first cuBLAS call of a new shape (its
// algorithm heuristic enters the driver) from returning, so the peer never launched what the first rank waited
// for, until the plane's bounded wait failed the step. A query holds the driver only for the query.
// Every 32nd poll after the first 64 also runs the wait hook (set_wait_hook), which may throw.
cudaError_t poll_until_done(cudaError_t (*query)(void*), void* what, const std::function<void()>& hook) {
  for (unsigned spin = 0;; ++spin) {
    const cudaError_t e = query(what);
    if (e != cudaErrorNotReady) return e;
    if (spin < 64) {
      std::this_thread::yield();
      continue;
    }
    if (hook && spin % 32 == 0) hook();
    std::this_thread::sleep_for(std::chrono::microseconds(spin < 4096 ? 5 : 50));
  }
}
cudaError_t wait_stream(cudaStream_t s, const std::function<void()>& hook) {
  return poll_until_done([](void* p) { return cudaStreamQuery(static_cast<cudaStream_t>(p)); }, s, hook);
}
cudaError_t wait_event(cudaEvent_t ev, const std::function<void()>& hook) {
  return poll_until_done([](void* p) { return cudaEventQuery(static_cast<cudaEvent_t>(p)); }, ev, hook);
}

} // namespace

void cuda_backend::copy_to_device(void* dst, const void* src, size_t bytes) {
  if (!bytes) return;
  if (capturing_)
    throw cuda_error("cuda backend: copy_to_device cannot be captured in a CUDA graph; fill the input buffers before "
                     "replay_graph",
                     int(cudaErrorStreamCaptureUnsupported));
  // Staged through the pinned ring (see impl::bounce), so the caller may reuse `src` at once.
  auto* d = static_cast<char*>(dst);
  auto* s = static_cast<const char*>(src);
  constexpr size_t ring = impl::bounce_bytes;
  while (bytes > 0) {
    const size_t n = std::min(bytes, ring);
    if (impl_->ring_at + n > ring) {
      check(wait_event(impl_->ring_done, impl_->wait_hook), "copy_to_device(ring)");
      impl_->ring_at = 0;
    }
    char* stage = impl_->bounce + impl_->ring_at;
    std::memcpy(stage, s, n);
    check(cudaMemcpyAsync(d, stage, n, cudaMemcpyHostToDevice, impl_->compute), "copy_to_device");
    check(cudaEventRecord(impl_->ring_done, impl_->compute), "copy_to_device(event)");
    impl_->ring_at += (n + 255) / 256 * 256;
    d += n;
    s += n;
    bytes -= n;
  }
}

void cuda_backend::copy_to_host(void* dst, const void* src, size_t bytes) {
  if (!bytes) return;
  if (capturing_)
    throw cuda_error("cuda backend: copy_to_host cannot be captured in a CUDA graph",
                     int(cudaErrorStreamCaptureUnsupported));
  // Through the pinned bounce buffer (see impl::bounce). The stream orders this after every earlier upload that
  // still reads the ring, and once it is synchronised the whole ring is free again.
  auto* d = static_cast<char*>(dst);
  auto* s = static_cast<const char*>(src);
  while (bytes > 0) {
    const size_t n = std::min(bytes, impl::bounce_bytes);
    check(cudaMemcpyAsync(impl_->bounce, s, n, cudaMemcpyDeviceToHost, impl_->compute), "copy_to_host");
    check(wait_stream(impl_->compute, impl_->wait_hook), "copy_to_host(synchronize)");
    impl_->ring_at = 0;
    std::memcpy(d, impl_->bounce, n);
    d += n;
    s += n;
    bytes -= n;
  }
}

void cuda_backend::copy_device(void* dst, const void* src, size_t bytes) {
  if (!bytes || dst == src) return;
  auto d = static_cast<char*>(dst);
  auto s = static_cast<const char*>(src);
  if (d < s + bytes && s < d + bytes) { // overlapping (memmove semantics): go through a temporary
    void* tmp = workspace(3, bytes);
    check(cudaMemcpyAsync(tmp, src, bytes, cudaMemcpyDeviceToDevice, impl_->compute), "copy_device");
    src = tmp;
  }
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, impl_->compute), "copy_device");
}

void cuda_backend::fill_zero(void* dst, size_t bytes) {
  if (!bytes) return;
  check(cudaMemsetAsync(dst, 0, bytes, impl_->compute), "fill_zero");
}

namespace {
__global__ void trap_kernel() { __trap(); }
} // namespace

void cuda_backend::inject_device_fault() {
  check(cudaSetDevice(device_), "cudaSetDevice");
  trap_kernel<<<1, 1, 0, impl_->compute>>>();
  check(cudaGetLastError(), "inject_device_fault(launch)");
  check(cudaStreamSynchronize(impl_->compute), "inject_device_fault");
  throw std::runtime_error("cuda backend: the injected device fault did not fault"); // not reached on a GPU
}

void cuda_backend::synchronize() {
  if (capturing_) return; // nothing to wait for: the captured work has not run
  check(wait_stream(impl_->compute, impl_->wait_hook), "synchronize");
  check(wait_stream(impl_->aux, impl_->wait_hook), "synchronize(aux)");
}

void cuda_backend::set_wait_hook(std::function<void()> hook) { impl_->wait_hook = std::move(hook); }

void cuda_backend::bind_thread() { check(cudaSetDevice(device_), "cudaSetDevice"); }

// -- graphs --------------------------------------------------------------------------------------------------

void cuda_backend::begin_capture() {
  if (capturing_) throw std::logic_error("cuda backend: begin_capture while already capturing");
  check(cudaSetDevice(device_), "cudaSetDevice");
  // Relaxed: a cudaMalloc for a new block during the capture is allowed (the block stays with its owner).
  check(cudaStreamBeginCapture(impl_->compute, cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
  capturing_ = true;
}

int cuda_backend::end_capture() {
  if (!capturing_) throw std::logic_error("cuda backend: end_capture without begin_capture");
  capturing_ = false;
  impl::graph_entry g;
  cudaError_t e = cudaStreamEndCapture(impl_->compute, &g.graph);
  {
    std::lock_guard lock(impl_->mu);
    g.held.swap(impl_->freed_in_capture);
  }
  if (e != cudaSuccess) {
    if (g.graph) cudaGraphDestroy(g.graph);
    std::lock_guard lock(impl_->mu);
    for (auto& [p, cls] : g.held) impl_->return_block_locked(p, cls);
    check(e, "cudaStreamEndCapture");
  }
  e = cudaGraphInstantiate(&g.exec, g.graph, 0);
  if (e != cudaSuccess) {
    cudaGraphDestroy(g.graph);
    std::lock_guard lock(impl_->mu);
    for (auto& [p, cls] : g.held) impl_->return_block_locked(p, cls);
    check(e, "cudaGraphInstantiate");
  }
  int id = impl_->next_graph++;
  impl_->graphs.emplace(id, std::move(g));
  return id;
}

void cuda_backend::replay_graph(int id) {
  auto it = impl_->graphs.find(id);
  if (it == impl_->graphs.end()) throw std::invalid_argument("cuda backend: no graph " + std::to_string(id));
  check(cudaGraphLaunch(it->second.exec, impl_->compute), "cudaGraphLaunch");
}

void cuda_backend::destroy_graph(int id) {
  auto it = impl_->graphs.find(id);
  if (it == impl_->graphs.end()) return;
  check(cudaStreamSynchronize(impl_->compute), "destroy_graph(synchronize)");
  cudaGraphExecDestroy(it->second.exec);
  cudaGraphDestroy(it->second.graph);
  {
    std::lock_guard lock(impl_->mu);
    for (auto& [p, cls] : it->second.held) impl_->return_block_locked(p, cls);
  }
  impl_->graphs.erase(it);
}

bool cuda_backend::run_step_graph(uint64_t key, const std::function<void()>& step) {
  impl::step_graph& sg = impl_->step_graphs[key];
  if (sg.graph) {
    replay_graph(sg.graph);
    return true;
  }
  if (sg.runs == 0 || sg.eager_only) {
    step();
    sg.runs++;
    return false;
  }
  begin_capture();
  try {
    step();
  } catch (...) {
    // Abandon the capture: end it, drop the partial graph, give held blocks back; this key stays eager.
    capturing_ = false;
    cudaGraph_t g = nullptr;
    cudaStreamEndCapture(impl_->compute, &g);
    if (g) cudaGraphDestroy(g);
    (void)cudaGetLastError();
    {
      std::lock_guard lock(impl_->mu);
      for (auto& [p, cls] : impl_->freed_in_capture) impl_->return_block_locked(p, cls);
      impl_->freed_in_capture.clear();
    }
    sg.eager_only = true;
    throw;
  }
  sg.graph = end_capture();
  replay_graph(sg.graph); // the capture recorded the work without running it
  return true;
}

void cuda_backend::clear_step_graphs() {
  for (auto& [key, sg] : impl_->step_graphs)
    if (sg.graph) destroy_graph(sg.graph);
  impl_->step_graphs.clear();
}

// -- dense math ----------------------------------------------------------------------------------------------

void cuda_backend::gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                        int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  require(m >= 0 && n >= 0 && k >= 0, "gemm", "negative dimension");
  if (m == 0 || n == 0) return;
  require(ldc >= n, "gemm", "ldc < n");
  if (k == 0) {
    cudabe::launch_scale_mat(mat_view(c, m, n, ldc), beta, impl_->compute);
    return;
  }
  require(lda >= (trans_a ? m : k) && ldb >= (trans_b ? k : n), "gemm", "leading dimension too small");
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the flags.
  check_cublas(cublasSgemm_64(impl_->cublas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                              n, m, k, &alpha, b, ldb, a, lda, &beta, c, ldc),
               "gemm(cublasSgemm)");
}

void cuda_backend::embedding(const int32_t* ids, int64_t n, const float* table, int64_t hidden, float* out) {
  if (n <= 0 || hidden <= 0) return;
  cudabe::launch_embedding(ids, n, table, hidden, out, impl_->compute);
}

void cuda_backend::rmsnorm(const mat_view& x, const float* w, float eps, const mat_view& out) {
  require_view(x, "rmsnorm", "x");
  require_view(out, "rmsnorm", "out");
  require(out.rows == x.rows && out.cols == x.cols, "rmsnorm", "out shape differs from x");
  if (x.rows == 0 || x.cols == 0) return;
  cudabe::launch_rmsnorm(x, w, eps, out, impl_->compute);
}

void cuda_backend::copy_mat(const mat_view& src, const mat_view& dst) {
  require_view(src, "copy_mat", "src");
  require_view(dst, "copy_mat", "dst");
  require(src.rows == dst.rows && src.cols == dst.cols, "copy_mat", "shapes differ");
  if (src.rows == 0 || src.cols == 0) return;
  // A single row may have ld < cols; the pitch then only has to cover the row.
  const size_t dpitch = size_t(std::max(dst.ld, dst.cols)) * sizeof(float),
               spitch = size_t(std::max(src.ld, src.cols)) * sizeof(float);
  check(cudaMemcpy2DAsync(dst.data, dpitch, src.data, spitch,
                          size_t(src.cols) * sizeof(float), size_t(src.rows), cudaMemcpyDeviceToDevice,
                          impl_->compute),
        "copy_mat");
}

void cuda_backend::add_inplace(const mat_view& x, const mat_view& y) {
  require_view(x, "add_inplace", "x");
  require_view(y, "add_inplace", "y");
  require(x.rows == y.rows && x.cols == y.cols, "add_inplace", "shapes differ");
  if (x.rows == 0 || x.cols == 0) return;
  cudabe::launch_add_inplace(x, y, impl_->compute);
}

void cuda_backend::silu_mul(const mat_view& gu, int64_t inter, const mat_view& out) {
  require_view(gu, "silu_mul", "gate_up");
  require_view(out, "silu_mul", "out");
  require(gu.cols >= 2 * inter && out.cols >= inter && out.rows == gu.rows, "silu_mul", "shapes do not fit inter");
  if (gu.rows == 0 || inter == 0) return;
  cudabe::launch_silu_mul(gu, inter, out, impl_->compute);
}

void cuda_backend::rope_cos_sin(const int32_t* pos, int64_t n, const float* inv_freq, int64_t rope_dim, float af,
                                float* cs) {
  require(rope_dim % 2 == 0, "rope_cos_sin", "odd rope_dim");
  if (n <= 0 || rope_dim == 0) return;
  cudabe::launch_rope_cos_sin(pos, n, inv_freq, rope_dim, af, cs, impl_->compute);
}

void cuda_backend::rope_interleaved(const mat_view& x, int64_t heads, int64_t head_stride, int64_t offset,
                                    int64_t rope_dim, const float* cs) {
  require_view(x, "rope_interleaved", "x");
  require(rope_dim % 2 == 0, "rope_interleaved", "odd rope_dim");
  if (x.rows == 0 || heads == 0 || rope_dim == 0) return;
  cudabe::launch_rope_interleaved(x, heads, head_stride, offset, rope_dim, cs, impl_->compute);
}

// -- MLA -----------------------------------------------------------------------------------------------------

void cuda_backend::kv_store(const kv_pool_geometry& pool, int32_t layer, const int32_t* slots, int64_t n,
                            const mat_view& src) {
  require(layer >= 0 && layer < pool.num_layers, "kv_store", "layer out of range");
  require(src.cols >= pool.entry_floats || n == 0, "kv_store", "src narrower than a latent entry");
  if (n <= 0) return;
  cudabe::launch_kv_copy(pool, layer, slots, n, src, true, impl_->compute);
}

void cuda_backend::kv_gather(const kv_pool_geometry& pool, int32_t layer, const int32_t* slots, int64_t n,
                             const mat_view& dst) {
  require(layer >= 0 && layer < pool.num_layers, "kv_gather", "layer out of range");
  require(dst.cols >= pool.entry_floats || n == 0, "kv_gather", "dst narrower than a latent entry");
  if (n <= 0) return;
  cudabe::launch_kv_copy(pool, layer, slots, n, dst, false, impl_->compute);
}

void cuda_backend::mla_prefill_attention(const mat_view& q, const mat_view& kv, const mat_view& k_pe,
                                         const mat_view& out, int64_t heads, int64_t nope, int64_t rope,
                                         int64_t v_dim, int64_t start, float scale, float*) {
  require_view(q, "mla_prefill_attention", "q");
  require_view(kv, "mla_prefill_attention", "kv");
  require_view(out, "mla_prefill_attention", "out");
  require(q.cols >= heads * (nope + rope) && kv.cols >= heads * (nope + v_dim) && out.cols >= heads * v_dim &&
              kv.rows >= start + q.rows && out.rows == q.rows && start >= 0,
          "mla_prefill_attention", "shapes do not fit heads/nope/rope/v_dim/start");
  require(nope + rope <= 256 && v_dim <= 256, "mla_prefill_attention", "head dims above 256 are not supported");
  if (q.rows == 0 || heads == 0) return;
  cudabe::launch_mla_prefill(q, kv, k_pe, out, heads, nope, rope, v_dim, start, scale, impl_->compute);
}

void cuda_backend::mla_decode_attention(const kv_pool_geometry& pool, int32_t layer, const decode_attention_batch& b,
                                        const mat_view& q_abs, const mat_view& out_lat, int64_t heads,
                                        int64_t kv_lora, float scale, float*) {
  require(layer >= 0 && layer < pool.num_layers, "mla_decode_attention", "layer out of range");
  require(kv_lora <= pool.entry_floats && kv_lora <= 512, "mla_decode_attention",
          "kv_lora must be <= the entry width and <= 512");
  require(q_abs.cols >= heads * pool.entry_floats && out_lat.cols >= heads * kv_lora, "mla_decode_attention",
          "q_abs / out_lat narrower than heads x entry / kv_lora");
  require(b.max_ctx >= 1 || b.batch == 0, "mla_decode_attention", "max_ctx < 1");
  if (b.batch <= 0 || heads == 0) return;
  cudabe::decode_plan plan = cudabe::plan_mla_decode(b.batch, heads, kv_lora, b.max_ctx, impl_->sms);
  float* ws = static_cast<float*>(workspace(0, plan.workspace_floats * sizeof(float)));
  cudabe::launch_mla_decode(pool, layer, b, q_abs, out_lat, heads, kv_lora, scale, plan, ws, impl_->compute);
}

// -- MoE -----------------------------------------------------------------------------------------------------

void cuda_backend::route_noaux_tc(const mat_view& logits, const float* bias, const route_params& p, int32_t* ids,
                                  float* w) {
  require_view(logits, "route_noaux_tc", "logits");
  const int G = p.n_group < 1 ? 1 : p.n_group;
  require(p.num_experts >= 1 && p.num_experts <= 1024 && p.num_experts % G == 0 && G <= 32 && p.topk_group >= 1 &&
              p.topk_group <= G && p.top_k >= 1 && p.top_k <= 32 &&
              p.top_k <= int64_t(p.topk_group) * (p.num_experts / G) && logits.cols >= p.num_experts,
          "route_noaux_tc", "unsupported routing parameters (experts <= 1024, groups <= 32, top_k <= 32)");
  if (logits.rows == 0) return;
  cudabe::launch_route_noaux_tc(logits, bias, p, ids, w, impl_->compute);
}

void cuda_backend::gather_rows(const mat_view& src, const int32_t* rows, int64_t n, const mat_view& dst) {
  require(dst.cols >= src.cols, "gather_rows", "dst narrower than src");
  if (n <= 0 || src.cols == 0) return;
  cudabe::launch_copy_rows(src, rows, dst, nullptr, n, impl_->compute);
}

void cuda_backend::scatter_rows(const mat_view& src, const int32_t* rows, int64_t n, const mat_view& dst) {
  require(dst.cols >= src.cols, "scatter_rows", "dst narrower than src");
  if (n <= 0 || src.cols == 0) return;
  cudabe::launch_copy_rows(src, nullptr, dst, rows, n, impl_->compute);
}

void cuda_backend::scatter_add_rows(const mat_view& src, const int32_t* rows, const float* w, int64_t n,
                                    const mat_view& dst) {
  require(dst.cols >= src.cols, "scatter_add_rows", "dst narrower than src");
  require(n < (int64_t(1) << 31), "scatter_add_rows", "more than 2^31 rows");
  if (n <= 0 || src.cols == 0) return;
  size_t tb = cudabe::scatter_add_temp_bytes(n);
  void* temp = workspace(1, tb);
  cudabe::launch_scatter_add_rows(src, rows, w, n, dst, temp, tb, impl_->compute);
}

void cuda_backend::moe_permute(const int32_t* topk_ids, const float* topk_w, int64_t tokens, int64_t top_k,
                               int64_t num_experts, int32_t* offsets, int32_t* perm_rows, float* perm_w) {
  require(tokens >= 0 && top_k >= 1 && num_experts >= 1 && tokens * top_k < (int64_t(1) << 31), "moe_permute",
          "bad sizes");
  void* temp = workspace(2, cudabe::moe_permute_temp_bytes(tokens * top_k));
  cudabe::launch_moe_permute(topk_ids, topk_w, tokens, top_k, num_experts, offsets, perm_rows, perm_w, temp,
                             impl_->compute);
}

void cuda_backend::grouped_expert_ffn(const int32_t* offsets, int64_t num_experts, const float* const* gate_up_w,
                                      const float* const* down_w, int64_t hidden, int64_t inter, int64_t max_rows,
                                      const mat_view& x, float* gu, float* act, const mat_view& y) {
  require(num_experts >= 1 && hidden >= 1 && inter >= 1 && max_rows >= 0 && max_rows < (int64_t(1) << 31) &&
              x.cols >= hidden && y.cols >= hidden && hidden < (int64_t(1) << 31) && inter < (int64_t(1) << 30),
          "grouped_expert_ffn", "bad sizes");
  if (max_rows == 0) return;
  cudabe::launch_grouped_expert_ffn(offsets, num_experts, gate_up_w, down_w, hidden, inter, max_rows, x, gu, act, y,
                                    impl_->compute);
}

namespace {
__global__ void expert_histogram_kernel(const int32_t* __restrict__ ids, int64_t n, int64_t top_k,
                                        const int32_t* __restrict__ valid, int32_t* counts) {
  const int64_t lim = min(n, int64_t(*valid) * top_k);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < lim; i += int64_t(gridDim.x) * blockDim.x)
    atomicAdd(counts + ids[i], 1);
}
} // namespace

void cuda_backend::expert_histogram(const int32_t* ids, int64_t n, int64_t top_k, const int32_t* valid,
                                    int32_t* counts) {
  require(n >= 0 && top_k >= 1, "expert_histogram", "bad sizes");
  if (n == 0) return;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((n + threads - 1) / threads, 1024));
  expert_histogram_kernel<<<blocks, threads, 0, static_cast<cudaStream_t>(compute_stream())>>>(ids, n, top_k, valid,
                                                                                               counts);
  check(cudaGetLastError(), "expert_histogram");
}

} // namespace petrel::kernels
