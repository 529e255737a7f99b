// The NCCL expert all-to-all (ep_nccl.hpp).
#include "kernels/cuda/ep_nccl.hpp"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "kernels/cuda/fp8_layout.hpp"
#include "kernels/cuda/nccl_api.hpp"

namespace petrel::cuda {
namespace {

constexpr int route_threads = 1024;
constexpr int max_nccl_ranks = 64;

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("NCCL expert exchange: ") + what + ": " + cudaGetErrorString(e));
}

/// Byte layout of one dispatched (token, destination) record: fp8 row, its scales, local top-k ids and weights,
/// the source token index; 16-byte aligned so the row copies are vector loads.
struct record_layout {
  std::int64_t hidden = 0, topk = 0;
  __host__ __device__ std::int64_t scales() const { return hidden; }
  __host__ __device__ std::int64_t ids() const { return scales() + (hidden / fp8_block) * 4; }
  __host__ __device__ std::int64_t weights() const { return ids() + topk * 4; }
  __host__ __device__ std::int64_t src() const { return weights() + topk * 4; }
  __host__ __device__ std::int64_t bytes() const { return (src() + 4 + 15) / 16 * 16; }
};

// One block. pos[t * N + d] = the position of token t in destination d's list (token order), -1 when none of its
// top-k slots lives on d; counts[d] = the list's length; send_off[d] = its first record.
__global__ void __launch_bounds__(route_threads) route_kernel(const int* __restrict__ slots, int tokens, int k,
                                                              int ranks, int per_rank, int experts, int* pos,
                                                              int* counts, int* send_off) {
  using scan = cub::BlockScan<int, route_threads>;
  __shared__ typename scan::TempStorage tmp;
  __shared__ int running;
  for (int d = 0; d < ranks; ++d) {
    if (threadIdx.x == 0) running = 0;
    __syncthreads();
    for (int base = 0; base < tokens; base += route_threads) {
      const int t = base + int(threadIdx.x);
      int flag = 0;
      if (t < tokens)
        for (int j = 0; j < k; ++j) {
          const int s = slots[int64_t(t) * k + j];
          if (s >= 0 && s < experts && s / per_rank == d) flag = 1;
        }
      int prefix = 0, total = 0;
      scan(tmp).ExclusiveSum(flag, prefix, total);
      if (t < tokens) pos[int64_t(t) * ranks + d] = flag ? running + prefix : -1;
      __syncthreads();
      if (threadIdx.x == 0) running += total;
      __syncthreads();
    }
    if (threadIdx.x == 0) counts[d] = running;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int d = 0; d < ranks; ++d) {
      send_off[d] = acc;
      acc += counts[d];
    }
    send_off[ranks] = acc;
  }
}

// Block per token: one record per destination that token goes to.
__global__ void pack_kernel(const uint8_t* __restrict__ x, const float* __restrict__ scales, int64_t scale_ld,
                            const int* __restrict__ slots, const float* __restrict__ weights, const int* __restrict__ pos,
                            const int* __restrict__ send_off, int tokens, int k, int ranks, int per_rank, int experts,
                            record_layout rl, uint8_t* __restrict__ out) {
  const int64_t H = rl.hidden;
  for (int t = blockIdx.x; t < tokens; t += gridDim.x)
    for (int d = 0; d < ranks; ++d) {
      const int p = pos[int64_t(t) * ranks + d];
      if (p < 0) continue;
      uint8_t* rec = out + (int64_t(send_off[d]) + p) * rl.bytes();
      const uint4* src = reinterpret_cast<const uint4*>(x + int64_t(t) * H);
      for (int64_t i = threadIdx.x; i < H / 16; i += blockDim.x) reinterpret_cast<uint4*>(rec)[i] = src[i];
      float* rs = reinterpret_cast<float*>(rec + rl.scales());
      for (int64_t b = threadIdx.x; b < H / fp8_block; b += blockDim.x) rs[b] = scales[b * scale_ld + t];
      int* ri = reinterpret_cast<int*>(rec + rl.ids());
      float* rw = reinterpret_cast<float*>(rec + rl.weights());
      for (int j = threadIdx.x; j < k; j += blockDim.x) {
        const int s = slots[int64_t(t) * k + j];
        const bool here = s >= 0 && s < experts && s / per_rank == d;
        ri[j] = here ? s - d * per_rank : -1;
        rw[j] = here ? weights[int64_t(t) * k + j] : 0.0f;
      }
      if (threadIdx.x == 0) *reinterpret_cast<int*>(rec + rl.src()) = t;
    }
}

