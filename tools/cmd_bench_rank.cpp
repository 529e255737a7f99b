// petrel bench-rank: one rank of the SGLang DeepSeek-V3 deployment on one GPU, at full shapes, with dummy fp8
// weights (128x128 block scales). Every layer's kernels run for real (MLA, dense and grouped fp8 GEMMs,
// routing, quantisation, norms, permute/combine, LM head, greedy sampling); only the expert all-to-all is
// replaced by a mirror exchange (the rank receives exactly the rows balanced peers would send it) and its
// time comes from a model (DeepEP's published figures unless flags say otherwise). See docs/bench-rank.md.
#include "tools/command.hpp"
#include "tools/bench_common.hpp"

#include <cstdio>
#include <memory>
#include <string>

#ifdef PETREL_HAVE_CUDA
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "kernels/cuda/fp8_layout.hpp"
#include "kernels/cuda/fp8_reference.hpp"
#include "kernels/cuda/gemm_fp8.hpp"
#include "kernels/cuda/grouped_gemm_fp8.hpp"
#include "kernels/cuda/layer_ops.hpp"
#include "kernels/cuda/quant.hpp"
#include "runtime/model_config.hpp"
#include "runtime/simulator.hpp"
#if __has_include("kernels/cuda/mla.hpp")
#include "kernels/cuda/mla.hpp"
#define PETREL_BENCH_RANK_HAVE_MLA 1
#endif
#endif

namespace {

struct rank_options {
  std::string preset;
  int layers = 61;
  int dense_layers = 3;
  int local_experts = 0;  // 0: the preset's
  long tokens = 0;        // prefill: tokens per rank (0: the preset's)
  int prompts = 0;        // prefill: prompts the tokens split into
  int batch = 0;          // decode: sequences
  int kv_len = 0;         // decode: KV length (tokens already in the cache, the new one included)
  std::string imbalance = "1";
  std::string a2a_model;
  std::string graphs = "auto";
  std::string gemm = "auto";
  std::string attention = "auto";
  std::string kv_cache = "auto";
  std::string json_path;
  int iters = 0;
};

#ifdef PETREL_HAVE_CUDA
using namespace petrel::cuda;

// -- DeepSeek-V3 shapes (ANCHORS.md) ----------------------------------------------------------
constexpr int H = 7168, q_lora = 1536, kv_lora = 512, heads = 128, nope = 128, rope = 64, v_dim = 128;
constexpr int qk = nope + rope, latent = kv_lora + rope, qkv_a = q_lora + kv_lora + rope;
constexpr int experts_total = 256, top_k = 8, n_group = 8, topk_group = 4, moe_inter = 2048, dense_inter = 18432;
constexpr int vocab = 129280, page = 64;
constexpr float routed_scaling = 2.5f, eps = 1e-6f;

// Published per-node throughput (ANCHORS.md).
constexpr double sglang_prefill_4k = 50302, deepseek_prefill = 62713, sglang_decode = 22282, deepseek_decode = 18598;

using petrel::bench::bench_error;
using petrel::bench::ensure;
void ensure(cublasStatus_t s, const std::string& what) {
  if (s != CUBLAS_STATUS_SUCCESS) throw bench_error(what + ": cuBLAS status " + std::to_string(static_cast<int>(s)));
}

// -- device memory ----------------------------------------------------------------------------------
class arena {
public:
  ~arena() {
    for (void* p : ptrs_) cudaFree(p);
  }
  template <typename T>
  T* alloc(std::int64_t count, const std::string& what) {
    void* p = nullptr;
    const std::size_t bytes = static_cast<std::size_t>(std::max<std::int64_t>(count, 1)) * sizeof(T);
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess)
      throw bench_error(fmt::format("cudaMalloc of {} ({:.2f} GB, {:.2f} GB held already): {}", what, bytes / 1e9,
                                    bytes_ / 1e9, cudaGetErrorString(e)));
    ptrs_.push_back(p);
    bytes_ += bytes;
    return static_cast<T*>(p);
  }
  double gb() const { return bytes_ / 1e9; }

private:
  std::vector<void*> ptrs_;
  std::size_t bytes_ = 0;
};

std::uint64_t next_seed() {
  static std::uint64_t s = 0x5eed;
  return ++s;
}

struct fp8_weight {
  std::uint8_t* w = nullptr;
  float* s = nullptr;
  int n = 0, k = 0, groups = 1;
};

// Dummy fp8 weight: e4m3 values over (-448, 448) and block scales that give a dequantised std near 1/sqrt(k),
// so activations stay O(1) through 61 layers (timings never run on zeros or infinities).
fp8_weight make_fp8(arena& a, int groups, int n, int k, const std::string& what) {
  fp8_weight w{nullptr, nullptr, n, k, groups};
  const std::int64_t count = static_cast<std::int64_t>(groups) * n * k;
  w.w = a.alloc<std::uint8_t>(count, what);
  w.s = a.alloc<float>(fp8_weight_scale_count(groups, n, k), what + " scales");
  ensure(fill_random_fp8(w.w, count, next_seed(), nullptr));
  const float base = 1.0f / (259.0f * std::sqrt(static_cast<float>(k)));
  ensure(fill_random_float(w.s, fp8_weight_scale_count(groups, n, k), 0.5f * base, 1.5f * base, next_seed(), nullptr));
  return w;
}

void* make_bf16(arena& a, std::int64_t count, std::int64_t row_len, const std::string& what) {
  void* p = a.alloc<std::uint16_t>(count, what);
  ensure(fill_random_bf16(p, count, row_len, next_seed(), nullptr));
  return p;
}

struct fp8_act {
  std::uint8_t* q = nullptr;
  float* s = nullptr;
  std::int64_t rows = 0;
  int k = 0;
};
fp8_act make_act(arena& a, std::int64_t rows, int k, const std::string& what) {
  fp8_act x{a.alloc<std::uint8_t>(rows * k, what), a.alloc<float>(fp8_act_scale_count(rows, k), what + " scales"), rows, k};
  ensure(cudaMemset(x.q, 0, rows * k), "memset");
  ensure(cudaMemset(x.s, 0, fp8_act_scale_count(rows, k) * sizeof(float)), "memset");
  return x;
}

// -- kernel classes ------------------------------------------------------------------------------------
enum class kclass { attention, gemm_dense, gemm_grouped, routing, quant, norm, moe_layout, other, count };
const char* const class_names[] = {"attention", "gemm dense", "gemm grouped", "routing", "quantisation", "norm+rope",
                                   "moe layout", "other"};
const char* const class_keys[] = {"attention", "gemm_dense", "gemm_grouped", "routing", "quant", "norm", "moe_layout", "other"};
constexpr int num_classes = static_cast<int>(kclass::count);

// The simulator's fields (runtime/simulator.hpp layer_kernel_times).
enum class sfield { attention_core, attention_gemm, mlp_gemm, shared_gemm, expert_gemm, head_gemm, routing, norm, quant, other, count };
const char* const sfield_keys[] = {"attention_core_us", "attention_gemm_us", "mlp_gemm_us", "shared_expert_gemm_us",
                                   "expert_gemm_us",    "head_gemm_us",      "routing_us",  "norm_us",
                                   "quant_us",          "other_us"};
constexpr int num_sfields = static_cast<int>(sfield::count);

// What an op is measured against: a rate from ANCHORS.md, applied to its FLOPs or bytes.
struct anchor_rate {
  const char* what = nullptr;  // null: no anchor
  double flops_per_s = 0, bytes_per_s = 0;
};

struct op {
  int layer = 0;        // -1: the head
  kclass cls;
  sfield field;
  std::string name;
  double flops = 0, bytes = 0;
  anchor_rate anchor;
  std::function<void(cudaStream_t)> fn;
};

// -- dense fp8 GEMMs: Petrel's fp8_gemm_nt or cuBLASLt, whichever was faster on this shape --------------
class dense_gemm_picker {
public:
  explicit dense_gemm_picker(std::string mode) : mode_(std::move(mode)) {}
  bool tuning = true;

  void run(const fp8_act& a, std::int64_t m, const fp8_weight& w, void* d, cudaStream_t st) {
    auto& e = entries_[{m, w.n, w.k}];
    if (!e.decided) decide(e, a, m, w, d, st);
    if (e.use_lt) ensure(e.lt->run(a.q, a.s, w.w, w.s, d, st));
    else ensure(fp8_gemm_nt(a.q, a.s, m, w.w, w.s, w.n, w.k, d, st));
  }

  nlohmann::json report() const {
    nlohmann::json j = nlohmann::json::array();
    for (const auto& [key, e] : entries_)
      j.push_back({{"m", std::get<0>(key)}, {"n", std::get<1>(key)}, {"k", std::get<2>(key)},
                   {"chosen", e.use_lt ? "cublaslt" : "petrel"}, {"petrel_us", e.petrel_us}, {"cublaslt_us", e.lt_us},
                   {"why", e.why}});
    return j;
  }

private:
  struct entry {
    bool decided = false, use_lt = false;
    std::unique_ptr<cublaslt_fp8_gemm_nt> lt;
    double petrel_us = 0, lt_us = 0;
    std::string why;
  };

  static double time_us(const std::function<void()>& f, cudaStream_t st) {
    cudaEvent_t a, b;
    ensure(cudaEventCreate(&a), "event");
    ensure(cudaEventCreate(&b), "event");
    f();
    ensure(cudaEventRecord(a, st), "event");
    for (int i = 0; i < 3; ++i) f();
    ensure(cudaEventRecord(b, st), "event");
    ensure(cudaEventSynchronize(b), "event sync");
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return ms * 1000.0 / 3;
  }

