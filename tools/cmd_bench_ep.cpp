// petrel bench-ep: the intranode expert all-to-all (kernels/cuda/ep_a2a) with N ranks, each a process of its own
// (the command re-executes itself with a hidden --child-rank flag; handles and the NCCL id go through files in a
// temporary folder) or a thread (--launch threads: one process, direct pointers). Rank r runs on GPU
// r % device_count, so several ranks may share one GPU. The received rows and the combined outputs are checked
// once against a host reference, then dispatch and combine are timed separately (cudaEvents, median) and
// compared with DeepEP's figures (ANCHORS.md), next to an NCCL all-to-all of the same bytes when every rank
// has a GPU of its own (NCCL refuses two ranks on one GPU).
#include "tools/command.hpp"

#include <cstdio>
#include <memory>
#include <string>

#ifdef PETREL_HAVE_CUDA
#include <cuda_runtime_api.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <numeric>
#include <set>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

#include "kernels/cuda/ep_a2a.hpp"
#include "kernels/cuda/fp8_layout.hpp"
#include "kernels/cuda/quant.hpp"
#include "kernels/cuda/nccl_api.hpp"
#endif

namespace {

struct ep_bench_options {
  int ranks = 2;
  int tokens = 4096;
  int hidden = 7168;
  int topk = 8;
  int experts = 256;
  std::string mode = "normal";
  std::string launch = "processes";
  int iters = 30;
  int warmup = 3;
  double timeout_s = 20;
  std::string json_path;
  bool check_only = false;
  bool no_check = false;
  int child_rank = -1;
  std::string rendezvous;
};

#ifdef PETREL_HAVE_CUDA
using namespace petrel::cuda;
namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

// -- anchors (ANCHORS.md: DeepEP, H800, hidden 7168, top-8) --------------------------------------------------
constexpr double anchor_normal_dispatch_gbs = 153, anchor_normal_combine_gbs = 158; // EP8 NVLink, 4096 tokens
constexpr double anchor_ll_dispatch_us = 77, anchor_ll_combine_us = 114;            // EP8, 128 tokens

struct bench_failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};
void ensure(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) throw bench_failure(what + ": " + cudaGetErrorString(e));
}
void ensure(const kernel_status& st) {
  if (!st.ok()) throw bench_failure(st.message);
}

// Stream-ordered allocations: cudaFree synchronises the whole device, and with ranks as threads of one process
// that would wait for a peer's spinning receive kernel, which waits for this thread: a deadlock until the timeout.
template <typename T>
struct device_array {
  T* ptr = nullptr;
  explicit device_array(std::size_t n) {
    ensure(cudaMallocAsync(reinterpret_cast<void**>(&ptr), std::max<std::size_t>(n, 1) * sizeof(T), nullptr), "cudaMallocAsync");
    ensure(cudaStreamSynchronize(nullptr), "cudaMallocAsync");
  }
  ~device_array() {
    cudaFreeAsync(ptr, nullptr);
    cudaStreamSynchronize(nullptr);
  }
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
};