// Block per received record: into the arrays of ep_normal_recv.
__global__ void unpack_kernel(const uint8_t* __restrict__ in, int64_t rows, int k, record_layout rl, int64_t scale_ld,
                              uint8_t* __restrict__ x, float* __restrict__ scales, int* __restrict__ idx,
                              float* __restrict__ w, int* __restrict__ src) {
  const int64_t H = rl.hidden;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const uint8_t* rec = in + r * rl.bytes();
    const uint4* xs = reinterpret_cast<const uint4*>(rec);
    for (int64_t i = threadIdx.x; i < H / 16; i += blockDim.x) reinterpret_cast<uint4*>(x + r * H)[i] = xs[i];
    const float* rs = reinterpret_cast<const float*>(rec + rl.scales());
    for (int64_t b = threadIdx.x; b < H / fp8_block; b += blockDim.x) scales[b * scale_ld + r] = rs[b];
    const int* ri = reinterpret_cast<const int*>(rec + rl.ids());
    const float* rw = reinterpret_cast<const float*>(rec + rl.weights());
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
      idx[r * k + j] = ri[j];
      w[r * k + j] = rw[j];
    }
    if (threadIdx.x == 0) src[r] = *reinterpret_cast<const int*>(rec + rl.src());
  }
}

// out[t] = sum over destinations d in rank order of the bf16 row d sent back for t (fp32).
__global__ void reduce_kernel(const __nv_bfloat16* __restrict__ back, const int* __restrict__ pos,
                              const int* __restrict__ send_off, int tokens, int ranks, int64_t hidden,
                              float* __restrict__ out) {
  for (int t = blockIdx.x; t < tokens; t += gridDim.x)
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
      float acc = 0.0f;
      for (int d = 0; d < ranks; ++d) {
        const int p = pos[int64_t(t) * ranks + d];
        if (p >= 0) acc += __bfloat162float(back[(int64_t(send_off[d]) + p) * hidden + c]);
      }
      out[int64_t(t) * hidden + c] = acc;
    }
}

unsigned blocks_for(int64_t n) { return unsigned(std::clamp<int64_t>(n, 1, 65535)); }

// The exchange's device is current for the scope of a call (a thread may drive ranks of several GPUs).
struct device_guard {
  int prev = -1;
  explicit device_guard(int d) {
    cudaGetDevice(&prev);
    if (prev != d) cudaSetDevice(d);
  }
  ~device_guard() {
    int now = -1;
    cudaGetDevice(&now);
    if (now != prev && prev >= 0) cudaSetDevice(prev);
  }
};

} // namespace

// -- state ----------------------------------------------------------------------------------------------------------

struct nccl_rows::state {
  struct buffer {
    void* p = nullptr;
    std::size_t cap = 0;
  };
  struct micro_batch {
    int tokens = 0;
    std::int64_t received = 0, capacity = 1;
    std::vector<int> send_off, recv_off, send_count, recv_count; // host, per rank
    int* counts_h = nullptr;      // pinned [2N]: send counts, receive counts
    int* recv_off_h = nullptr;    // pinned [N+1], uploaded as rank_offsets
    buffer pos, send_off_d, counts_d, send_rec, recv_rec, x, scales, idx, w, src, rank_off, back;
  };
  struct pending {
    cudaEvent_t done = nullptr;
    std::chrono::steady_clock::time_point deadline;
    std::string what;
  };

  const nccl_api& api = nccl_api::get();
  std::timed_mutex mu;            // held while this rank enqueues NCCL calls; abort takes it to free the comm
  ncclComm_t comm = nullptr;
  std::atomic<bool> failed{false};
  mutable std::mutex failure_mu;
  std::string failure;
  micro_batch mb[2];
  std::size_t bytes = 0;

  std::mutex dog_mu;
  std::condition_variable dog_cv;
  std::deque<pending> queue;
  bool stop = false;
  std::thread dog;