  void decide(entry& e, const fp8_act& a, std::int64_t m, const fp8_weight& w, void* d, cudaStream_t st) {
    if (!tuning) throw bench_error("dense GEMM shape first seen outside the warm-up pass");
    e.decided = true;
    const bool lt_shape = m % 4 == 0 && w.k % 512 == 0 && w.n % 16 == 0;
    if (mode_ != "petrel" && lt_shape) {
      e.lt = std::make_unique<cublaslt_fp8_gemm_nt>(m, w.n, w.k);
      if (!e.lt->ok() || e.lt->output_transposed()) {
        e.why = e.lt->ok() ? "cuBLASLt plan writes D transposed" : "cuBLASLt: " + e.lt->error();
        e.lt.reset();
      }
    } else if (!lt_shape) {
      e.why = "shape outside cuBLASLt's block-scaling limits";
    }
    e.petrel_us = time_us([&] { ensure(fp8_gemm_nt(a.q, a.s, m, w.w, w.s, w.n, w.k, d, st)); }, st);
    if (e.lt) e.lt_us = time_us([&] { ensure(e.lt->run(a.q, a.s, w.w, w.s, d, st)); }, st);
    if (mode_ == "cublaslt" && e.lt) e.use_lt = true;
    else if (mode_ == "auto" && e.lt && e.lt_us < e.petrel_us) e.use_lt = true;
    if (e.why.empty()) e.why = mode_ == "auto" ? "faster in this run" : "forced by --gemm";
  }

  std::string mode_;
  std::map<std::tuple<std::int64_t, int, int>, entry> entries_;
};

// -- cuBLAS bf16 GEMMs (router gate, LM head, absorbed W_UK / W_UV, the fallback attention) ---------------
struct blas {
  cublasHandle_t h = nullptr;
  void* workspace = nullptr;
  blas(arena& a, cudaStream_t st) {
    ensure(cublasCreate(&h), "cublasCreate");
    ensure(cublasSetStream(h, st), "cublasSetStream");
    workspace = a.alloc<std::uint8_t>(64 << 20, "cuBLAS workspace");
    ensure(cublasSetWorkspace(h, workspace, 64 << 20), "cublasSetWorkspace");  // graph capture needs a fixed workspace
  }
  ~blas() {
    if (h) cublasDestroy(h);
  }
  // Row-major D[m, n] (type dt, row stride ldd) = X[m, k] (bf16, row stride ldx) x W[n, k]^T (bf16, row stride ldw).
  void linear(const void* x, std::int64_t ldx, const void* w, std::int64_t ldw, void* d, std::int64_t ldd, cudaDataType dt,
              int m, int n, int k) {
    const float one = 1.0f, zero = 0.0f;
    ensure(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, w, CUDA_R_16BF, static_cast<int>(ldw), x, CUDA_R_16BF,
                    static_cast<int>(ldx), &zero, d, dt, static_cast<int>(ldd), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
       "cublasGemmEx");
  }
  // Column-major strided batched C = op(A) op(B), bf16 in/out, fp32 compute.
  void batched(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void* A, std::int64_t lda,
               std::int64_t sa, const void* B, std::int64_t ldb, std::int64_t sb, void* C, std::int64_t ldc,
               std::int64_t sc, int batch) {
    const float one = 1.0f, zero = 0.0f;
    ensure(cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, &one, A, CUDA_R_16BF, static_cast<int>(lda), sa, B, CUDA_R_16BF,
                                  static_cast<int>(ldb), sb, &zero, C, CUDA_R_16BF, static_cast<int>(ldc), sc, batch,
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
       "cublasGemmStridedBatchedEx");
  }
};

// -- the run's shape ---------------------------------------------------------------------------------------
struct run_shape {
  bool decode = false;
  std::string preset;
  int layers = 61, dense_layers = 3, local = 9;
  std::int64_t tokens = 16384;  // rows through the layer: prefill tokens, decode sequences
  int prompts = 4, prompt_len = 4096;  // prefill
  int kv_len = 2000;                   // decode
  std::vector<int> rows_per_expert;    // what the mirror exchange delivers per local expert per step
  double imbalance = 1.0;              // received rows / balanced rows
  bool graphs = false;
  int iters = 3;
  int ep = 32;
};

// The all-to-all model: DeepEP's published figures (or --a2a-model) at the deployment's EP size.
struct a2a_cost {
  double dispatch_us = 0, combine_us = 0;
  std::string source;
};

a2a_cost model_a2a(const run_shape& rs, const std::string& spec) {
  using namespace petrel::sim;
  deployment d;
  comm_figures c = deepep_published_figures();
  std::map<std::string, double> kv;
  std::string src = "DeepEP's published H800 figures (ANCHORS.md)";
  if (!spec.empty()) {
    std::stringstream ss(spec);
    std::string item;
    while (std::getline(ss, item, ',')) {
      const auto eq = item.find('=');
      if (eq == std::string::npos) throw std::invalid_argument("--a2a-model: '" + item + "' is not key=value");
      const std::string key = item.substr(0, eq);
      double v = 0;
      try {
        v = std::stod(item.substr(eq + 1));
      } catch (...) {
        throw std::invalid_argument("--a2a-model: '" + item + "' has no number");
      }
      static const char* known[] = {"dispatch_GBps", "combine_GBps", "latency_us", "dispatch_us", "combine_us", "ep"};
      if (std::find_if(std::begin(known), std::end(known), [&](const char* k) { return key == k; }) == std::end(known))
        throw std::invalid_argument("--a2a-model: unknown key '" + key +
                                    "' (known: dispatch_GBps, combine_GBps, latency_us, dispatch_us, combine_us, ep)");
      if (!(v >= 0)) throw std::invalid_argument("--a2a-model: '" + key + "' must be >= 0");
      kv[key] = v;
    }
    src = "--a2a-model " + spec + " (other values: DeepEP's published figures)";
  }
  const int ep = kv.count("ep") ? static_cast<int>(kv["ep"]) : rs.ep;
  d.prefill_ep = ep;
  d.decode_ep = ep;
  if (kv.count("latency_us")) d.rdma.latency_us = d.nvlink.latency_us = kv["latency_us"];
  if (kv.count("dispatch_GBps") || kv.count("combine_GBps")) {
    auto p = normal_mode_at(c, ep);
    p.ep = ep;
    if (kv.count("dispatch_GBps")) p.dispatch_GBps = kv["dispatch_GBps"];
    if (kv.count("combine_GBps")) p.combine_GBps = kv["combine_GBps"];
    c.normal = {p};
  }
  if (kv.count("dispatch_us") || kv.count("combine_us")) {
    auto p = low_latency_at(c, ep, c.ll_ref_tokens);
    p.ep = ep;
    if (kv.count("dispatch_us")) p.dispatch_us = kv["dispatch_us"];
    if (kv.count("combine_us")) p.combine_us = kv["combine_us"];
    c.low_latency = {p};
  }
  const double b = 1.0 / rs.imbalance;
  const auto cost = rs.decode ? decode_a2a_per_layer(d, c, static_cast<double>(rs.tokens), b)
                              : prefill_a2a_per_layer(d, c, static_cast<double>(rs.tokens), b);
  return {cost.dispatch_us, cost.combine_us, src};
}

// -- the rank ----------------------------------------------------------------------------------------------
class rank_bench {
public:
  rank_bench(const run_shape& rs, const rank_options& opt) : rs_(rs), opt_(opt), gemms_(opt.gemm) {}

  int run();

private:
  void build();
  void add(int layer, kclass c, sfield f, std::string name, std::function<void(cudaStream_t)> fn, double flops = 0,
           double bytes = 0, anchor_rate anchor = {}) {
    ops_.push_back({layer, c, f, std::move(name), flops, bytes, anchor, std::move(fn)});
  }
  void run_ops(cudaStream_t st, std::vector<cudaEvent_t>* events);
  double time_step_eager(int iters);
  double time_step_graph(int iters, std::string& why_not);
  void attention_prefill(int layer, cudaStream_t st);
  void attention_decode(int layer, cudaStream_t st);

  run_shape rs_;
  rank_options opt_;
  arena mem_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<blas> blas_;
  dense_gemm_picker gemms_;
  std::vector<op> ops_;

  // attention path
  bool use_mla_ = false;
  std::string attention_path_, attention_why_;
  float softmax_scale_ = 0;
  bool shared_kv_ = false;

  // per-layer weights
  struct layer_w {
    bool moe = false;
    void *in_norm, *post_norm, *q_norm, *kv_norm;
    fp8_weight wqkv_a, wq_b, wkv_b, wo;
    void *w_uk = nullptr, *w_uv = nullptr;  // decode (absorbed), bf16
    fp8_weight mlp_gu, mlp_d;               // dense
    void* gate = nullptr;                   // moe: bf16 [256, H]
    float* bias = nullptr;
    fp8_weight sh_gu, sh_d, ex_gu, ex_d;
    void* kv_cache = nullptr;               // [slots, 576] bf16
  };
  std::vector<layer_w> w_;
  void *final_norm_ = nullptr, *lm_head_ = nullptr;

  // activations
  void *x_, *residual_, *h_bf16_, *qkv_, *lat_, *q_, *kvb_ = nullptr, *k_ = nullptr, *v_ = nullptr, *attn_, *o_;
  void *q_abs_ = nullptr, *o_lat_ = nullptr, *scores_ = nullptr;
  fp8_act h_, qa_, ckv_, ao_, sh_mid_, mlp_mid_, ex_a_, ex_mid_;
  void *sh_gu_, *sh_out_, *mlp_gu_, *ex_gu_, *ex_y_;
  float *logits_, *topk_w_;
  int *topk_ids_, *recv_topk_, *pair_row_, *m_indices_ = nullptr, *masked_m_ = nullptr, *perm_ws_;
  std::int64_t ex_rows_ = 0, max_m_ = 0;
  int *positions_, *slots_, *cu_seqlens_ = nullptr, *block_table_ = nullptr, *seqlens_ = nullptr;
  float* cos_sin_;
  int max_pos_ = 0;
  void* mla_ws_ = nullptr;
  std::size_t mla_ws_bytes_ = 0;
  void* head_logits_;
  int* ids_;
  std::int64_t head_rows_ = 0, head_ld_ = 0;
};