// -- deterministic inputs: every rank can rebuild every other rank's ------------------------------------------
std::uint32_t mix(std::uint64_t v) {
  v ^= v >> 33;
  v *= 0xff51afd7ed558ccdULL;
  v ^= v >> 33;
  v *= 0xc4ceb9fe1a85ec53ULL;
  v ^= v >> 33;
  return std::uint32_t(v);
}
std::uint16_t to_bf16(float v) {
  std::uint32_t b;
  std::memcpy(&b, &v, 4);
  b += 0x7FFF + ((b >> 16) & 1);
  return std::uint16_t(b >> 16);
}
float from_bf16(std::uint16_t h) {
  const std::uint32_t b = std::uint32_t(h) << 16;
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

struct routing {
  std::vector<int> ids;     // [tokens, topk], -1 = none
  std::vector<float> weights;
};

// A deterministic random top-k: distinct experts, weights in (0, 1]; every 53rd token leaves its last slot empty.
routing make_routing(int rank, int tokens, int topk, int experts) {
  routing r;
  r.ids.assign(std::size_t(tokens) * topk, -1);
  r.weights.assign(std::size_t(tokens) * topk, 0.0f);
  for (int t = 0; t < tokens; ++t) {
    std::uint64_t state = (std::uint64_t(rank) << 32) ^ std::uint64_t(t) * 0x9E3779B97F4A7C15ULL ^ 0x5EED;
    const int used = (mix(state + 7) % 53 == 0 && topk > 1) ? topk - 1 : topk;
    for (int j = 0; j < used; ++j) {
      int e;
      bool dup;
      do {
        e = int(mix(++state) % std::uint32_t(experts));
        dup = false;
        for (int i = 0; i < j; ++i) dup = dup || r.ids[std::size_t(t) * topk + i] == e;
      } while (dup);
      r.ids[std::size_t(t) * topk + j] = e;
      r.weights[std::size_t(t) * topk + j] = float(mix(state * 31 + 1) % 1000 + 1) / 1000.0f;
    }
  }
  return r;
}

std::vector<std::uint16_t> make_x(int rank, int tokens, int hidden) {
  std::vector<std::uint16_t> x(std::size_t(tokens) * hidden);
  for (int t = 0; t < tokens; ++t)
    for (int c = 0; c < hidden; ++c) {
      const std::uint32_t h = mix((std::uint64_t(rank) << 48) ^ (std::uint64_t(t) << 20) ^ std::uint64_t(c));
      // every 128-block gets its own magnitude, so the scales differ
      const float mag = float(1 + (mix((std::uint64_t(rank) << 40) ^ (std::uint64_t(t) << 12) ^ (c / 128)) % 64));
      x[std::size_t(t) * hidden + c] = to_bf16((float(int(h % 2001) - 1000) / 1000.0f) * mag);
    }
  return x;
}

// The value a combine row carries: a function of (key, token owner, token, column), exactly a bf16.
std::uint16_t combine_value(std::uint64_t key, int owner, int t, int c) {
  const std::uint32_t h = mix((key << 44) ^ (std::uint64_t(owner) << 36) ^ (std::uint64_t(t) << 16) ^ std::uint64_t(c));
  return to_bf16(float(int(h % 255) - 127) / 64.0f);
}

// -- rendezvous through files in one folder (processes or threads alike) ---------------------------------------
void put_file(const std::string& dir, const std::string& name, const void* data, std::size_t n) {
  std::ostringstream tmp_name;
  tmp_name << dir << "/." << name << "." << getpid() << "." << std::this_thread::get_id();
  {
    std::ofstream f(tmp_name.str(), std::ios::binary);
    f.write(static_cast<const char*>(data), std::streamsize(n));
    if (!f) throw bench_failure("cannot write " + tmp_name.str());
  }
  fs::rename(tmp_name.str(), dir + "/" + name);
}
std::vector<std::uint8_t> wait_file(const std::string& dir, const std::string& name, double timeout_s) {
  const auto deadline = clock_type::now() + std::chrono::duration<double>(timeout_s);
  const std::string path = dir + "/" + name;
  while (true) {
    std::ifstream f(path, std::ios::binary);
    if (f) return std::vector<std::uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (clock_type::now() > deadline) throw bench_failure("timed out after " + std::to_string(int(timeout_s)) + " s waiting for " + path);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}
void host_barrier(const std::string& dir, const std::string& name, int rank, int ranks) {
  const char one = 1;
  put_file(dir, "barrier." + name + "." + std::to_string(rank), &one, 1);
  for (int r = 0; r < ranks; ++r) wait_file(dir, "barrier." + name + "." + std::to_string(r), 120);
}

// -- one rank ------------------------------------------------------------------------------------------------
struct timing {
  std::vector<float> dispatch_us, combine_us;
};
double median(std::vector<float> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct rank_context {
  const ep_bench_options& o;
  int rank;
  std::string dir;
  bool normal;
  int L;
  std::vector<routing> routes; // every rank's routing (deterministic, rebuilt here)
  nlohmann::json result;
  int phases = 0;
  // A host barrier between the steps of the check: the host-side verification allocates, frees and launches
  // kernels for the first time, which (with ranks as threads) must not overlap a peer's spinning receive.
  void phase() { host_barrier(dir, "phase" + std::to_string(phases++), rank, o.ranks); }
  void log(const std::string& s) const {
    std::printf("[rank %d] %s\n", rank, s.c_str());
    std::fflush(stdout);
  }
};

// Fp8 rows and scales of rank s's inputs, as quantize_bf16_to_fp8_1x128 makes them (downloaded).
struct quantized_rows {
  std::vector<std::uint8_t> q;
  std::vector<float> scales; // [hidden/128][fp8_scale_ld(tokens)]
};
quantized_rows quantize_on_device(const std::vector<std::uint16_t>& x, int tokens, int hidden) {
  device_array<std::uint16_t> dx(x.size());
  device_array<std::uint8_t> dq(x.size());
  device_array<float> ds(fp8_act_scale_count(tokens, hidden));
  ensure(cudaMemcpy(dx.ptr, x.data(), x.size() * 2, cudaMemcpyHostToDevice), "upload x");
  ensure(quantize_bf16_to_fp8_1x128(dx.ptr, tokens, hidden, dq.ptr, ds.ptr, nullptr));
  quantized_rows r;
  r.q.resize(x.size());
  r.scales.resize(fp8_act_scale_count(tokens, hidden));
  ensure(cudaMemcpy(r.q.data(), dq.ptr, r.q.size(), cudaMemcpyDeviceToHost), "download q");
  ensure(cudaMemcpy(r.scales.data(), ds.ptr, r.scales.size() * 4, cudaMemcpyDeviceToHost), "download scales");
  return r;
}

void sync_and_check(ep_buffer& buf, const char* what) {
  ensure(cudaStreamSynchronize(buf.stream()), what);
  const std::string e = buf.error();
  if (!e.empty()) throw bench_failure(std::string(what) + ": " + e);
}

// -- normal mode check ----------------------------------------------------------------------------------------
bool check_normal(rank_context& c, ep_buffer& buf, const void* x_fp8, const float* x_scales, const int* d_ids,
                  const float* d_w) {
  const int N = c.o.ranks, T = c.o.tokens, H = c.o.hidden, K = c.o.topk, me = c.rank, epr = c.o.experts / N;
  c.phase();
  ensure(buf.dispatch(x_fp8, x_scales, d_ids, d_w, T));
  sync_and_check(buf, "dispatch");
  c.phase();
  const ep_normal_recv rv = buf.recv();
  std::vector<int> off(N + 1);
  ensure(cudaMemcpy(off.data(), rv.rank_offsets, (N + 1) * 4, cudaMemcpyDeviceToHost), "download offsets");
  const int total = off[N];
  const std::int64_t ld = fp8_scale_ld(rv.capacity);
  std::vector<std::uint8_t> q(std::size_t(total) * H);
  std::vector<float> sc((H / 128) * ld);
  std::vector<int> ids(std::size_t(rv.capacity) * K), src(std::max(total, 1));
  std::vector<float> w(std::size_t(std::max(total, 1)) * K);
  ensure(cudaMemcpy(q.data(), rv.x_fp8, q.size(), cudaMemcpyDeviceToHost), "download rows");
  ensure(cudaMemcpy(sc.data(), rv.scales, sc.size() * 4, cudaMemcpyDeviceToHost), "download scales");
  ensure(cudaMemcpy(ids.data(), rv.topk_idx, ids.size() * 4, cudaMemcpyDeviceToHost), "download topk");
  ensure(cudaMemcpy(w.data(), rv.topk_weights, std::size_t(total) * K * 4, cudaMemcpyDeviceToHost), "download weights");
  ensure(cudaMemcpy(src.data(), rv.src_token, std::size_t(total) * 4, cudaMemcpyDeviceToHost), "download src");
  int bad = 0;
  auto fail = [&](const std::string& s) {
    if (bad++ < 5) c.log("dispatch MISMATCH: " + s);
  };
  for (int s = 0; s < N; ++s) {
    std::vector<int> list;
    const routing& r = c.routes[s];
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < K; ++j)
        if (r.ids[std::size_t(t) * K + j] >= 0 && r.ids[std::size_t(t) * K + j] / epr == me) {
          list.push_back(t);
          break;
        }
    if (off[s + 1] - off[s] != int(list.size())) {
      fail("rank " + std::to_string(s) + " sent " + std::to_string(off[s + 1] - off[s]) + " rows, expected " + std::to_string(list.size()));
      continue;
    }
    const quantized_rows qr = quantize_on_device(make_x(s, T, H), T, H);
    const std::int64_t sld = fp8_scale_ld(T);
    for (std::size_t i = 0; i < list.size(); ++i) {
      const int row = off[s] + int(i), t = list[i];
      if (src[row] != t) fail("row " + std::to_string(row) + " src token " + std::to_string(src[row]) + " != " + std::to_string(t));
      if (std::memcmp(&q[std::size_t(row) * H], &qr.q[std::size_t(t) * H], H) != 0) fail("row " + std::to_string(row) + " fp8 bytes differ");
      for (int b = 0; b < H / 128; ++b)
        if (sc[b * ld + row] != qr.scales[b * sld + t]) {
          fail("row " + std::to_string(row) + " scale differs");
          break;
        }
      for (int j = 0; j < K; ++j) {
        const int e = r.ids[std::size_t(t) * K + j];
        const bool mine = e >= 0 && e / epr == me;
        if (ids[std::size_t(row) * K + j] != (mine ? e % epr : -1) || w[std::size_t(row) * K + j] != (mine ? r.weights[std::size_t(t) * K + j] : 0.0f))
          fail("row " + std::to_string(row) + " topk " + std::to_string(j) + " differs");
      }
    }
  }
  for (std::int64_t row = total; row < rv.capacity; ++row)
    for (int j = 0; j < K; ++j)
      if (ids[row * K + j] != -1) {
        fail("tail row " + std::to_string(row) + " has topk_idx " + std::to_string(ids[row * K + j]));
        row = rv.capacity;
        break;
      }
  const bool dispatch_ok = bad == 0;

  // combine: row (s, t) carries combine_value(this rank, s, t, c); the owner sums over ranks in order
  std::vector<std::uint16_t> y(std::size_t(std::max(total, 1)) * H);
  for (int s = 0; s < N; ++s)
    for (int row = off[s]; row < off[s + 1]; ++row)
      for (int col = 0; col < H; ++col) y[std::size_t(row) * H + col] = combine_value(me, s, src[row], col);
  device_array<std::uint16_t> dy(y.size()), dout(std::size_t(T) * H);
  ensure(cudaMemcpy(dy.ptr, y.data(), y.size() * 2, cudaMemcpyHostToDevice), "upload y");
  ensure(cudaMemset(dout.ptr, 0xFF, std::size_t(T) * H * 2), "poison out");
  ensure(cudaStreamSynchronize(nullptr), "poison out");
  c.phase();
  ensure(buf.combine(dy.ptr, dout.ptr));
  sync_and_check(buf, "combine");
  c.phase();
  std::vector<std::uint16_t> out(std::size_t(T) * H);
  ensure(cudaMemcpy(out.data(), dout.ptr, out.size() * 2, cudaMemcpyDeviceToHost), "download out");
  int bad_combine = 0;
  const routing& mine = c.routes[me];
  for (int t = 0; t < T; ++t) {
    bool to[ep_max_ranks] = {};
    for (int j = 0; j < K; ++j)
      if (mine.ids[std::size_t(t) * K + j] >= 0) to[mine.ids[std::size_t(t) * K + j] / epr] = true;
    for (int col = 0; col < H; ++col) {
      float acc = 0;
      for (int d = 0; d < N; ++d)
        if (to[d]) acc += from_bf16(combine_value(d, me, t, col));
      if (out[std::size_t(t) * H + col] != to_bf16(acc)) {
        if (bad_combine++ < 5)
          c.log("combine MISMATCH token " + std::to_string(t) + " col " + std::to_string(col) + ": " +
                std::to_string(from_bf16(out[std::size_t(t) * H + col])) + " expected " + std::to_string(acc));
      }
    }
  }
  c.log(std::string("check normal: dispatch ") + (dispatch_ok ? "ok" : "FAILED") + " (" + std::to_string(total) +
        " rows received), combine " + (bad_combine == 0 ? "ok" : "FAILED"));
  c.result["check"] = {{"dispatch_ok", dispatch_ok}, {"combine_ok", bad_combine == 0}, {"rows_received", total}};
  return dispatch_ok && bad_combine == 0;
}

// -- low-latency check -----------------------------------------------------------------------------------------
struct ll_expect {
  std::vector<std::vector<int>> info; // per local expert: sorted src_info values
};
ll_expect expected_ll(const rank_context& c) {
  const int N = c.o.ranks, T = c.o.tokens, K = c.o.topk;
  ll_expect ex;
  ex.info.resize(c.L);
  for (int s = 0; s < N; ++s)
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < K; ++j) {
        const int e = c.routes[s].ids[std::size_t(t) * K + j];
        if (e >= 0 && e / c.L == c.rank) ex.info[e % c.L].push_back((s * T + t) * K + j);
      }
  for (auto& v : ex.info) std::sort(v.begin(), v.end());
  return ex;
}

// Fills y [L, max_m, H] with combine_value(global expert, 0, 0, col) in every row: the same in any round,
// whatever order the rows arrived in.
void fill_expert_constant_rows(rank_context& c, std::uint16_t* dy, std::int64_t max_m) {
  const int H = c.o.hidden;
  std::vector<std::uint16_t> row(H);
  for (int el = 0; el < c.L; ++el) {
    for (int col = 0; col < H; ++col) row[col] = combine_value(1000 + c.rank * c.L + el, 0, 0, col);
    std::uint16_t* base = dy + std::size_t(el) * max_m * H;
    ensure(cudaMemcpy(base, row.data(), H * 2, cudaMemcpyHostToDevice), "upload y row");
    for (std::int64_t have = 1; have < max_m; have *= 2) {
      const std::int64_t n = std::min(have, max_m - have);
      ensure(cudaMemcpy(base + have * H, base, std::size_t(n) * H * 2, cudaMemcpyDeviceToDevice), "replicate y");
    }
  }
}

bool check_ll(rank_context& c, ep_buffer& buf, const std::uint16_t* d_x, const int* d_ids, const float* d_w,
              std::uint16_t* d_yconst) {
  const int N = c.o.ranks, T = c.o.tokens, H = c.o.hidden, K = c.o.topk, me = c.rank;
  const ll_expect ex = expected_ll(c);
  c.phase();
  ensure(buf.ll_dispatch_send(d_x, d_ids, T));
  ensure(buf.ll_dispatch_recv());
  sync_and_check(buf, "low-latency dispatch");
  c.phase();
  const ep_ll_recv rv = buf.ll_recv();
  const std::int64_t rows = rv.max_m * c.L, ld = fp8_scale_ld(rows);
  std::vector<int> masked(c.L), info(rows);
  ensure(cudaMemcpy(masked.data(), rv.masked_m, c.L * 4, cudaMemcpyDeviceToHost), "download masked_m");
  ensure(cudaMemcpy(info.data(), rv.src_info, rows * 4, cudaMemcpyDeviceToHost), "download src_info");
  std::vector<float> sc((H / 128) * ld);
  ensure(cudaMemcpy(sc.data(), rv.scales, sc.size() * 4, cudaMemcpyDeviceToHost), "download scales");
  int bad = 0;
  auto fail = [&](const std::string& s) {
    if (bad++ < 5) c.log("ll dispatch MISMATCH: " + s);
  };
  std::vector<quantized_rows> qs;
  for (int s = 0; s < N; ++s) qs.push_back(quantize_on_device(make_x(s, T, H), T, H));
  const std::int64_t sld = fp8_scale_ld(T);
  std::vector<std::uint8_t> q(H);
  for (int el = 0; el < c.L; ++el) {
    if (masked[el] != int(ex.info[el].size())) {
      fail("expert " + std::to_string(el) + " got " + std::to_string(masked[el]) + " rows, expected " + std::to_string(ex.info[el].size()));
      continue;
    }
    std::vector<int> got(info.begin() + el * rv.max_m, info.begin() + el * rv.max_m + masked[el]);
    std::vector<int> sorted = got;
    std::sort(sorted.begin(), sorted.end());
    if (sorted != ex.info[el]) {
      fail("expert " + std::to_string(el) + " received another set of (rank, token, k)");
      continue;
    }
    for (int i = 0; i < masked[el]; ++i) {
      const std::int64_t row = el * rv.max_m + i;
      const int v = got[i], t = (v / K) % T, s = v / K / T;
      ensure(cudaMemcpy(q.data(), static_cast<const std::uint8_t*>(rv.x_fp8) + row * H, H, cudaMemcpyDeviceToHost), "row");
      if (std::memcmp(q.data(), &qs[s].q[std::size_t(t) * H], H) != 0) fail("row " + std::to_string(row) + " fp8 bytes differ");
      for (int b = 0; b < H / 128; ++b)
        if (sc[b * ld + row] != qs[s].scales[b * sld + t]) {
          fail("row " + std::to_string(row) + " scale differs");
          break;
        }
    }
  }
  const bool dispatch_ok = bad == 0;

  // weighted combine, rows specific to (expert, owner, token)
  device_array<std::uint16_t> dy(std::size_t(rows) * H), dout(std::size_t(T) * H);
  ensure(cudaMemset(dy.ptr, 0, std::size_t(rows) * H * 2), "clear y");
  std::vector<std::uint16_t> row(H);
  for (int el = 0; el < c.L; ++el)
    for (int i = 0; i < masked[el]; ++i) {
      const int v = info[el * rv.max_m + i], t = (v / K) % T, s = v / K / T;
      for (int col = 0; col < H; ++col) row[col] = combine_value(me * c.L + el, s, t, col);
      ensure(cudaMemcpy(dy.ptr + (el * rv.max_m + i) * H, row.data(), H * 2, cudaMemcpyHostToDevice), "upload y");
    }
  ensure(cudaMemset(dout.ptr, 0xFF, std::size_t(T) * H * 2), "poison out");
  ensure(cudaStreamSynchronize(nullptr), "poison out");
  c.phase();
  ensure(buf.ll_combine_send(dy.ptr));
  ensure(buf.ll_combine_recv(d_ids, d_w, T, dout.ptr));
  sync_and_check(buf, "low-latency combine");
  c.phase();
  std::vector<std::uint16_t> out(std::size_t(T) * H);
  ensure(cudaMemcpy(out.data(), dout.ptr, out.size() * 2, cudaMemcpyDeviceToHost), "download out");
  auto expected_out = [&](bool constant_rows) {
    std::vector<std::uint16_t> e(std::size_t(T) * H);
    const routing& r = c.routes[me];
    for (int t = 0; t < T; ++t)
      for (int col = 0; col < H; ++col) {
        float acc = 0;
        for (int j = 0; j < K; ++j) {
          const int ge = r.ids[std::size_t(t) * K + j];
          if (ge < 0) continue;
          const std::uint16_t yv = constant_rows ? combine_value(1000 + ge, 0, 0, col) : combine_value(ge, me, t, col);
          acc = std::fma(r.weights[std::size_t(t) * K + j], from_bf16(yv), acc);
        }
        e[std::size_t(t) * H + col] = to_bf16(acc);
      }
    return e;
  };
  auto count_diff = [&](const std::vector<std::uint16_t>& a, const std::vector<std::uint16_t>& b, const char* what) {
    int n = 0;
    for (std::size_t i = 0; i < a.size(); ++i)
      if (a[i] != b[i] && n++ < 3)
        c.log(std::string(what) + " MISMATCH at token " + std::to_string(i / H) + " col " + std::to_string(i % H) + ": " +
              std::to_string(from_bf16(a[i])) + " expected " + std::to_string(from_bf16(b[i])));
    return n;
  };
  const bool combine_ok = count_diff(out, expected_out(false), "ll combine") == 0;

  // graph: one eager round, then the same round captured once and replayed twice; all equal the reference
  fill_expert_constant_rows(c, d_yconst, rv.max_m);
  const std::vector<std::uint16_t> ref_const = expected_out(true);
  auto round = [&](std::uint16_t* o) {
    ensure(buf.ll_dispatch_send(d_x, d_ids, T));
    ensure(buf.ll_dispatch_recv());
    ensure(buf.ll_combine_send(d_yconst));
    ensure(buf.ll_combine_recv(d_ids, d_w, T, o));
  };
  ensure(cudaStreamSynchronize(nullptr), "y rows");
  c.phase();
  ensure(cudaMemsetAsync(dout.ptr, 0xFF, std::size_t(T) * H * 2, buf.stream()), "poison out");
  round(dout.ptr);
  sync_and_check(buf, "low-latency eager round");
  ensure(cudaMemcpy(out.data(), dout.ptr, out.size() * 2, cudaMemcpyDeviceToHost), "download out");
  bool graph_ok = count_diff(out, ref_const, "ll eager (constant rows)") == 0;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ensure(cudaStreamBeginCapture(buf.stream(), cudaStreamCaptureModeThreadLocal), "begin capture");
  round(dout.ptr);
  ensure(cudaStreamEndCapture(buf.stream(), &graph), "end capture");
  ensure(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  ensure(cudaGraphUpload(exec, buf.stream()), "graph upload"); // not inside the first launch, while peers spin
  ensure(cudaStreamSynchronize(buf.stream()), "graph upload");
  c.phase();
  for (int rep = 0; rep < 2; ++rep) {
    ensure(cudaMemsetAsync(dout.ptr, 0xFF, std::size_t(T) * H * 2, buf.stream()), "poison out");
    ensure(cudaGraphLaunch(exec, buf.stream()), "graph launch");
    sync_and_check(buf, "low-latency graph replay");
    ensure(cudaMemcpy(out.data(), dout.ptr, out.size() * 2, cudaMemcpyDeviceToHost), "download out");
    graph_ok = count_diff(out, ref_const, "ll graph replay") == 0 && graph_ok;
    const ep_ll_recv gv = buf.ll_recv(); // the graph's buffer: the one the capture used
    ensure(cudaMemcpy(masked.data(), gv.masked_m, c.L * 4, cudaMemcpyDeviceToHost), "download masked_m");
    for (int el = 0; el < c.L; ++el)
      if (masked[el] != int(ex.info[el].size())) graph_ok = false;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  c.log(std::string("check low_latency: dispatch ") + (dispatch_ok ? "ok" : "FAILED") + ", combine " +
        (combine_ok ? "ok" : "FAILED") + ", graph capture + 2 replays " + (graph_ok ? "ok" : "FAILED"));
  c.result["check"] = {{"dispatch_ok", dispatch_ok}, {"combine_ok", combine_ok}, {"graph_ok", graph_ok}};
  return dispatch_ok && combine_ok && graph_ok;
}

// -- timing ----------------------------------------------------------------------------------------------------
timing time_rounds(rank_context& c, ep_buffer& buf, const std::function<void()>& dispatch, const std::function<void()>& combine) {
  cudaEvent_t ev[4];
  for (auto& e : ev) ensure(cudaEventCreate(&e), "cudaEventCreate");
  timing tm;
  for (int it = 0; it < c.o.warmup + c.o.iters; ++it) {
    ensure(buf.barrier());
    ensure(cudaEventRecord(ev[0], buf.stream()), "record");
    dispatch();
    ensure(cudaEventRecord(ev[1], buf.stream()), "record");
    ensure(buf.barrier());
    ensure(cudaEventRecord(ev[2], buf.stream()), "record");
    combine();
    ensure(cudaEventRecord(ev[3], buf.stream()), "record");
    sync_and_check(buf, "timed round");
    float d = 0, cb = 0;
    ensure(cudaEventElapsedTime(&d, ev[0], ev[1]), "elapsed");
    ensure(cudaEventElapsedTime(&cb, ev[2], ev[3]), "elapsed");
    if (it >= c.o.warmup) {
      tm.dispatch_us.push_back(d * 1000);
      tm.combine_us.push_back(cb * 1000);
    }
  }
  for (auto& e : ev) cudaEventDestroy(e);
  return tm;
}

// bytes[s][d]: what rank s sends rank d (rows incl. scales for dispatch)
std::vector<std::vector<double>> dispatch_bytes(const rank_context& c, std::vector<std::vector<double>>* rows_out) {
  const int N = c.o.ranks, T = c.o.tokens, K = c.o.topk, epr = c.o.experts / N;
  std::vector<std::vector<double>> rows(N, std::vector<double>(N, 0));
  for (int s = 0; s < N; ++s)
    for (int t = 0; t < T; ++t) {
      bool to[ep_max_ranks] = {};
      for (int j = 0; j < K; ++j) {
        const int e = c.routes[s].ids[std::size_t(t) * K + j];
        if (e < 0) continue;
        if (c.normal) to[e / epr] = true;
        else rows[s][e / epr] += 1; // low latency: one row per (token, expert)
      }
      if (c.normal)
        for (int d = 0; d < N; ++d) rows[s][d] += to[d] ? 1 : 0;
    }
  if (rows_out) *rows_out = rows;
  const double row_bytes = c.o.hidden + c.o.hidden / 128 * 4.0;
  auto bytes = rows;
  for (auto& r : bytes)
    for (auto& v : r) v *= row_bytes;
  return bytes;
}

nlohmann::json run_nccl_baseline(rank_context& c, ep_buffer& buf, int devices) {
  const int N = c.o.ranks, me = c.rank;
  if (devices < N)
    return {{"skipped", true},
            {"reason", "NCCL refuses two ranks on one GPU: " + std::to_string(N) + " ranks, " + std::to_string(devices) + " GPU(s)"}};
  const auto& api = petrel::cuda::nccl_api::get();
  if (!api.ok()) return {{"skipped", true}, {"reason", api.load_error()}};
  c.phase(); // every rank is out of its timed rounds before NCCL sets up
  ncclUniqueId id{};
  if (me == 0) {
    api.check(api.get_unique_id(&id), "ncclGetUniqueId");
    put_file(c.dir, "nccl_id", &id, sizeof(id));
  } else {
    const auto b = wait_file(c.dir, "nccl_id", 120);
    if (b.size() != sizeof(id)) throw bench_failure("bad nccl_id file");
    std::memcpy(&id, b.data(), sizeof(id));
  }
  ncclComm_t comm = nullptr;
  api.check(api.comm_init_rank(&comm, N, id, me), "ncclCommInitRank");
  const auto bytes = dispatch_bytes(c, nullptr);
  double send_total = 0, recv_total = 0;
  for (int d = 0; d < N; ++d) send_total += bytes[me][d];
  for (int s = 0; s < N; ++s) recv_total += bytes[s][me];
  device_array<std::uint8_t> sbuf{std::size_t(send_total)}, rbuf{std::size_t(recv_total)};
  c.phase();
  auto a2a = [&] {
    api.check(api.group_start(), "ncclGroupStart");
    std::size_t so = 0, ro = 0;
    for (int p = 0; p < N; ++p) {
      api.check(api.send(sbuf.ptr + so, std::size_t(bytes[me][p]), ncclUint8, p, comm, buf.stream()), "ncclSend");
      api.check(api.recv(rbuf.ptr + ro, std::size_t(bytes[p][me]), ncclUint8, p, comm, buf.stream()), "ncclRecv");
      so += std::size_t(bytes[me][p]);
      ro += std::size_t(bytes[p][me]);
    }
    api.check(api.group_end(), "ncclGroupEnd");
  };
  const timing tm = time_rounds(c, buf, a2a, [] {});
  api.comm_destroy(comm);
  const double us = median(tm.dispatch_us);
  return {{"skipped", false}, {"us", us}, {"gbs", recv_total / us * 1e-3}, {"recv_bytes", recv_total}};
}

int run_rank(const ep_bench_options& o, int rank, const std::string& dir) {
  rank_context c{o, rank, dir, o.mode == "normal", o.experts / o.ranks, {}, {}};
  try {
    int devices = 0;
    ensure(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
    if (devices == 0) throw bench_failure("no CUDA device visible");
    const int dev = rank % devices;
    ensure(cudaSetDevice(dev), "cudaSetDevice");
    cudaDeviceProp prop{};
    ensure(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
    const int N = o.ranks, T = o.tokens, H = o.hidden, K = o.topk;
    ep_buffer_config cfg;
    cfg.rank = rank;
    cfg.ranks = N;
    cfg.hidden = H;
    cfg.experts = o.experts;
    cfg.topk = K;
    cfg.max_tokens = T;
    cfg.ll_max_tokens = T;
    cfg.normal = c.normal;
    cfg.low_latency = !c.normal;
    cfg.timeout_s = o.timeout_s;
    cfg.device = dev;
    ep_buffer buf(cfg);
    const auto handle = buf.export_handle();
    put_file(dir, "handle." + std::to_string(rank), handle.data(), handle.size());
    std::vector<std::vector<std::uint8_t>> handles;
    for (int r = 0; r < N; ++r) handles.push_back(wait_file(dir, "handle." + std::to_string(r), 120));
    ensure(buf.open_peers(handles));
    c.result = {{"rank", rank}, {"device", dev}, {"device_name", prop.name}, {"buffer_bytes", buf.buffer_bytes()}};

    for (int r = 0; r < N; ++r) c.routes.push_back(make_routing(r, T, K, o.experts));
    const std::vector<std::uint16_t> x = make_x(rank, T, H);
    device_array<std::uint16_t> d_x(x.size());
    device_array<std::uint8_t> d_q(x.size());
    device_array<float> d_s(fp8_act_scale_count(T, H)), d_w(std::size_t(T) * K);
    device_array<int> d_ids(std::size_t(T) * K);
    ensure(cudaMemcpy(d_x.ptr, x.data(), x.size() * 2, cudaMemcpyHostToDevice), "upload x");
    ensure(cudaMemcpy(d_ids.ptr, c.routes[rank].ids.data(), std::size_t(T) * K * 4, cudaMemcpyHostToDevice), "upload ids");
    ensure(cudaMemcpy(d_w.ptr, c.routes[rank].weights.data(), std::size_t(T) * K * 4, cudaMemcpyHostToDevice), "upload w");
    ensure(quantize_bf16_to_fp8_1x128(d_x.ptr, T, H, d_q.ptr, d_s.ptr, nullptr));
    ensure(cudaStreamSynchronize(nullptr), "quantize"); // not cudaDeviceSynchronize: peers' waits may be running

    // the combine input: normal [capacity, H]; low latency [L, max_m, H]
    const std::int64_t y_rows = c.normal ? std::int64_t(N) * T : std::int64_t(c.L) * N * T;
    device_array<std::uint16_t> d_y(std::size_t(y_rows) * H), d_out(std::size_t(T) * H);
    ensure(cudaMemset(d_y.ptr, 0, std::size_t(y_rows) * H * 2), "clear y");

    bool ok = true;
    if (!o.no_check) ok = c.normal ? check_normal(c, buf, d_q.ptr, d_s.ptr, d_ids.ptr, d_w.ptr)
                                   : check_ll(c, buf, d_x.ptr, d_ids.ptr, d_w.ptr, d_y.ptr);
    c.result["check_passed"] = ok;
    c.phase(); // the check's temporaries are freed on every rank before anyone spins again
    if (!o.check_only && ok) {
      std::vector<std::vector<double>> rows;
      dispatch_bytes(c, &rows);
      double recv_rows = 0, recv_rows_cross = 0, sent_rows = 0, sent_rows_cross = 0;
      for (int s = 0; s < N; ++s) {
        recv_rows += rows[s][rank];
        recv_rows_cross += s == rank ? 0 : rows[s][rank];
        sent_rows += rows[rank][s];
        sent_rows_cross += s == rank ? 0 : rows[rank][s];
      }
      timing tm;
      if (c.normal)
        tm = time_rounds(c, buf, [&] { ensure(buf.dispatch(d_q.ptr, d_s.ptr, d_ids.ptr, d_w.ptr, T)); },
                         [&] { ensure(buf.combine(d_y.ptr, d_out.ptr)); });
      else
        tm = time_rounds(c, buf,
                         [&] {
                           ensure(buf.ll_dispatch_send(d_x.ptr, d_ids.ptr, T));
                           ensure(buf.ll_dispatch_recv());
                         },
                         [&] {
                           ensure(buf.ll_combine_send(d_y.ptr));
                           ensure(buf.ll_combine_recv(d_ids.ptr, d_w.ptr, T, d_out.ptr));
                         });
      const double fp8_row = H + H / 128 * 4.0, bf16_row = H * 2.0;
      const double du = median(tm.dispatch_us), cu = median(tm.combine_us);
      // DeepEP's counting: normal = rows received (self included), low latency = rows sent; combine = the same rows in bf16
      const double d_rows = c.normal ? recv_rows : sent_rows, d_cross = c.normal ? recv_rows_cross : sent_rows_cross;
      c.result["dispatch"] = {{"us", du}, {"gbs", d_rows * fp8_row / du * 1e-3}, {"gbs_cross_rank", d_cross * fp8_row / du * 1e-3},
                              {"rows", d_rows}, {"rows_cross_rank", d_cross}};
      c.result["combine"] = {{"us", cu}, {"gbs", d_rows * bf16_row / cu * 1e-3}, {"gbs_cross_rank", d_cross * bf16_row / cu * 1e-3}};
      c.result["nccl"] = run_nccl_baseline(c, buf, devices);
    }
    host_barrier(dir, "done", rank, N); // nobody frees its buffer while a peer may still write into it
    put_file(dir, "result." + std::to_string(rank), c.result.dump().data(), c.result.dump().size());
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench-ep rank %d: %s\n", rank, e.what());
    return 1;
  }
}

// -- the parent: spawn, wait, aggregate -------------------------------------------------------------------------
std::vector<std::string> child_args(const ep_bench_options& o, int rank, const std::string& dir) {
  return {"petrel", "bench-ep", "--ranks", std::to_string(o.ranks), "--tokens", std::to_string(o.tokens),
          "--hidden", std::to_string(o.hidden), "--topk", std::to_string(o.topk), "--experts", std::to_string(o.experts),
          "--mode", o.mode, "--iters", std::to_string(o.iters), "--warmup", std::to_string(o.warmup),
          "--timeout", std::to_string(o.timeout_s), "--child-rank", std::to_string(rank), "--rendezvous", dir}
      ;
}

int run_parent(const ep_bench_options& o) {
  char tmpl[] = "/tmp/petrel-ep-XXXXXX";
  if (!mkdtemp(tmpl)) {
    std::fprintf(stderr, "bench-ep: cannot create a temporary folder\n");
    return 1;
  }
  const std::string dir = tmpl;
  std::vector<int> rcs(o.ranks, 1);
  const auto t0 = clock_type::now();
  if (o.launch == "threads") {
    std::vector<std::thread> th;
    for (int r = 0; r < o.ranks; ++r) th.emplace_back([&, r] { rcs[r] = run_rank(o, r, dir); });
    for (auto& t : th) t.join();
  } else {
    std::vector<pid_t> pids(o.ranks, -1);
    for (int r = 0; r < o.ranks; ++r) {
      std::vector<std::string> args = child_args(o, r, dir);
      if (o.check_only) args.push_back("--check-only");
      if (o.no_check) args.push_back("--no-check");
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      const pid_t pid = fork();
      if (pid == 0) {
        execv("/proc/self/exe", argv.data());
        std::fprintf(stderr, "bench-ep: execv /proc/self/exe failed: %s\n", std::strerror(errno));
        _exit(127);
      }
      if (pid < 0) {
        std::fprintf(stderr, "bench-ep: fork failed: %s\n", std::strerror(errno));
        for (int q = 0; q < r; ++q) kill(pids[q], SIGKILL);
        return 1;
      }
      pids[r] = pid;
    }
    // wait; once one rank failed the others get 3 timeouts to finish (their waits time out), then are killed
    int left = o.ranks;
    auto kill_deadline = clock_type::time_point::max();
    const auto hard_deadline = clock_type::now() + std::chrono::seconds(1800);
    while (left > 0) {
      int status = 0;
      const pid_t done = waitpid(-1, &status, WNOHANG);
      if (done > 0) {
        for (int r = 0; r < o.ranks; ++r)
          if (pids[r] == done) {
            rcs[r] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
            pids[r] = -1;
            --left;
            if (rcs[r] != 0 && kill_deadline == clock_type::time_point::max())
              kill_deadline = clock_type::now() + std::chrono::duration_cast<clock_type::duration>(std::chrono::duration<double>(3 * o.timeout_s + 5));
          }
        continue;
      }
      if (clock_type::now() > kill_deadline || clock_type::now() > hard_deadline) {
        for (int r = 0; r < o.ranks; ++r)
          if (pids[r] > 0) {
            std::fprintf(stderr, "bench-ep: killing rank %d (pid %d), still running after a peer failed\n", r, int(pids[r]));
            kill(pids[r], SIGKILL);
          }
        kill_deadline = clock_type::time_point::max();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  const double wall_s = std::chrono::duration<double>(clock_type::now() - t0).count();

  std::vector<nlohmann::json> res;
  int failed = 0;
  for (int r = 0; r < o.ranks; ++r) {
    if (rcs[r] != 0) {
      std::fprintf(stderr, "bench-ep: rank %d exited with %d\n", r, rcs[r]);
      ++failed;
      continue;
    }
    std::ifstream f(dir + "/result." + std::to_string(r));
    res.push_back(nlohmann::json::parse(f, nullptr, false));
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
  if (failed) {
    std::fprintf(stderr, "bench-ep: %d of %d ranks failed\n", failed, o.ranks);
    return 1;
  }
  int devices = 0;
  std::set<int> used;
  for (const auto& r : res) used.insert(r.value("device", 0));
  devices = int(used.size());
  const std::string device_name = res.empty() ? "?" : res[0].value("device_name", "?");
  std::printf("bench-ep: %d ranks (%s) on %d GPU(s) [%s], %s mode, %d tokens/rank, hidden %d, top-%d of %d experts\n",
              o.ranks, o.launch.c_str(), devices, device_name.c_str(), o.mode.c_str(), o.tokens, o.hidden, o.topk, o.experts);
  std::printf("check against the host reference: passed on every rank (%.1f s wall)\n", wall_s);
  nlohmann::json out = {{"command", "bench-ep"}, {"ranks", o.ranks}, {"launch", o.launch}, {"mode", o.mode},
                        {"tokens", o.tokens}, {"hidden", o.hidden}, {"topk", o.topk}, {"experts", o.experts},
                        {"iters", o.iters}, {"gpus", devices}, {"device", device_name}, {"check_passed", true},
                        {"per_rank", res}};
  if (!o.check_only) {
    auto agg = [&](const char* part, const char* key) {
      double sum = 0, mx = 0;
      for (const auto& r : res) {
        const double v = r[part][key].get<double>();
        sum += v;
        mx = std::max(mx, v);
      }
      return std::pair<double, double>{sum / res.size(), mx};
    };
    const bool normal = o.mode == "normal";
    for (const char* part : {"dispatch", "combine"}) {
      const auto [us, us_max] = agg(part, "us");
      const auto [gbs, gbs_max] = agg(part, "gbs");
      const auto [gbs_x, gbs_x_max] = agg(part, "gbs_cross_rank");
      const bool d = std::string(part) == "dispatch";
      const double anchor = normal ? (d ? anchor_normal_dispatch_gbs : anchor_normal_combine_gbs)
                                   : (d ? anchor_ll_dispatch_us : anchor_ll_combine_us);
      // bandwidth: higher is better (ours / anchor); latency: lower is better (anchor / ours)
      const double ratio = normal ? gbs / anchor : anchor / us;
      std::printf("%-8s %9.1f us (rank mean of medians; slowest rank %.1f)  %7.1f GB/s per rank (cross-rank only %.1f)"
                  "  anchor %s%.0f %s  ratio %.2f\n",
                  part, us, us_max, gbs, gbs_x, "DeepEP EP8 H800 NVLink ", anchor, normal ? "GB/s" : "us", ratio);
      out[part] = {{"us", us}, {"us_slowest_rank", us_max}, {"gbs", gbs}, {"gbs_cross_rank", gbs_x},
                   {"anchor", anchor}, {"anchor_unit", normal ? "GB/s" : "us"},
                   {"anchor_source", "DeepEP, H800 NVLink, EP8, hidden 7168, top-8"}, {"ratio", ratio}};
      (void)gbs_max;
      (void)gbs_x_max;
    }
    const nlohmann::json& n0 = res[0]["nccl"];
    if (n0.value("skipped", true)) {
      std::printf("nccl     skipped: %s\n", n0.value("reason", "").c_str());
      out["nccl"] = n0;
    } else {
      const auto [us, us_max] = agg("nccl", "us");
      const auto [gbs, gbs_max] = agg("nccl", "gbs");
      std::printf("nccl     %9.1f us (slowest rank %.1f)  %7.1f GB/s per rank: ncclSend/ncclRecv of the dispatch bytes\n", us,
                  us_max, gbs);
      out["nccl"] = {{"skipped", false}, {"us", us}, {"us_slowest_rank", us_max}, {"gbs", gbs}};
      (void)gbs_max;
    }
    if (devices < o.ranks)
      std::printf("note: %d ranks share %d GPU(s): the exchange is HBM-to-HBM copies, not NVLink; the ratios are not like for like\n",
                  o.ranks, devices);
  }
  if (!o.json_path.empty()) {
    std::ofstream f(o.json_path);
    if (!f) {
      std::fprintf(stderr, "bench-ep: cannot write --json %s\n", o.json_path.c_str());
      return 2;
    }
    f << out.dump(2) << "\n";
  }
  return 0;
}

std::string validate(const ep_bench_options& o) {
  if (o.ranks < 1 || o.ranks > ep_max_ranks) return "--ranks " + std::to_string(o.ranks) + ": must be in [1, 8] (one host)";
  if (o.mode != "normal" && o.mode != "low_latency") return "--mode " + o.mode + ": must be normal or low_latency";
  if (o.launch != "processes" && o.launch != "threads") return "--launch " + o.launch + ": must be processes or threads";
  if (o.hidden <= 0 || o.hidden % 128 != 0 || o.hidden > 32768) return "--hidden " + std::to_string(o.hidden) + ": must be a multiple of 128 in [128, 32768]";
  if (o.experts <= 0 || o.experts % o.ranks != 0) return "--experts " + std::to_string(o.experts) + ": must be a positive multiple of --ranks " + std::to_string(o.ranks);
  if (o.topk < 1 || o.topk > 32 || o.topk > o.experts) return "--topk " + std::to_string(o.topk) + ": must be in [1, min(32, experts)]";
  const int max_tokens = o.mode == "normal" ? 65536 : 4096;
  if (o.tokens < 1 || o.tokens > max_tokens) return "--tokens " + std::to_string(o.tokens) + ": must be in [1, " + std::to_string(max_tokens) + "] for " + o.mode + " mode";
  if (o.iters < 1) return "--iters must be >= 1";
  if (o.warmup < 0) return "--warmup must be >= 0";
  if (!(o.timeout_s > 0)) return "--timeout must be > 0";
  if (o.child_rank >= o.ranks) return "--child-rank outside [0, ranks)";
  if (o.child_rank >= 0 && o.rendezvous.empty()) return "--child-rank needs --rendezvous";
  return "";
}
#endif // PETREL_HAVE_CUDA

const bool registered = petrel::cli::register_command(
    "bench-ep", "benchmark the intranode GPU expert all-to-all (dispatch/combine, normal and low-latency) with N ranks",
    [](CLI::App& sub) -> petrel::cli::command_fn {
      auto opt = std::make_shared<ep_bench_options>();
      sub.add_option("--ranks", opt->ranks, "ranks (processes or threads); rank r uses GPU r % device_count");
      sub.add_option("--tokens", opt->tokens, "tokens per rank (normal: 4096 as DeepEP; low_latency: 128)");
      sub.add_option("--hidden", opt->hidden, "hidden size (multiple of 128)");
      sub.add_option("--topk", opt->topk, "experts per token");
      sub.add_option("--experts", opt->experts, "routed experts (a multiple of --ranks)");
      sub.add_option("--mode", opt->mode, "normal | low_latency");
      sub.add_option("--launch", opt->launch, "processes (CUDA IPC handles) | threads (one process, direct pointers)");
      sub.add_option("--iters", opt->iters, "timed rounds (median reported)");
      sub.add_option("--warmup", opt->warmup, "untimed rounds first");
      sub.add_option("--timeout", opt->timeout_s, "seconds a rank waits for a peer before it reports an error");
      sub.add_option("--json", opt->json_path, "write the results as JSON to this file");
      sub.add_flag("--check-only", opt->check_only, "only compare with the host reference, no timing");
      sub.add_flag("--no-check", opt->no_check, "skip the reference check");
      sub.add_option("--child-rank", opt->child_rank)->group(""); // hidden: set when bench-ep re-executes itself
      sub.add_option("--rendezvous", opt->rendezvous)->group("");
      return [opt]() -> int {
#ifdef PETREL_HAVE_CUDA
        const std::string bad = validate(*opt);
        if (!bad.empty()) {
          std::fprintf(stderr, "bench-ep: %s\n", bad.c_str());
          return petrel::cli::exit_bad_input;
        }
        // Ranks as threads put one stream each on the GPU. Streams that share a hardware queue are serialised, so
        // a rank's spinning receive would block its peer's send queued behind it until the timeout. Some images
        // export CUDA_DEVICE_MAX_CONNECTIONS=1 (seen on the device): override it before the context exists.
        setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 1);
        // Lazy loading may make a kernel's first launch wait for the context to go idle, which a peer thread's
        // spinning receive prevents (see ep_buffer's constructor, which preloads its own kernels).
        setenv("CUDA_MODULE_LOADING", "EAGER", 1);
        if (opt->child_rank >= 0) return run_rank(*opt, opt->child_rank, opt->rendezvous);
        return run_parent(*opt);
#else
        (void)opt;
        std::fprintf(stderr, "bench-ep: built without CUDA\n");
        return 1;
#endif
      };
    });

} // namespace