  void fail(const std::string& why) {
    {
      std::lock_guard<std::mutex> g(failure_mu);
      if (failure.empty()) failure = why;
    }
    failed = true;
  }
  std::string failure_text() const {
    std::lock_guard<std::mutex> g(failure_mu);
    return failure;
  }
};

std::vector<std::uint8_t> nccl_rows::make_unique_id() {
  const nccl_api& api = nccl_api::get();
  if (!api.ok()) throw std::runtime_error("NCCL expert exchange: " + api.load_error());
  ncclUniqueId id{};
  api.check(api.get_unique_id(&id), "ncclGetUniqueId");
  std::vector<std::uint8_t> out(sizeof(id));
  std::memcpy(out.data(), &id, sizeof(id));
  return out;
}

nccl_rows::nccl_rows(const nccl_rows_config& cfg) : st_(std::make_unique<state>()), cfg_(cfg) {
  if (cfg.ranks < 1 || cfg.ranks > max_nccl_ranks || cfg.rank < 0 || cfg.rank >= cfg.ranks)
    throw std::invalid_argument("NCCL expert exchange: rank " + std::to_string(cfg.rank) + " of " +
                                std::to_string(cfg.ranks) + " (1 to " + std::to_string(max_nccl_ranks) + " ranks)");
  if (cfg.hidden <= 0 || cfg.hidden % fp8_block != 0)
    throw std::invalid_argument("NCCL expert exchange: hidden must be a positive multiple of 128");
  if (cfg.experts <= 0 || cfg.experts % cfg.ranks != 0)
    throw std::invalid_argument("NCCL expert exchange: expert slots must divide by the ranks");
  if (cfg.topk < 1 || cfg.topk > 32) throw std::invalid_argument("NCCL expert exchange: top-k must be 1 to 32");
  if (cfg.micro_batches < 1 || cfg.micro_batches > 2)
    throw std::invalid_argument("NCCL expert exchange: 1 or 2 micro-batches");
  if (!st_->api.ok()) throw std::runtime_error("NCCL expert exchange: " + st_->api.load_error());
  if (cfg_.device < 0) cuda_ok(cudaGetDevice(&cfg_.device), "cudaGetDevice");
  cuda_ok(cudaSetDevice(cfg_.device), "cudaSetDevice");
  cuda_ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  const int N = cfg.ranks;
  for (int m = 0; m < cfg.micro_batches; ++m) {
    auto& b = st_->mb[m];
    cuda_ok(cudaMallocHost(&b.counts_h, sizeof(int) * 2 * N), "cudaMallocHost");
    cuda_ok(cudaMallocHost(&b.recv_off_h, sizeof(int) * (N + 1)), "cudaMallocHost");
  }
  // The watchdog: every enqueued NCCL operation must finish within timeout_s, and NCCL's asynchronous errors are
  // noticed, both without the rank's thread (which may be blocked on a stream that waits for NCCL).
  st_->dog = std::thread([this] {
    cudaSetDevice(cfg_.device);
    state& s = *st_;
    std::unique_lock<std::mutex> lk(s.dog_mu);
    while (!s.stop) {
      s.dog_cv.wait_for(lk, std::chrono::milliseconds(20));
      while (!s.queue.empty()) {
        const cudaError_t q = cudaEventQuery(s.queue.front().done);
        if (q == cudaErrorNotReady) {
          if (std::chrono::steady_clock::now() > s.queue.front().deadline && !s.failed) {
            const std::string what = s.queue.front().what;
            lk.unlock();
            abort(stalled(what));
            lk.lock();
          }
          break;
        }
        cudaEventDestroy(s.queue.front().done);
        s.queue.pop_front();
      }
      if (!s.failed && s.mu.try_lock()) {
        ncclResult_t async = ncclSuccess;
        if (s.comm) s.api.comm_get_async_error(s.comm, &async);
        s.mu.unlock();
        if (async != ncclSuccess && async != ncclInProgress) {
          lk.unlock();
          abort(std::string("NCCL reported an asynchronous error: ") + s.api.error_string(async));
          lk.lock();
        }
      }
    }
  });
}