void rank_bench::build() {
  const std::int64_t T = rs_.tokens;
  const bool dec = rs_.decode;
  const int L = rs_.local;

  // DeepSeek-V3's softmax scale and YaRN RoPE table (runtime's model_config does the arithmetic).
  petrel::model_config cfg;
  cfg.qk_nope_head_dim = nope;
  cfg.qk_rope_head_dim = rope;
  cfg.max_position_embeddings = 163840;
  cfg.rope.type = "yarn";
  cfg.rope.theta = 10000;
  cfg.rope.factor = 40;
  cfg.rope.original_max_position_embeddings = 4096;
  cfg.rope.beta_fast = 32;
  cfg.rope.beta_slow = 1;
  cfg.rope.mscale = 1;
  cfg.rope.mscale_all_dim = 1;
  softmax_scale_ = static_cast<float>(cfg.softmax_scale());
  max_pos_ = (dec ? rs_.kv_len : rs_.prompt_len) + 1;
  const auto table = rope_cos_sin_table(cfg.rope_inv_freq(), max_pos_, static_cast<float>(cfg.rope_attention_factor()));
  cos_sin_ = mem_.alloc<float>(table.size(), "RoPE table");
  ensure(cudaMemcpy(cos_sin_, table.data(), table.size() * sizeof(float), cudaMemcpyHostToDevice), "upload RoPE table");

  // positions and cache slots: prefill token i of a prompt sits at position i; decode's new token at kv_len - 1
  const int pages_per_seq = dec ? (rs_.kv_len + page - 1) / page : 0;
  std::vector<int> pos(T), slots(T);
  for (std::int64_t t = 0; t < T; ++t) {
    pos[t] = dec ? rs_.kv_len - 1 : static_cast<int>(t % rs_.prompt_len);
    slots[t] = dec ? static_cast<int>(t * pages_per_seq * page + rs_.kv_len - 1) : static_cast<int>(t);
  }
  positions_ = mem_.alloc<int>(T, "positions");
  slots_ = mem_.alloc<int>(T, "slots");
  ensure(cudaMemcpy(positions_, pos.data(), T * sizeof(int), cudaMemcpyHostToDevice), "upload");
  ensure(cudaMemcpy(slots_, slots.data(), T * sizeof(int), cudaMemcpyHostToDevice), "upload");
  if (dec) {
    std::vector<int> bt(T * pages_per_seq), sl(T, rs_.kv_len);
    for (std::int64_t b = 0; b < T; ++b)
      for (int p = 0; p < pages_per_seq; ++p) bt[b * pages_per_seq + p] = static_cast<int>(b * pages_per_seq + p);
    block_table_ = mem_.alloc<int>(bt.size(), "block table");
    seqlens_ = mem_.alloc<int>(T, "seqlens");
    ensure(cudaMemcpy(block_table_, bt.data(), bt.size() * sizeof(int), cudaMemcpyHostToDevice), "upload");
    ensure(cudaMemcpy(seqlens_, sl.data(), T * sizeof(int), cudaMemcpyHostToDevice), "upload");
  } else {
    std::vector<int> cu(rs_.prompts + 1);
    for (int p = 0; p <= rs_.prompts; ++p) cu[p] = p * rs_.prompt_len;
    cu_seqlens_ = mem_.alloc<int>(cu.size(), "cu_seqlens");
    ensure(cudaMemcpy(cu_seqlens_, cu.data(), cu.size() * sizeof(int), cudaMemcpyHostToDevice), "upload");
  }

  // The mirror exchange: which (token, slot) pairs this rank receives and for which local expert. Pairs are
  // spread evenly over the step's tokens, so no token sends two slots to one expert.
  const std::int64_t pairs = T * top_k;
  std::int64_t received = 0;
  for (int r : rs_.rows_per_expert) received += r;
  if (received > pairs) throw std::invalid_argument("the imbalance asks for more rows than tokens x top_k");
  std::vector<int> recv(pairs, -1);
  {
    std::vector<int> left = rs_.rows_per_expert;
    std::int64_t i = 0;
    int e = 0;
    while (i < received) {
      while (left[e] == 0) e = (e + 1) % L;
      recv[i * pairs / received] = e;
      --left[e];
      e = (e + 1) % L;
      ++i;
    }
  }
  recv_topk_ = mem_.alloc<int>(pairs, "mirror topk");
  ensure(cudaMemcpy(recv_topk_, recv.data(), pairs * sizeof(int), cudaMemcpyHostToDevice), "upload");
  const int max_rows_expert = *std::max_element(rs_.rows_per_expert.begin(), rs_.rows_per_expert.end());
  ex_rows_ = dec ? static_cast<std::int64_t>(L) * (max_m_ = std::max<std::int64_t>(128, (max_rows_expert + 127) / 128 * 128))
                 : moe_contiguous_capacity(received, L);

  // weights
  std::size_t free_b = 0, total_b = 0;
  w_.resize(rs_.layers);
  for (int l = 0; l < rs_.layers; ++l) {
    auto& lw = w_[l];
    const std::string n = "layer " + std::to_string(l);
    lw.moe = l >= rs_.dense_layers;
    lw.in_norm = make_bf16(mem_, H, H, n + " input norm");
    lw.post_norm = make_bf16(mem_, H, H, n + " post norm");
    lw.q_norm = make_bf16(mem_, q_lora, q_lora, n + " q norm");
    lw.kv_norm = make_bf16(mem_, kv_lora, kv_lora, n + " kv norm");
    lw.wqkv_a = make_fp8(mem_, 1, qkv_a, H, n + " q_a+kv_a");
    lw.wq_b = make_fp8(mem_, 1, heads * qk, q_lora, n + " q_b");
    if (dec) {
      lw.w_uk = make_bf16(mem_, static_cast<std::int64_t>(heads) * nope * kv_lora, kv_lora, n + " W_UK");
      lw.w_uv = make_bf16(mem_, static_cast<std::int64_t>(heads) * kv_lora * v_dim, v_dim, n + " W_UV");
    } else {
      lw.wkv_b = make_fp8(mem_, 1, heads * (nope + v_dim), kv_lora, n + " kv_b");
    }
    lw.wo = make_fp8(mem_, 1, H, heads * v_dim, n + " o_proj");
    if (!lw.moe) {
      lw.mlp_gu = make_fp8(mem_, 1, 2 * dense_inter, H, n + " mlp gate_up");
      lw.mlp_d = make_fp8(mem_, 1, H, dense_inter, n + " mlp down");
    } else {
      lw.gate = make_bf16(mem_, static_cast<std::int64_t>(experts_total) * H, H, n + " router");
      lw.bias = mem_.alloc<float>(experts_total, n + " router bias");
      ensure(fill_random_float(lw.bias, experts_total, -0.05f, 0.05f, next_seed(), nullptr));
      lw.sh_gu = make_fp8(mem_, 1, 2 * moe_inter, H, n + " shared gate_up");
      lw.sh_d = make_fp8(mem_, 1, H, moe_inter, n + " shared down");
      lw.ex_gu = make_fp8(mem_, L, 2 * moe_inter, H, n + " experts gate_up");
      lw.ex_d = make_fp8(mem_, L, H, moe_inter, n + " experts down");
    }
  }
  final_norm_ = make_bf16(mem_, H, H, "final norm");
  lm_head_ = make_bf16(mem_, static_cast<std::int64_t>(vocab) * H, H, "LM head");

  // activations
  x_ = make_bf16(mem_, T * H, H, "hidden");
  residual_ = mem_.alloc<std::uint16_t>(T * H, "residual");
  h_bf16_ = mem_.alloc<std::uint16_t>(T * H, "normed hidden");
  h_ = make_act(mem_, T, H, "normed hidden fp8");
  qkv_ = mem_.alloc<std::uint16_t>(T * qkv_a, "q_a/kv_a out");
  qa_ = make_act(mem_, T, q_lora, "q_a fp8");
  lat_ = mem_.alloc<std::uint16_t>(T * latent, "latent");
  ckv_ = make_act(mem_, T, kv_lora, "c_kv fp8");
  q_ = mem_.alloc<std::uint16_t>(T * heads * qk, "q");
  attn_ = mem_.alloc<std::uint16_t>(T * heads * v_dim, "attention out");
  ao_ = make_act(mem_, T, heads * v_dim, "attention out fp8");
  o_ = mem_.alloc<std::uint16_t>(T * H, "o_proj out");
  if (dec) {
    q_abs_ = mem_.alloc<std::uint16_t>(T * heads * latent, "absorbed q");
    o_lat_ = mem_.alloc<std::uint16_t>(T * heads * kv_lora, "latent attention out");
  } else {
    kvb_ = mem_.alloc<std::uint16_t>(T * heads * (nope + v_dim), "kv_b out");
    k_ = mem_.alloc<std::uint16_t>(T * heads * qk, "k");
    v_ = mem_.alloc<std::uint16_t>(T * heads * v_dim, "v");
  }
  logits_ = mem_.alloc<float>(T * experts_total, "router logits");
  topk_ids_ = mem_.alloc<int>(pairs, "topk ids");
  topk_w_ = mem_.alloc<float>(pairs, "topk weights");
  pair_row_ = mem_.alloc<int>(pairs, "pair rows");
  perm_ws_ = mem_.alloc<int>(moe_permute_workspace_ints(L), "permute workspace");
  sh_gu_ = mem_.alloc<std::uint16_t>(T * 2 * moe_inter, "shared gate_up");
  sh_mid_ = make_act(mem_, T, moe_inter, "shared mid fp8");
  sh_out_ = mem_.alloc<std::uint16_t>(T * H, "shared out");
  if (rs_.dense_layers > 0) {
    mlp_gu_ = mem_.alloc<std::uint16_t>(T * 2 * dense_inter, "mlp gate_up");
    mlp_mid_ = make_act(mem_, T, dense_inter, "mlp mid fp8");
  }
  ex_a_ = make_act(mem_, ex_rows_, H, "expert input fp8");
  ex_gu_ = mem_.alloc<std::uint16_t>(ex_rows_ * 2 * moe_inter, "expert gate_up");
  ex_mid_ = make_act(mem_, ex_rows_, moe_inter, "expert mid fp8");
  ex_y_ = mem_.alloc<std::uint16_t>(ex_rows_ * H, "expert out");
  ensure(cudaMemset(ex_gu_, 0, ex_rows_ * 2 * moe_inter * 2), "memset");
  ensure(cudaMemset(ex_y_, 0, ex_rows_ * H * 2), "memset");
  if (dec) masked_m_ = mem_.alloc<int>(L, "masked_m");
  else m_indices_ = mem_.alloc<int>(ex_rows_, "m_indices");
  head_rows_ = dec ? T : rs_.prompts;
  head_ld_ = dec ? H : static_cast<std::int64_t>(rs_.prompt_len) * H;  // prefill: the last token of each prompt
  head_logits_ = mem_.alloc<std::uint16_t>(head_rows_ * vocab, "logits");
  ids_ = mem_.alloc<int>(head_rows_, "sampled ids");

  // attention: Petrel's MLA kernels when committed and working, else the unfused cuBLAS fallback
#ifdef PETREL_BENCH_RANK_HAVE_MLA
  use_mla_ = opt_.attention != "fallback";
  if (dec && use_mla_) {
    mla_ws_bytes_ = mla_decode_workspace_bytes(static_cast<int>(T), heads, rs_.kv_len);
    if (mla_ws_bytes_ > 0) mla_ws_ = mem_.alloc<std::uint8_t>(mla_ws_bytes_, "MLA decode workspace");
  }
#else
  if (opt_.attention == "mla") throw bench_error("--attention mla: kernels/cuda/mla.hpp is not in this build");
  attention_why_ = "kernels/cuda/mla.hpp not in this build";
#endif
  if (!use_mla_ || opt_.attention == "auto") {
    // fallback scores: prefill [heads, S, S] per prompt; decode [B, heads, kv_len rounded to 8]
    const std::int64_t kvp = (rs_.kv_len + 7) / 8 * 8;
    const std::int64_t n = dec ? T * heads * kvp : static_cast<std::int64_t>(heads) * rs_.prompt_len * rs_.prompt_len;
    scores_ = mem_.alloc<std::uint16_t>(n, "fallback attention scores");
  }

  // KV cache: one per layer, unless memory says otherwise (--kv-cache shared reuses layer 0's for every layer)
  const std::int64_t cache_slots = dec ? T * pages_per_seq * page : T;
  const double cache_gb = cache_slots * latent * 2 / 1e9;
  ensure(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  shared_kv_ = opt_.kv_cache == "shared" ||
               (opt_.kv_cache == "auto" && cache_gb * rs_.layers > free_b / 1e9 - 2.0);
  if (opt_.kv_cache == "per-layer" && cache_gb * rs_.layers > free_b / 1e9 - 1.0)
    throw bench_error(fmt::format("--kv-cache per-layer needs {:.1f} GB, {:.1f} GB free", cache_gb * rs_.layers, free_b / 1e9));
  for (int l = 0; l < rs_.layers; ++l) {
    if (shared_kv_ && l > 0) {
      w_[l].kv_cache = w_[0].kv_cache;
      continue;
    }
    w_[l].kv_cache = make_bf16(mem_, cache_slots * latent, latent, "KV cache layer " + std::to_string(l));
  }
  ensure(cudaDeviceSynchronize(), "weight fill");

  // -- the step, op by op ---------------------------------------------------------------------------------
  const double Td = static_cast<double>(T);
  const double hbm = 3.0e12;  // measured H100 device copy (ANCHORS.md)
  const anchor_rate copy_rate{"HBM copy 3.0 TB/s", 0, hbm};
  auto dense_rate = [&](double k) -> anchor_rate {
    if (dec) return {"DeepGEMM dense 645 TFLOPS (M=128) / 1,688 GB/s (M=64)", 645e12, 1688e9};
    return k >= 16384 ? anchor_rate{"DeepGEMM dense 1,520 TFLOPS", 1520e12, 0} : anchor_rate{"DeepGEMM dense 1,410 TFLOPS", 1410e12, 0};
  };
  auto dense_gemm = [&](int l, sfield f, const std::string& name, const fp8_act* a, const fp8_weight* w, void* d) {
    const double flops = 2.0 * Td * w->n * w->k;
    const double bytes = Td * w->k + static_cast<double>(w->n) * w->k + Td * w->n * 2;
    add(l, kclass::gemm_dense, f, name, [this, a, w, d, T](cudaStream_t st) { gemms_.run(*a, T, *w, d, st); }, flops, bytes,
        dense_rate(w->k));
  };
  const double recv_rows = static_cast<double>(received);

  for (int l = 0; l < rs_.layers; ++l) {
    auto* lw = &w_[l];
    // -- attention ----------------------------------------------------------------------------------------
    add(l, kclass::norm, sfield::norm, "input RMSNorm (+residual, ->fp8)", [this, lw, l, T](cudaStream_t st) {
      ensure(rmsnorm_bf16(x_, H, residual_, l > 0, lw->in_norm, T, H, eps, nullptr, H, h_.q, h_.s, st));
    }, 0, Td * H * 7, copy_rate);
    dense_gemm(l, sfield::attention_gemm, "q_a+kv_a GEMM", &h_, &lw->wqkv_a, qkv_);
    add(l, kclass::norm, sfield::norm, "q_a RMSNorm (->fp8)", [this, lw, T](cudaStream_t st) {
      ensure(rmsnorm_bf16(qkv_, qkv_a, nullptr, false, lw->q_norm, T, q_lora, eps, nullptr, q_lora, qa_.q, qa_.s, st));
    }, 0, Td * q_lora * 3, copy_rate);
    add(l, kclass::norm, sfield::norm, "kv_a RMSNorm (->latent, fp8)", [this, lw, T](cudaStream_t st) {
      ensure(rmsnorm_bf16(static_cast<std::uint16_t*>(qkv_) + q_lora, qkv_a, nullptr, false, lw->kv_norm, T, kv_lora, eps, lat_,
                      latent, ckv_.q, ckv_.s, st));
    }, 0, Td * kv_lora * 5, copy_rate);
    add(l, kclass::norm, sfield::norm, "k_pe RoPE (->latent)", [this, T](cudaStream_t st) {
      ensure(rope_interleaved_bf16(static_cast<std::uint16_t*>(qkv_) + q_lora + kv_lora, qkv_a, rope,
                               static_cast<std::uint16_t*>(lat_) + kv_lora, latent, rope, T, 1, rope, positions_, cos_sin_,
                               max_pos_, st));
    }, 0, Td * rope * 4, copy_rate);
    add(l, kclass::other, sfield::other, "latent KV-cache store", [this, lw, T](cudaStream_t st) {
      ensure(kv_cache_store_bf16(lat_, latent, T, slots_, latent, lw->kv_cache, st));
    }, 0, Td * latent * 4, copy_rate);
    dense_gemm(l, sfield::attention_gemm, "q_b GEMM", &qa_, &lw->wq_b, q_);
    if (!dec) {
      add(l, kclass::norm, sfield::norm, "q RoPE", [this, T](cudaStream_t st) {
        auto* q = static_cast<std::uint16_t*>(q_) + nope;
        ensure(rope_interleaved_bf16(q, heads * qk, qk, q, heads * qk, qk, T, heads, rope, positions_, cos_sin_, max_pos_, st));
      }, 0, Td * heads * rope * 4, copy_rate);
      dense_gemm(l, sfield::attention_gemm, "kv_b GEMM", &ckv_, &lw->wkv_b, kvb_);
      add(l, kclass::other, sfield::other, "K/V assembly", [this, T](cudaStream_t st) {
        ensure(mla_assemble_kv_bf16(kvb_, lat_, latent, kv_lora, T, heads, nope, rope, v_dim, k_, v_, st));
      }, 0, Td * heads * (nope + v_dim) * 2 * 2 + Td * heads * rope * 2, copy_rate);
      // causal attention FLOPs: QK^T and PV over the lower triangle
      const double pairs_causal = static_cast<double>(rs_.prompts) * rs_.prompt_len * (rs_.prompt_len + 1) / 2.0;
      add(l, kclass::attention, sfield::attention_core, "MLA prefill attention",
          [this, l](cudaStream_t st) { attention_prefill(l, st); }, 2.0 * heads * (qk + v_dim) * pairs_causal, 0,
          {"FlashMLA 660 TFLOPS", 660e12, 0});
    } else {
      add(l, kclass::norm, sfield::norm, "q RoPE (->absorbed q)", [this, T](cudaStream_t st) {
        ensure(rope_interleaved_bf16(static_cast<std::uint16_t*>(q_) + nope, heads * qk, qk,
                                 static_cast<std::uint16_t*>(q_abs_) + kv_lora, heads * latent, latent, T, heads, rope,
                                 positions_, cos_sin_, max_pos_, st));
      }, 0, Td * heads * rope * 4, copy_rate);
      add(l, kclass::gemm_dense, sfield::attention_gemm, "W_UK absorb (bf16 batched)", [this, lw, T](cudaStream_t) {
        blas_->batched(CUBLAS_OP_N, CUBLAS_OP_N, kv_lora, static_cast<int>(T), nope, lw->w_uk, kv_lora,
                       static_cast<std::int64_t>(nope) * kv_lora, q_, heads * qk, qk, q_abs_, heads * latent, latent, heads);
      }, 2.0 * Td * heads * nope * kv_lora, heads * nope * kv_lora * 2.0, {"bf16 798 TFLOPS", 798e12, 0});
      const double kv_bytes = Td * rs_.kv_len * latent * 2.0;
      add(l, kclass::attention, sfield::attention_core, "MLA decode attention",
          [this, l](cudaStream_t st) { attention_decode(l, st); }, 2.0 * Td * heads * rs_.kv_len * (latent + kv_lora),
          kv_bytes, {"FlashMLA 3,000 GB/s", 0, 3000e9});
      add(l, kclass::gemm_dense, sfield::attention_gemm, "W_UV (bf16 batched)", [this, lw, T](cudaStream_t) {
        blas_->batched(CUBLAS_OP_N, CUBLAS_OP_N, v_dim, static_cast<int>(T), kv_lora, lw->w_uv, v_dim,
                       static_cast<std::int64_t>(kv_lora) * v_dim, o_lat_, heads * kv_lora, kv_lora, attn_, heads * v_dim,
                       v_dim, heads);
      }, 2.0 * Td * heads * kv_lora * v_dim, heads * kv_lora * v_dim * 2.0, {"bf16 798 TFLOPS", 798e12, 0});
    }
    add(l, kclass::quant, sfield::quant, "attention out ->fp8", [this, T](cudaStream_t st) {
      ensure(quantize_bf16_to_fp8_1x128(attn_, T, heads * v_dim, ao_.q, ao_.s, st));
    }, 0, Td * heads * v_dim * 3, copy_rate);
    dense_gemm(l, sfield::attention_gemm, "o_proj GEMM", &ao_, &lw->wo, o_);
    // -- FFN ------------------------------------------------------------------------------------------------
    add(l, kclass::norm, sfield::norm, "post RMSNorm (+residual, ->bf16, fp8)", [this, lw, T](cudaStream_t st) {
      ensure(rmsnorm_bf16(o_, H, residual_, true, lw->post_norm, T, H, eps, h_bf16_, H, h_.q, h_.s, st));
    }, 0, Td * H * 9, copy_rate);
    if (!lw->moe) {
      dense_gemm(l, sfield::mlp_gemm, "MLP gate_up GEMM", &h_, &lw->mlp_gu, mlp_gu_);
      add(l, kclass::quant, sfield::quant, "MLP SwiGLU (->fp8)", [this, T](cudaStream_t st) {
        ensure(swiglu_bf16(mlp_gu_, T, dense_inter, nullptr, mlp_mid_.q, mlp_mid_.s, nullptr, nullptr, 0, st));
      }, 0, Td * dense_inter * 5, copy_rate);
      dense_gemm(l, sfield::mlp_gemm, "MLP down GEMM", &mlp_mid_, &lw->mlp_d, x_);
      continue;
    }
    add(l, kclass::routing, sfield::routing, "router gate GEMM (bf16->fp32)", [this, lw, T](cudaStream_t) {
      blas_->linear(h_bf16_, H, lw->gate, H, logits_, experts_total, CUDA_R_32F, static_cast<int>(T), experts_total, H);
    }, 2.0 * Td * experts_total * H, Td * H * 2 + experts_total * H * 2.0, {"bf16 798 TFLOPS", 798e12, 0});
    add(l, kclass::routing, sfield::routing, "noaux_tc top-k", [this, lw, T](cudaStream_t st) {
      ensure(noaux_tc_route(logits_, lw->bias, T, experts_total, n_group, topk_group, top_k, true, routed_scaling, topk_ids_,
                        topk_w_, st));
    }, 0, Td * experts_total * 4, copy_rate);
    dense_gemm(l, sfield::shared_gemm, "shared gate_up GEMM", &h_, &lw->sh_gu, sh_gu_);
    add(l, kclass::quant, sfield::quant, "shared SwiGLU (->fp8)", [this, T](cudaStream_t st) {
      ensure(swiglu_bf16(sh_gu_, T, moe_inter, nullptr, sh_mid_.q, sh_mid_.s, nullptr, nullptr, 0, st));
    }, 0, Td * moe_inter * 5, copy_rate);
    dense_gemm(l, sfield::shared_gemm, "shared down GEMM", &sh_mid_, &lw->sh_d, sh_out_);
    const double R = recv_rows;
    if (!dec) {
      add(l, kclass::moe_layout, sfield::quant, "permute (contiguous)", [this, T](cudaStream_t st) {
        ensure(moe_permute_contiguous(h_.q, h_.s, T, H, recv_topk_, top_k, rs_.local, ex_rows_, ex_a_.q, ex_a_.s, m_indices_,
                                  pair_row_, perm_ws_, st));
      }, 0, R * H * 2, copy_rate);
      add(l, kclass::gemm_grouped, sfield::expert_gemm, "experts gate_up (grouped contiguous)", [this, lw](cudaStream_t st) {
        ensure(m_grouped_fp8_gemm_nt_contiguous(ex_a_.q, ex_a_.s, ex_rows_, m_indices_, lw->ex_gu.w, lw->ex_gu.s, rs_.local,
                                            2 * moe_inter, H, ex_gu_, st));
      }, 2.0 * R * 2 * moe_inter * H, 0, {"DeepGEMM contiguous 1,346 TFLOPS", 1346e12, 0});
      add(l, kclass::quant, sfield::quant, "experts SwiGLU (->fp8)", [this](cudaStream_t st) {
        ensure(swiglu_bf16(ex_gu_, ex_rows_, moe_inter, nullptr, ex_mid_.q, ex_mid_.s, m_indices_, nullptr, 0, st));
      }, 0, R * moe_inter * 5, copy_rate);
      add(l, kclass::gemm_grouped, sfield::expert_gemm, "experts down (grouped contiguous)", [this, lw](cudaStream_t st) {
        ensure(m_grouped_fp8_gemm_nt_contiguous(ex_mid_.q, ex_mid_.s, ex_rows_, m_indices_, lw->ex_d.w, lw->ex_d.s, rs_.local,
                                            H, moe_inter, ex_y_, st));
      }, 2.0 * R * H * moe_inter, 0, {"DeepGEMM contiguous 1,214 TFLOPS", 1214e12, 0});
    } else {
      add(l, kclass::moe_layout, sfield::quant, "permute (masked)", [this, T](cudaStream_t st) {
        ensure(moe_permute_masked(h_.q, h_.s, T, H, recv_topk_, top_k, rs_.local, max_m_, ex_a_.q, ex_a_.s, masked_m_, pair_row_,
                              perm_ws_, st));
      }, 0, R * H * 2, copy_rate);
      const double L_d = rs_.local;
      add(l, kclass::gemm_grouped, sfield::expert_gemm, "experts gate_up (grouped masked)", [this, lw](cudaStream_t st) {
        ensure(m_grouped_fp8_gemm_nt_masked(ex_a_.q, ex_a_.s, rs_.local, max_m_, masked_m_, lw->ex_gu.w, lw->ex_gu.s,
                                        2 * moe_inter, H, ex_gu_, st));
      }, 2.0 * R * 2 * moe_inter * H, L_d * 2 * moe_inter * H, {"DeepGEMM masked 932 TFLOPS / 2,064 GB/s", 932e12, 2064e9});
      add(l, kclass::quant, sfield::quant, "experts SwiGLU (->fp8)", [this](cudaStream_t st) {
        ensure(swiglu_bf16(ex_gu_, ex_rows_, moe_inter, nullptr, ex_mid_.q, ex_mid_.s, nullptr, masked_m_, max_m_, st));
      }, 0, R * moe_inter * 5, copy_rate);
      add(l, kclass::gemm_grouped, sfield::expert_gemm, "experts down (grouped masked)", [this, lw](cudaStream_t st) {
        ensure(m_grouped_fp8_gemm_nt_masked(ex_mid_.q, ex_mid_.s, rs_.local, max_m_, masked_m_, lw->ex_d.w, lw->ex_d.s, H,
                                        moe_inter, ex_y_, st));
      }, 2.0 * R * H * moe_inter, L_d * H * moe_inter, {"DeepGEMM masked 815 TFLOPS / 2,064 GB/s", 815e12, 2064e9});
    }
    add(l, kclass::moe_layout, sfield::quant, "combine (weighted, +shared)", [this, T](cudaStream_t st) {
      ensure(moe_combine_bf16(ex_y_, pair_row_, topk_w_, T, top_k, H, sh_out_, x_, st));
    }, 0, R * H * 2 + Td * H * 4, copy_rate);
  }
  // -- head ---------------------------------------------------------------------------------------------------
  add(-1, kclass::norm, sfield::norm, "final RMSNorm (+residual)", [this, T](cudaStream_t st) {
    ensure(rmsnorm_bf16(x_, H, residual_, rs_.layers > 0, final_norm_, T, H, eps, h_bf16_, H, nullptr, nullptr, st));
  }, 0, Td * H * 8, copy_rate);
  add(-1, kclass::gemm_dense, sfield::head_gemm, "LM head (bf16)", [this](cudaStream_t) {
    const std::uint16_t* src = static_cast<std::uint16_t*>(h_bf16_) + (rs_.decode ? 0 : (rs_.prompt_len - 1) * H);
    blas_->linear(src, head_ld_, lm_head_, H, head_logits_, vocab, CUDA_R_16BF, static_cast<int>(head_rows_), vocab, H);
  }, 2.0 * head_rows_ * vocab * H, static_cast<double>(vocab) * H * 2, {"bf16 798 TFLOPS / HBM 3.0 TB/s", 798e12, hbm});
  add(-1, kclass::other, sfield::other, "greedy sampling (argmax)", [this](cudaStream_t st) {
    ensure(argmax_bf16(head_logits_, head_rows_, vocab, vocab, ids_, st));
  }, 0, head_rows_ * vocab * 2.0, copy_rate);
}

void rank_bench::attention_prefill(int layer, cudaStream_t st) {
  const int S = rs_.prompt_len;
#ifdef PETREL_BENCH_RANK_HAVE_MLA
  if (use_mla_) {
    auto s = mla_prefill_bf16(q_, k_, v_, cu_seqlens_, cu_seqlens_, rs_.prompts, S, S, heads, softmax_scale_, attn_, st);
    if (s.ok()) return;
    if (!gemms_.tuning || opt_.attention == "mla") throw bench_error("mla_prefill_bf16: " + s.message);
    use_mla_ = false;  // first call, in the warm-up: fall back for the whole run
    attention_why_ = "mla_prefill_bf16 failed: " + s.message;
  }
#endif
  (void)layer;
  // Fallback (unfused, cuBLAS): per prompt, S = Q K^T for all heads, causal softmax, O = P V.
  for (int p = 0; p < rs_.prompts; ++p) {
    const std::int64_t t0 = static_cast<std::int64_t>(p) * S;
    const auto* q = static_cast<const std::uint16_t*>(q_) + t0 * heads * qk;
    const auto* k = static_cast<const std::uint16_t*>(k_) + t0 * heads * qk;
    const auto* v = static_cast<const std::uint16_t*>(v_) + t0 * heads * v_dim;
    auto* o = static_cast<std::uint16_t*>(attn_) + t0 * heads * v_dim;
    const std::int64_t SS = static_cast<std::int64_t>(S) * S;
    blas_->batched(CUBLAS_OP_T, CUBLAS_OP_N, S, S, qk, k, heads * qk, qk, q, heads * qk, qk, scores_, S, SS, heads);
    ensure(masked_softmax_bf16(scores_, static_cast<std::int64_t>(heads) * S, S, S, softmax_scale_, S, 0, 0, st));
    blas_->batched(CUBLAS_OP_N, CUBLAS_OP_N, v_dim, S, S, v, heads * v_dim, v_dim, scores_, S, SS, o, heads * v_dim, v_dim,
                   heads);
  }
}

void rank_bench::attention_decode(int layer, cudaStream_t st) {
  const int B = static_cast<int>(rs_.tokens);
  const int pages_per_seq = (rs_.kv_len + page - 1) / page;
#ifdef PETREL_BENCH_RANK_HAVE_MLA
  if (use_mla_) {
    auto s = mla_decode_bf16(q_abs_, w_[layer].kv_cache, block_table_, pages_per_seq, seqlens_, B, heads, rs_.kv_len,
                             softmax_scale_, o_lat_, mla_ws_, mla_ws_bytes_, st);
    if (s.ok()) return;
    if (!gemms_.tuning || opt_.attention == "mla") throw bench_error("mla_decode_bf16: " + s.message);
    use_mla_ = false;
    attention_why_ = "mla_decode_bf16 failed: " + s.message;
  }
#endif
  // Fallback (unfused, cuBLAS): every sequence's pages are contiguous in this benchmark's block table, so one
  // strided batched GEMM per product covers the batch.
  const std::int64_t kvp = (rs_.kv_len + 7) / 8 * 8;
  const std::int64_t seq_stride = static_cast<std::int64_t>(pages_per_seq) * page * latent;
  const int L = rs_.kv_len;
  blas_->batched(CUBLAS_OP_T, CUBLAS_OP_N, L, heads, latent, w_[layer].kv_cache, latent, seq_stride, q_abs_, latent,
                 static_cast<std::int64_t>(heads) * latent, scores_, kvp, heads * kvp, B);
  ensure(masked_softmax_bf16(scores_, static_cast<std::int64_t>(B) * heads, L, kvp, softmax_scale_, 0, 0, L, st));
  blas_->batched(CUBLAS_OP_N, CUBLAS_OP_N, kv_lora, heads, L, w_[layer].kv_cache, latent, seq_stride, scores_, kvp,
                 heads * kvp, o_lat_, kv_lora, static_cast<std::int64_t>(heads) * kv_lora, B);
}

void rank_bench::run_ops(cudaStream_t st, std::vector<cudaEvent_t>* events) {
  for (std::size_t i = 0; i < ops_.size(); ++i) {
    if (events) ensure(cudaEventRecord((*events)[2 * i], st), "event");
    ops_[i].fn(st);
    if (events) ensure(cudaEventRecord((*events)[2 * i + 1], st), "event");
  }
}

double rank_bench::time_step_eager(int iters) {
  return petrel::bench::median_us([&] { run_ops(stream_, nullptr); }, 0, iters, stream_);
}

double rank_bench::time_step_graph(int iters, std::string& why_not) {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  if (cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
    why_not = "cudaStreamBeginCapture failed";
    return 0;
  }
  try {
    run_ops(stream_, nullptr);
  } catch (const std::exception& e) {
    cudaStreamEndCapture(stream_, &graph);
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();
    why_not = std::string("capture failed: ") + e.what();
    return 0;
  }
  if (cudaStreamEndCapture(stream_, &graph) != cudaSuccess || cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) {
    cudaGetLastError();
    why_not = "graph capture/instantiation failed";
    if (graph) cudaGraphDestroy(graph);
    return 0;
  }
  const double us = petrel::bench::median_us([&] { ensure(cudaGraphLaunch(exec, stream_), "graph launch"); }, 1, iters, stream_);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return us;
}

std::string today() {
  std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::gmtime(&now));
  return buf;
}

int rank_bench::run() {
  int dev = 0;
  cudaDeviceProp prop{};
  ensure(cudaGetDevice(&dev), "cudaGetDevice");
  ensure(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
  ensure(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "stream");
  blas_ = std::make_unique<blas>(mem_, stream_);
  const auto t_setup = std::chrono::steady_clock::now();
  build();
  const double setup_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_setup).count();

  // 1. warm-up: picks each dense GEMM's implementation, settles the attention path
  gemms_.tuning = true;
  run_ops(stream_, nullptr);
  ensure(cudaStreamSynchronize(stream_), "warm-up step");
  gemms_.tuning = false;
  attention_path_ = use_mla_ ? "Petrel MLA kernels (kernels/cuda/mla.hpp)" : "FALLBACK: unfused cuBLAS QK^T / softmax / PV";
  int overflow = 0;
  ensure(cudaMemcpy(&overflow, perm_ws_, sizeof(int), cudaMemcpyDeviceToHost), "overflow flag");
  if (overflow) throw bench_error("the permute overflowed its layout (a bug: capacities come from the mirror map)");

  // 2. breakdown: events around every op, median over passes
  const int passes = std::max(1, std::min(rs_.iters, 3));
  std::vector<cudaEvent_t> ev(2 * ops_.size());
  for (auto& e : ev) ensure(cudaEventCreate(&e), "event");
  std::vector<std::vector<double>> op_us(ops_.size());
  for (int p = 0; p < passes; ++p) {
    run_ops(stream_, &ev);
    ensure(cudaStreamSynchronize(stream_), "breakdown step");
    for (std::size_t i = 0; i < ops_.size(); ++i) {
      float ms = 0;
      cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]);
      op_us[i].push_back(ms * 1000.0);
    }
  }
  for (auto& e : ev) cudaEventDestroy(e);
  std::vector<double> med(ops_.size());
  for (std::size_t i = 0; i < ops_.size(); ++i) {
    auto v = op_us[i];
    std::sort(v.begin(), v.end());
    med[i] = v[v.size() / 2];
  }

  // 3. the step: eager (and under a CUDA graph for decode)
  const double eager_us = time_step_eager(rs_.iters);
  double graph_us = 0;
  std::string graph_why;
  if (rs_.graphs) graph_us = time_step_graph(rs_.iters, graph_why);
  const double step_us = graph_us > 0 ? graph_us : eager_us;
  std::vector<int> ids(head_rows_);
  ensure(cudaMemcpy(ids.data(), ids_, head_rows_ * sizeof(int), cudaMemcpyDeviceToHost), "sampled ids");

  // -- aggregate --------------------------------------------------------------------------------------------
  // per layer kind: class sums (µs per layer), simulator fields
  struct kind_sum {
    int count = 0;
    std::array<double, num_classes> cls{};
    std::array<double, num_sfields> field{};
  };
  std::map<std::string, kind_sum> kinds;  // "dense", "moe", "head"
  std::vector<std::array<double, num_classes>> per_layer(rs_.layers + 1);
  for (auto& a : per_layer) a.fill(0);
  for (std::size_t i = 0; i < ops_.size(); ++i) {
    const auto& o = ops_[i];
    const int li = o.layer < 0 ? rs_.layers : o.layer;
    per_layer[li][static_cast<int>(o.cls)] += med[i];
  }
  for (int l = 0; l <= rs_.layers; ++l) kinds[l == rs_.layers ? "head" : (w_[l].moe ? "moe" : "dense")].count++;
  for (std::size_t i = 0; i < ops_.size(); ++i) {
    const auto& o = ops_[i];
    const std::string kind = o.layer < 0 ? "head" : (w_[o.layer].moe ? "moe" : "dense");
    auto& k = kinds[kind];
    k.cls[static_cast<int>(o.cls)] += med[i] / k.count;
    k.field[static_cast<int>(o.field)] += med[i] / k.count;
  }
  double kernel_sum = 0;
  for (double m : med) kernel_sum += m;
  const int moe_layers = kinds.count("moe") ? kinds["moe"].count : 0;

  // per op name: time per step, achieved rate, time at the anchor rate
  struct name_sum {
    double us = 0, flops = 0, bytes = 0, anchor_us = 0;
    kclass cls;
    std::string anchor;
  };
  std::map<std::string, name_sum> by_name;
  for (std::size_t i = 0; i < ops_.size(); ++i) {
    const auto& o = ops_[i];
    auto& n = by_name[o.name];
    n.us += med[i];
    n.flops += o.flops;
    n.bytes += o.bytes;
    n.cls = o.cls;
    if (o.anchor.what) {
      n.anchor = o.anchor.what;
      // the anchor's time: the larger of its compute and its memory time (where it gives both)
      const double tc = o.anchor.flops_per_s > 0 ? o.flops / o.anchor.flops_per_s * 1e6 : 0.0;
      const double tm = o.anchor.bytes_per_s > 0 ? o.bytes / o.anchor.bytes_per_s * 1e6 : 0.0;
      n.anchor_us += std::max(tc, tm);
    }
  }

  const a2a_cost a2a = model_a2a(rs_, opt_.a2a_model);
  const double a2a_step_us = (a2a.dispatch_us + a2a.combine_us) * moe_layers;
  const double tokens = static_cast<double>(rs_.tokens);
  const double tps_compute = tokens / (step_us * 1e-6);
  const double tps_serial = tokens / ((step_us + a2a_step_us) * 1e-6);
  const double tps_overlap = tokens / (std::max(step_us, a2a_step_us) * 1e-6);
  // SGLang's prefill figure for this prompt length where it published one (1K / 2K / 4K), else the 4K one
  const double anchor_sg = rs_.decode ? sglang_decode
                           : rs_.prompt_len == 1024 ? 57674 : rs_.prompt_len == 2048 ? 54543 : sglang_prefill_4k;
  const double anchor_ds = rs_.decode ? deepseek_decode : deepseek_prefill;

  // -- print ------------------------------------------------------------------------------------------------
  std::printf("bench-rank %s on %s (%d SMs), %s\n", rs_.preset.c_str(), prop.name, prop.multiProcessorCount, today().c_str());
  if (rs_.decode)
    std::printf("  %d layers (%d dense + %d MoE), %d local experts, %lld sequences at KV length %d, CUDA graphs %s\n",
                rs_.layers, rs_.layers - moe_layers, moe_layers, rs_.local, static_cast<long long>(rs_.tokens), rs_.kv_len,
                rs_.graphs ? (graph_us > 0 ? "on" : "FAILED") : "off");
  else
    std::printf("  %d layers (%d dense + %d MoE), %d local experts, %lld tokens = %d prompts x %d\n", rs_.layers,
                rs_.layers - moe_layers, moe_layers, rs_.local, static_cast<long long>(rs_.tokens), rs_.prompts,
                rs_.prompt_len);
  std::int64_t recv_total = 0;
  for (int r : rs_.rows_per_expert) recv_total += r;
  std::printf("  mirror exchange: %lld expert rows per MoE layer (%.2fx balanced), per local expert:", static_cast<long long>(recv_total),
              rs_.imbalance);
  for (int r : rs_.rows_per_expert) std::printf(" %d", r);
  std::printf("\n  attention: %s%s%s\n", attention_path_.c_str(), attention_why_.empty() ? "" : " -- ", attention_why_.c_str());
  std::printf("  KV cache: %s; device memory held %.1f GB; setup %.1f s\n",
              shared_kv_ ? "ONE layer's cache reused by every layer (memory)" : "one cache per layer", mem_.gb(), setup_s);
  std::printf("  dense fp8 GEMMs (--gemm %s):\n", opt_.gemm.c_str());
  for (const auto& g : gemms_.report())
    std::printf("    %6lld x %6d x %6d: %-8s petrel %8.1f us, cuBLASLt %8.1f us (%s)\n", static_cast<long long>(g["m"].get<std::int64_t>()),
                g["n"].get<int>(), g["k"].get<int>(), g["chosen"].get<std::string>().c_str(), g["petrel_us"].get<double>(),
                g["cublaslt_us"].get<double>(), g["why"].get<std::string>().c_str());
  std::printf("\nTime per layer by kernel class (us; median of %d passes with events between kernels):\n", passes);
  std::printf("  %-14s %12s %12s %12s %14s\n", "class", "dense layer", "MoE layer", "head", "per step (ms)");
  for (int c = 0; c < num_classes; ++c) {
    double step_c = 0;
    for (int l = 0; l <= rs_.layers; ++l) step_c += per_layer[l][c];
    std::printf("  %-14s %12.1f %12.1f %12.1f %14.3f\n", class_names[c], kinds.count("dense") ? kinds["dense"].cls[c] : 0.0,
                kinds.count("moe") ? kinds["moe"].cls[c] : 0.0, kinds["head"].cls[c], step_c / 1000);
  }
  auto total_of = [&](const char* k) {
    if (!kinds.count(k)) return 0.0;
    double s = 0;
    for (double v : kinds[k].cls) s += v;
    return s;
  };
  std::printf("  %-14s %12.1f %12.1f %12.1f %14.3f\n", "sum", total_of("dense"), total_of("moe"), total_of("head"), kernel_sum / 1000);
  std::printf("\nStep (measured): %.3f ms %s; eager %.3f ms; sum of kernels %.3f ms\n", step_us / 1000,
              graph_us > 0 ? "under a CUDA graph" : "eager", eager_us / 1000, kernel_sum / 1000);
  if (!graph_why.empty()) std::printf("  CUDA graph: %s\n", graph_why.c_str());
  std::printf("All-to-all (modelled, not run): %.1f us dispatch + %.1f us combine per MoE layer, %.3f ms per step\n  from %s\n",
              a2a.dispatch_us, a2a.combine_us, a2a_step_us / 1000, a2a.source.c_str());
  std::printf("\nThroughput (%s tok/s):           per GPU   per 8-GPU node   vs SGLang %.0f   vs DeepSeek %.0f\n",
              rs_.decode ? "output" : "input", anchor_sg, anchor_ds);
  auto row = [&](const char* what, double tps) {
    std::printf("  %-30s %9.0f %16.0f %15.2fx %17.2fx\n", what, tps, 8 * tps, 8 * tps / anchor_sg, 8 * tps / anchor_ds);
  };
  row("compute only (measured)", tps_compute);
  row("+ all-to-all, no overlap", tps_serial);
  row("+ all-to-all, ideal overlap", tps_overlap);
  std::printf("\nKernels against their anchors (per step; excess = measured - time at the anchor rate):\n");
  std::vector<std::pair<std::string, name_sum>> names(by_name.begin(), by_name.end());
  std::sort(names.begin(), names.end(), [](auto& a, auto& b) { return a.second.us - a.second.anchor_us > b.second.us - b.second.anchor_us; });
  std::printf("  %-40s %10s %10s %10s %8s  %s\n", "kernel", "ms/step", "anchor ms", "excess ms", "of anchor", "anchor");
  for (const auto& [name, n] : names) {
    if (n.anchor.empty()) continue;
    std::printf("  %-40s %10.3f %10.3f %10.3f %8.2f  %s\n", name.c_str(), n.us / 1000, n.anchor_us / 1000,
                (n.us - n.anchor_us) / 1000, n.us > 0 ? n.anchor_us / n.us : 0.0, n.anchor.c_str());
  }
  std::printf("sampled ids (first 4):");
  for (std::size_t i = 0; i < std::min<std::size_t>(4, ids.size()); ++i) std::printf(" %d", ids[i]);
  std::printf("\n");

  // -- JSON (petrel.kernel_times.v1 for `petrel simulate`, plus the run's details) ---------------------------
  if (!opt_.json_path.empty()) {
    using nlohmann::json;
    const std::string phase = rs_.decode ? "decode" : "prefill";
    const std::string src = fmt::format("measured: petrel bench-rank --preset {} on {}, {}", rs_.preset, prop.name, today());
    json layers = json::array();
    for (const char* k : {"dense", "moe", "head"}) {
      if (!kinds.count(k)) continue;
      json l = {{"kind", k}, {"count", kinds[k].count}};
      for (int f = 0; f < num_sfields; ++f)
        if (kinds[k].field[f] > 0) l[sfield_keys[f]] = kinds[k].field[f];
      layers.push_back(l);
    }
    // Knees (model parameters, not measurements): below them a GEMM costs the same. Dense GEMMs: where compute at
    // DeepGEMM's rate meets the weight read (the derived default's values). Decode's grouped GEMM: the masked
    // kernel computes whole 128-row tiles, so it is flat until an expert has 128 rows: 128 x 256 / top-8 = 4,096
    // tokens per rank. Prefill's grouped GEMM: the derived default's knee.
    const auto derived = petrel::sim::derived_kernel_times();
    const auto& dph = rs_.decode ? derived.decode : derived.prefill;
    json ph = {{"source", src},
               {"tokens_per_rank", tokens},
               {"context", rs_.decode ? rs_.kv_len : rs_.prompt_len},
               {"gemm_knee_tokens", dph.gemm_knee_tokens},
               {"expert_gemm_knee_tokens", rs_.decode ? 128.0 * experts_total / top_k : dph.expert_gemm_knee_tokens},
               {"min_kernel_us", 3},
               {"layers", layers}};
    auto base = petrel::sim::to_json(derived);
    json out = base;
    out["source"] = src + " (" + phase + " phase measured; the other phase is the derived default)";
    out["note"] = "written by petrel bench-rank; phases." + phase + " holds the measured per-layer kernel times";
    out["phases"][rs_.decode ? "prefill" : "decode"]["source"] = "derived from published kernel figures (not measured)";
    out["phases"][phase] = ph;
    json per = json::array();
    for (int l = 0; l <= rs_.layers; ++l) {
      json c = json::object();
      for (int k = 0; k < num_classes; ++k) c[class_keys[k]] = per_layer[l][k];
      per.push_back({{"layer", l == rs_.layers ? json("head") : json(l)},
                     {"kind", l == rs_.layers ? "head" : (w_[l].moe ? "moe" : "dense")},
                     {"us", c}});
    }
    json kernels = json::array();
    for (const auto& [name, n] : names)
      kernels.push_back({{"name", name}, {"class", class_keys[static_cast<int>(n.cls)]}, {"us_per_step", n.us},
                         {"anchor_us_per_step", n.anchor_us}, {"anchor", n.anchor}});
    out["bench_rank"] = {{"preset", rs_.preset},
                         {"phase", phase},
                         {"device", prop.name},
                         {"date", today()},
                         {"layers", rs_.layers},
                         {"dense_layers", rs_.layers - moe_layers},
                         {"local_experts", rs_.local},
                         {"tokens", tokens},
                         {"prompts", rs_.decode ? 0 : rs_.prompts},
                         {"context", rs_.decode ? rs_.kv_len : rs_.prompt_len},
                         {"imbalance", rs_.imbalance},
                         {"rows_per_expert", rs_.rows_per_expert},
                         {"graphs", graph_us > 0},
                         {"attention", attention_path_},
                         {"kv_cache_shared", shared_kv_},
                         {"step_us", step_us},
                         {"eager_step_us", eager_us},
                         {"graph_step_us", graph_us},
                         {"kernel_sum_us", kernel_sum},
                         {"a2a", {{"dispatch_us", a2a.dispatch_us}, {"combine_us", a2a.combine_us}, {"per_step_us", a2a_step_us},
                                  {"source", a2a.source}}},
                         {"tokens_per_s_per_gpu", {{"compute", tps_compute}, {"a2a_serial", tps_serial}, {"a2a_overlap", tps_overlap}}},
                         {"anchors_per_node", {{"sglang", anchor_sg}, {"deepseek", anchor_ds}}},
                         {"dense_gemms", gemms_.report()},
                         {"per_layer", per},
                         {"kernels", kernels}};
    petrel::bench::write_json(opt_.json_path, out);
    std::printf("wrote %s\n", opt_.json_path.c_str());
  }
  return petrel::cli::exit_ok;
}