nccl_rows::~nccl_rows() {
  state& s = *st_;
  const device_guard on_device(cfg_.device);
  // Let what is queued finish (bounded by the watchdog), then stop it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(cfg_.timeout_s + 1);
  while (cudaStreamQuery(stream_) == cudaErrorNotReady && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (cudaStreamQuery(stream_) == cudaErrorNotReady) abort("the exchange was destroyed with operations in flight");
  {
    std::lock_guard<std::mutex> g(s.dog_mu);
    s.stop = true;
  }
  s.dog_cv.notify_all();
  if (s.dog.joinable()) s.dog.join();
  for (auto& p : s.queue) cudaEventDestroy(p.done);
  if (s.comm) s.api.comm_destroy(s.comm);
  cudaStreamSynchronize(stream_);
  for (auto& b : s.mb) {
    for (auto* buf : {&b.pos, &b.send_off_d, &b.counts_d, &b.send_rec, &b.recv_rec, &b.x, &b.scales, &b.idx, &b.w,
                      &b.src, &b.rank_off, &b.back})
      if (buf->p) cudaFree(buf->p);
    if (b.counts_h) cudaFreeHost(b.counts_h);
    if (b.recv_off_h) cudaFreeHost(b.recv_off_h);
  }
  cudaStreamDestroy(stream_);
}

void nccl_rows::connect(const std::vector<std::uint8_t>& unique_id) {
  state& s = *st_;
  ncclUniqueId id{};
  if (unique_id.size() != sizeof(id))
    throw std::invalid_argument("NCCL expert exchange: the unique id has " + std::to_string(unique_id.size()) +
                                " bytes, NCCL's has " + std::to_string(sizeof(id)));
  std::memcpy(&id, unique_id.data(), sizeof(id));
  cuda_ok(cudaSetDevice(cfg_.device), "cudaSetDevice");
  std::lock_guard<std::timed_mutex> g(s.mu);
  if (s.comm) throw std::logic_error("NCCL expert exchange: connect() called twice");
  ncclComm_t comm = nullptr;
  // Non-blocking creation where the library has it, so that a rank that never joins (it died after the group's
  // handle exchange) fails this one after timeout_s instead of holding it in NCCL's bootstrap.
  if (s.api.comm_init_rank_config) {
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t r = s.api.comm_init_rank_config(&comm, cfg_.ranks, id, cfg_.rank, &config);
    if (r == ncclSuccess || r == ncclInProgress) {
      nonblocking_ = true;
      s.comm = comm;
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(cfg_.timeout_s);
      for (;;) {
        ncclResult_t state = ncclInProgress;
        s.api.comm_get_async_error(comm, &state);
        if (state == ncclSuccess) return;
        if (state != ncclInProgress || std::chrono::steady_clock::now() > deadline) {
          s.api.comm_abort(comm);
          s.comm = nullptr;
          if (state != ncclInProgress) s.api.check(state, "ncclCommInitRankConfig");
          throw std::runtime_error("ncclCommInitRankConfig: not every rank of the group joined within " +
                                   std::to_string(cfg_.timeout_s) + " s (a peer died or stalls)");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
    if (r != ncclInvalidArgument && r != ncclInvalidUsage) s.api.check(r, "ncclCommInitRankConfig");
    // An older library that rejects this config version: the blocking call.
  }
  s.api.check(s.api.comm_init_rank(&comm, cfg_.ranks, id, cfg_.rank), "ncclCommInitRank");
  s.comm = comm;
}

void nccl_rows::end_group(const char* what) {
  state& s = *st_;
  ncclResult_t r = s.api.group_end();
  if (r == ncclInProgress && nonblocking_) {
    // A non-blocking communicator may finish the group (connection setup included) in the background; its kernels
    // are on the stream once the communicator reports success.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(cfg_.timeout_s);
    do {
      r = ncclInProgress;
      s.api.comm_get_async_error(s.comm, &r);
      if (r == ncclInProgress) {
        if (std::chrono::steady_clock::now() > deadline)
          throw std::runtime_error(std::string("NCCL ") + what + " of rank " + std::to_string(cfg_.rank) +
                                   " was not issued within " + std::to_string(cfg_.timeout_s) + " s");
        std::this_thread::yield();
      }
    } while (r == ncclInProgress);
  }
  s.api.check(r, what);
}

bool nccl_rows::connected() const { return st_->comm != nullptr; }

namespace {

// Grows `b` to `bytes` or more, stream-ordered on `s` (work enqueued earlier keeps the old memory until it is done).
template <class Buffer>
void* grow(Buffer& b, std::size_t bytes, cudaStream_t s, std::size_t& total) {
  bytes = std::max<std::size_t>(bytes, 256);
  if (bytes <= b.cap) return b.p;
  const std::size_t want = std::max(bytes, b.cap + b.cap / 2);
  if (b.p) cuda_ok(cudaFreeAsync(b.p, s), "cudaFreeAsync");
  total -= b.cap;
  b.p = nullptr;
  b.cap = 0;
  cuda_ok(cudaMallocAsync(&b.p, want, s), "cudaMallocAsync");
  b.cap = want;
  total += want;
  return b.p;
}

} // namespace

void nccl_rows::watch(const char* what) {
  state& s = *st_;
  cudaEvent_t ev = nullptr;
  cuda_ok(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
  cuda_ok(cudaEventRecord(ev, stream_), "cudaEventRecord");
  std::lock_guard<std::mutex> g(s.dog_mu);
  s.queue.push_back({ev, std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                               std::chrono::duration<double>(cfg_.timeout_s)),
                     what});
}

std::string nccl_rows::stalled(const std::string& what) const {
  return "NCCL " + what + " of rank " + std::to_string(cfg_.rank) + " did not finish within " +
         std::to_string(cfg_.timeout_s) + " s (a peer died or stalls)";
}

void nccl_rows::wait_host(const char* what) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(cfg_.timeout_s);
  for (;;) {
    const cudaError_t q = cudaStreamQuery(stream_);
    if (q == cudaSuccess) break;
    if (q != cudaErrorNotReady) cuda_ok(q, what);
    if (st_->failed) break; // an abort ended NCCL's kernels; the stream drains
    if (std::chrono::steady_clock::now() > deadline) {
      abort(stalled(what));
      break;
    }
    std::this_thread::yield();
  }
  if (st_->failed) throw std::runtime_error("NCCL expert exchange: " + st_->failure_text());
}

void nccl_rows::dispatch(int mb, const void* x_fp8, const float* x_scales, const int* topk_idx,
                         const float* topk_weights, int tokens) {
  state& s = *st_;
  const device_guard on_device(cfg_.device);
  if (mb < 0 || mb >= cfg_.micro_batches) throw std::invalid_argument("NCCL expert exchange: bad micro-batch");
  if (tokens < 0) throw std::invalid_argument("NCCL expert exchange: negative token count");
  if (s.failed) throw std::runtime_error("NCCL expert exchange: " + s.failure_text());
  if (!s.comm) throw std::logic_error("NCCL expert exchange: dispatch before connect()");
  auto& b = s.mb[mb];
  const int N = cfg_.ranks, K = cfg_.topk, per = cfg_.experts / N;
  const record_layout rl{cfg_.hidden, K};
  const int64_t T = tokens, H = cfg_.hidden;
  b.tokens = tokens;
  int* pos = static_cast<int*>(grow(b.pos, sizeof(int) * size_t(std::max<int64_t>(T, 1) * N), stream_, s.bytes));
  int* send_off = static_cast<int*>(grow(b.send_off_d, sizeof(int) * size_t(N + 1), stream_, s.bytes));
  int* counts = static_cast<int*>(grow(b.counts_d, sizeof(int) * size_t(2 * N), stream_, s.bytes));
  auto* send = static_cast<uint8_t*>(
      grow(b.send_rec, size_t(std::max<int64_t>(T * std::min(K, N), 1) * rl.bytes()), stream_, s.bytes));
  route_kernel<<<1, route_threads, 0, stream_>>>(topk_idx, tokens, K, N, per, cfg_.experts, pos, counts, send_off);
  if (T > 0)
    pack_kernel<<<blocks_for(T), 128, 0, stream_>>>(static_cast<const uint8_t*>(x_fp8), x_scales, fp8_scale_ld(T),
                                                    topk_idx, topk_weights, pos, send_off, tokens, K, N, per,
                                                    cfg_.experts, rl, send);
  cuda_ok(cudaGetLastError(), "route/pack kernels");
  {
    std::lock_guard<std::timed_mutex> g(s.mu);
    if (!s.comm) throw std::runtime_error("NCCL expert exchange: " + s.failure_text());
    s.api.check(s.api.group_start(), "ncclGroupStart");
    for (int p = 0; p < N; ++p) {
      s.api.check(s.api.send(counts + p, 1, ncclInt32, p, s.comm, stream_), "ncclSend (counts)");
      s.api.check(s.api.recv(counts + N + p, 1, ncclInt32, p, s.comm, stream_), "ncclRecv (counts)");
    }
    end_group("ncclGroupEnd (counts)");
  }
  watch("count exchange");
  cuda_ok(cudaMemcpyAsync(b.counts_h, counts, sizeof(int) * size_t(2 * N), cudaMemcpyDeviceToHost, stream_),
          "copy counts");
  wait_host("count exchange"); // NCCL needs the sizes on the host
  b.send_count.assign(b.counts_h, b.counts_h + N);
  b.recv_count.assign(b.counts_h + N, b.counts_h + 2 * N);
  b.send_off.assign(size_t(N + 1), 0);
  b.recv_off.assign(size_t(N + 1), 0);
  for (int p = 0; p < N; ++p) {
    if (b.send_count[size_t(p)] < 0 || b.recv_count[size_t(p)] < 0 || b.recv_count[size_t(p)] > (1 << 26))
      throw std::runtime_error("NCCL expert exchange: rank " + std::to_string(p) + " announced " +
                               std::to_string(b.recv_count[size_t(p)]) + " rows");
    b.send_off[size_t(p + 1)] = b.send_off[size_t(p)] + b.send_count[size_t(p)];
    b.recv_off[size_t(p + 1)] = b.recv_off[size_t(p)] + b.recv_count[size_t(p)];
  }
  b.received = b.recv_off[size_t(N)];
  b.capacity = std::max<int64_t>(b.received, 1);
  const int64_t cap = b.capacity, sld = fp8_scale_ld(cap);
  auto* recv = static_cast<uint8_t*>(grow(b.recv_rec, size_t(cap * rl.bytes()), stream_, s.bytes));
  grow(b.x, size_t(cap * H), stream_, s.bytes);
  grow(b.scales, sizeof(float) * size_t((H / fp8_block) * sld), stream_, s.bytes);
  grow(b.idx, sizeof(int) * size_t(cap * K), stream_, s.bytes);
  grow(b.w, sizeof(float) * size_t(cap * K), stream_, s.bytes);
  grow(b.src, sizeof(int) * size_t(cap), stream_, s.bytes);
  grow(b.rank_off, sizeof(int) * size_t(N + 1), stream_, s.bytes);
  std::copy(b.recv_off.begin(), b.recv_off.end(), b.recv_off_h);
  cuda_ok(cudaMemcpyAsync(b.rank_off.p, b.recv_off_h, sizeof(int) * size_t(N + 1), cudaMemcpyHostToDevice, stream_),
          "upload rank offsets");
  {
    std::lock_guard<std::timed_mutex> g(s.mu);
    if (!s.comm) throw std::runtime_error("NCCL expert exchange: " + s.failure_text());
    s.api.check(s.api.group_start(), "ncclGroupStart");
    for (int p = 0; p < N; ++p) {
      if (b.send_count[size_t(p)] > 0)
        s.api.check(s.api.send(send + int64_t(b.send_off[size_t(p)]) * rl.bytes(),
                               size_t(b.send_count[size_t(p)]) * size_t(rl.bytes()), ncclUint8, p, s.comm, stream_),
                    "ncclSend (rows)");
      if (b.recv_count[size_t(p)] > 0)
        s.api.check(s.api.recv(recv + int64_t(b.recv_off[size_t(p)]) * rl.bytes(),
                               size_t(b.recv_count[size_t(p)]) * size_t(rl.bytes()), ncclUint8, p, s.comm, stream_),
                    "ncclRecv (rows)");
    }
    end_group("ncclGroupEnd (rows)");
  }
  watch("dispatch");
  // Rows past the received total: no local expert.
  cuda_ok(cudaMemsetAsync(b.idx.p, 0xff, sizeof(int) * size_t(cap * K), stream_), "clear ids");
  if (b.received > 0)
    unpack_kernel<<<blocks_for(b.received), 128, 0, stream_>>>(recv, b.received, K, rl, sld,
                                                               static_cast<uint8_t*>(b.x.p),
                                                               static_cast<float*>(b.scales.p),
                                                               static_cast<int*>(b.idx.p), static_cast<float*>(b.w.p),
                                                               static_cast<int*>(b.src.p));
  cuda_ok(cudaGetLastError(), "unpack kernel");
}

ep_normal_recv nccl_rows::recv(int mb) const {
  const auto& b = st_->mb[mb];
  ep_normal_recv r;
  r.x_fp8 = b.x.p;
  r.scales = static_cast<const float*>(b.scales.p);
  r.topk_idx = static_cast<const int*>(b.idx.p);
  r.topk_weights = static_cast<const float*>(b.w.p);
  r.src_token = static_cast<const int*>(b.src.p);
  r.rank_offsets = static_cast<const int*>(b.rank_off.p);
  r.capacity = b.capacity;
  return r;
}

std::int64_t nccl_rows::received(int mb) const { return st_->mb[mb].received; }

void nccl_rows::combine(int mb, const void* y_bf16, float* out) {
  state& s = *st_;
  const device_guard on_device(cfg_.device);
  if (mb < 0 || mb >= cfg_.micro_batches) throw std::invalid_argument("NCCL expert exchange: bad micro-batch");
  if (s.failed) throw std::runtime_error("NCCL expert exchange: " + s.failure_text());
  auto& b = s.mb[mb];
  const int N = cfg_.ranks;
  const int64_t H = cfg_.hidden, row = H * int64_t(sizeof(__nv_bfloat16));
  auto* back = static_cast<uint8_t*>(grow(b.back, size_t(std::max(b.send_off[size_t(N)], 1)) * size_t(row), stream_, s.bytes));
  const auto* y = static_cast<const uint8_t*>(y_bf16);
  {
    std::lock_guard<std::timed_mutex> g(s.mu);
    if (!s.comm) throw std::runtime_error("NCCL expert exchange: " + s.failure_text());
    s.api.check(s.api.group_start(), "ncclGroupStart");
    for (int p = 0; p < N; ++p) {
      if (b.recv_count[size_t(p)] > 0)
        s.api.check(s.api.send(y + int64_t(b.recv_off[size_t(p)]) * row, size_t(b.recv_count[size_t(p)]) * size_t(row),
                               ncclUint8, p, s.comm, stream_),
                    "ncclSend (combine)");
      if (b.send_count[size_t(p)] > 0)
        s.api.check(s.api.recv(back + int64_t(b.send_off[size_t(p)]) * row,
                               size_t(b.send_count[size_t(p)]) * size_t(row), ncclUint8, p, s.comm, stream_),
                    "ncclRecv (combine)");
    }
    end_group("ncclGroupEnd (combine)");
  }
  watch("combine");
  if (b.tokens > 0)
    reduce_kernel<<<blocks_for(b.tokens), 256, 0, stream_>>>(reinterpret_cast<const __nv_bfloat16*>(back),
                                                             static_cast<const int*>(b.pos.p),
                                                             static_cast<const int*>(b.send_off_d.p), b.tokens, N, H, out);
  cuda_ok(cudaGetLastError(), "combine reduce kernel");
}

std::string nccl_rows::error() const {
  return st_->failure_text();
}

void nccl_rows::abort(const std::string& reason) {
  state& s = *st_;
  s.fail(reason);
  // The rank's thread holds the lock only while it enqueues; NCCL returns from those calls.
  std::unique_lock<std::timed_mutex> g(s.mu, std::defer_lock);
  if (!g.try_lock_for(std::chrono::duration<double>(cfg_.timeout_s))) return;
  if (s.comm) {
    s.api.comm_abort(s.comm); // ends NCCL's kernels of this communicator; streams waiting on them go on
    s.comm = nullptr;
  }
}

std::size_t nccl_rows::buffer_bytes() const { return st_->bytes; }

} // namespace petrel::cuda