// -- option handling ------------------------------------------------------------------------------------------
// Returns "" and fills rs, or a message for exit 2.
std::string resolve(const rank_options& o, run_shape& rs) {
  if (o.preset == "prefill-ep32") {
    rs.decode = false;
    rs.local = 9;
    rs.tokens = 16384;
    rs.prompts = 4;
    rs.ep = 32;
  } else if (o.preset == "decode-ep72") {
    rs.decode = true;
    rs.local = 4;
    rs.tokens = 256;
    rs.kv_len = 2000;
    rs.ep = 72;
  } else {
    return "--preset must be prefill-ep32 or decode-ep72, not '" + o.preset + "'";
  }
  rs.preset = o.preset;
  if (o.layers < 1 || o.layers > 61) return "--layers must be in [1, 61]";
  rs.layers = o.layers;
  if (o.dense_layers < 0) return "--dense-layers must be >= 0";
  rs.dense_layers = std::min(o.dense_layers, o.layers);
  if (o.local_experts < 0 || o.local_experts > 256) return "--local-experts must be in [1, 256]";
  if (o.local_experts) rs.local = o.local_experts;
  if (rs.decode) {
    if (o.tokens || o.prompts) return "--tokens/--prompts are prefill settings (decode takes --batch and --kv-len)";
    if (o.batch < 0 || o.batch > 4096) return "--batch must be in [1, 4096]";
    if (o.batch) rs.tokens = o.batch;
    if (o.kv_len < 0 || o.kv_len > 163840) return "--kv-len must be in [1, 163840]";
    if (o.kv_len) rs.kv_len = o.kv_len;
  } else {
    if (o.batch || o.kv_len) return "--batch/--kv-len are decode settings (prefill takes --tokens and --prompts)";
    if (o.tokens < 0 || o.tokens > 65536) return "--tokens must be in [1, 65536]";
    if (o.tokens) rs.tokens = o.tokens;
    if (o.prompts < 0) return "--prompts must be >= 1";
    if (o.prompts) rs.prompts = o.prompts;
    if (rs.tokens % rs.prompts != 0) return "--tokens must be a multiple of --prompts";
    rs.prompt_len = static_cast<int>(rs.tokens / rs.prompts);
    if (rs.prompt_len % 8 != 0) return "prompt length (tokens / prompts) must be a multiple of 8";
  }
  if (o.graphs != "auto" && o.graphs != "on" && o.graphs != "off") return "--graphs must be on, off or auto";
  rs.graphs = o.graphs == "on" || (o.graphs == "auto" && rs.decode);
  if (o.gemm != "auto" && o.gemm != "petrel" && o.gemm != "cublaslt") return "--gemm must be auto, petrel or cublaslt";
  if (o.attention != "auto" && o.attention != "mla" && o.attention != "fallback") return "--attention must be auto, mla or fallback";
  if (o.kv_cache != "auto" && o.kv_cache != "shared" && o.kv_cache != "per-layer") return "--kv-cache must be auto, shared or per-layer";
  if (o.iters < 0 || o.iters > 1000) return "--iters must be in [1, 1000]";
  rs.iters = o.iters ? o.iters : (rs.decode ? 20 : 3);

  // rows the mirror exchange delivers: balanced = tokens x top_k x local / 256, spread over the local experts
  const double balanced = static_cast<double>(rs.tokens) * top_k * rs.local / experts_total;
  rs.rows_per_expert.assign(rs.local, 0);
  std::ifstream f(o.imbalance);
  if (f) {
    nlohmann::json j;
    try {
      f >> j;
    } catch (const std::exception& e) {
      return "--imbalance " + o.imbalance + ": not JSON (" + e.what() + ")";
    }
    if (j.is_object() && j.contains("rows_per_expert")) j = j["rows_per_expert"];
    if (!j.is_array() || static_cast<int>(j.size()) != rs.local)
      return "--imbalance " + o.imbalance + ": expected an array of " + std::to_string(rs.local) +
             " row counts (one per local expert), or {\"rows_per_expert\": [...]}";
    for (int e = 0; e < rs.local; ++e) {
      if (!j[e].is_number_integer() || j[e].get<long>() < 0 || j[e].get<long>() > rs.tokens)
        return "--imbalance " + o.imbalance + ": entry " + std::to_string(e) + " must be an integer in [0, tokens]";
      rs.rows_per_expert[e] = j[e].get<int>();
    }
    std::int64_t total = 0;
    for (int r : rs.rows_per_expert) total += r;
    rs.imbalance = total / balanced;
  } else {
    double factor = 0;
    try {
      std::size_t used = 0;
      factor = std::stod(o.imbalance, &used);
      if (used != o.imbalance.size()) factor = -1;
    } catch (...) {
      return "--imbalance '" + o.imbalance + "' is neither a readable file nor a number";
    }
    if (!(factor >= 1.0) || factor * balanced > static_cast<double>(rs.tokens) * top_k)
      return "--imbalance must be a factor >= 1 (received rows / balanced rows, at most 256 / local experts) or a JSON file";
    rs.imbalance = factor;
    const auto total = static_cast<std::int64_t>(std::llround(balanced * factor));
    for (int e = 0; e < rs.local; ++e) rs.rows_per_expert[e] = static_cast<int>(total / rs.local + (e < total % rs.local ? 1 : 0));
  }
  for (int r : rs.rows_per_expert)
    if (r > rs.tokens) return "--imbalance: a local expert cannot receive more rows than there are tokens";
  return "";
}
#endif

const bool registered = petrel::cli::register_command(
    "bench-rank", "one rank of the DeepSeek-V3 deployment on one GPU at full shapes (dummy fp8 weights)",
    [](CLI::App& sub) -> petrel::cli::command_fn {
      auto o = std::make_shared<rank_options>();
      sub.add_option("--preset", o->preset, "prefill-ep32 (9 local experts, 16,384 tokens = 4 x 4,096) or decode-ep72 "
                                            "(4 local experts, 256 sequences at KV 2,000, CUDA graphs)")->required();
      sub.add_option("--layers", o->layers, "layers to run (default 61; the first 3 are dense)");
      sub.add_option("--dense-layers", o->dense_layers, "dense (first_k_dense_replace) layers (default 3)");
      sub.add_option("--local-experts", o->local_experts, "routed experts on this rank (preset: 9 / 4)");
      sub.add_option("--tokens", o->tokens, "prefill: tokens per rank (preset 16384)");
      sub.add_option("--prompts", o->prompts, "prefill: prompts the tokens split into (preset 4)");
      sub.add_option("--batch", o->batch, "decode: sequences (preset 256)");
      sub.add_option("--kv-len", o->kv_len, "decode: KV length per sequence (preset 2000)");
      sub.add_option("--imbalance", o->imbalance, "received rows as a factor of the balanced load (>= 1), or a JSON file "
                                                  "with one row count per local expert (default 1)");
      sub.add_option("--a2a-model", o->a2a_model, "all-to-all model overrides, key=value[,...]: dispatch_GBps, combine_GBps, "
                                                  "latency_us (prefill, normal mode), dispatch_us, combine_us (decode, "
                                                  "low-latency at 128 tokens/rank), ep");
      sub.add_option("--graphs", o->graphs, "on|off: time the step under a CUDA graph (default: on for decode)");
      sub.add_option("--gemm", o->gemm, "dense fp8 GEMMs: auto (faster of the two per shape), petrel, cublaslt");
      sub.add_option("--attention", o->attention, "auto (MLA kernels, else fallback), mla, fallback (unfused cuBLAS)");
      sub.add_option("--kv-cache", o->kv_cache, "auto, per-layer, shared (one layer's cache reused by all layers)");
      sub.add_option("--json", o->json_path, "write per-layer kernel times (petrel.kernel_times.v1, for petrel simulate)");
      sub.add_option("--iters", o->iters, "timed steps (default 3 prefill, 20 decode)");
      return [o]() -> int {
#ifndef PETREL_HAVE_CUDA
        return petrel::bench::without_cuda("petrel bench-rank");
#else
        run_shape rs;
        std::string err;
        try {
          err = resolve(*o, rs);
          if (err.empty() && !o->a2a_model.empty()) model_a2a(rs, o->a2a_model);  // validate before any GPU work
        } catch (const std::invalid_argument& e) {
          err = e.what();
        }
        if (!err.empty()) {
          std::fprintf(stderr, "petrel bench-rank: %s\n", err.c_str());
          return petrel::cli::exit_bad_input;
        }
        return petrel::bench::run_on_gpu("petrel bench-rank", [&] {
          rank_bench b(rs, *o);
          return b.run();
        });
#endif
      };
    });

} // namespace
