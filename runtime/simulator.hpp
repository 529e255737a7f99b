// A discrete-event model of the SGLang PD + large-EP deployment of DeepSeek-V3, for "what if" questions
// (EP size, TBO, EPLB, prompt length, batch) before the real cluster is at hand. See docs/simulator.md.
//
// One step of one EP rank is a graph of operations on two resources (the GPU's compute stream and its
// communication path); a list-scheduling event loop runs it. The busiest rank sets the step: expert GEMMs and
// the bandwidth part of dispatch/combine scale with 1 / balancedness of each MoE layer.
// Kernel times come from a JSON file (the built-in default is DERIVED from published kernel figures, not
// measured); dispatch/combine from DeepEP's published figures or a measured JSON file.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/eplb.hpp"

namespace petrel::sim {

// -- kernel times ----------------------------------------------------------------------------

/// Times (µs) of one layer kind at the phase's reference tokens/rank and context. Zero = not present.
struct layer_kernel_times {
  std::string kind;    // "dense" (MLA + dense MLP), "moe" (MLA + shared + routed experts), "head" (final norm + LM head)
  int count = 1;       // how many such layers
  double attention_core_us = 0;      // softmax(QK)V: prefill ~ tokens x prompt, decode ~ seqs x KV length
  double attention_gemm_us = 0;      // q_a, q_b, kv_a, (kv_b | absorbed W_UK/W_UV), o_proj
  double mlp_gemm_us = 0;            // dense FFN (first_k_dense_replace layers)
  double shared_expert_gemm_us = 0;  // shared expert FFN
  double expert_gemm_us = 0;         // routed experts of one rank when perfectly balanced (grouped GEMM)
  double head_gemm_us = 0;           // LM head (rows: one per sequence in prefill, one per token in decode)
  double routing_us = 0;             // gate GEMM + sigmoid + group top-k
  double norm_us = 0;                // RMSNorms, residual adds, RoPE
  double quant_us = 0;               // fp8 per-token quantisation, SiLU*mul, permute
  double other_us = 0;               // KV-cache store, K/V assembly, sampling (elementwise scaling)
};

struct phase_kernel_times {
  std::string source;                 // optional: where this phase's times come from (bench-rank sets it)
  double tokens_per_rank = 0;         // reference tokens per rank (decode: sequences per rank)
  double context = 0;                 // reference prompt length (prefill) or KV length (decode)
  double gemm_knee_tokens = 0;        // dense GEMMs cost the same below this many tokens (weight-read / tile bound)
  double expert_gemm_knee_tokens = 0; // same for the routed-expert grouped GEMM (tokens per rank)
  double min_kernel_us = 0;           // floor for each memory-bound elementwise group (launch latency)
  std::vector<layer_kernel_times> layers;
};

struct kernel_times {
  std::string source; // "derived from published kernel figures (not measured)" or "measured: ..."
  std::string note;
  phase_kernel_times prefill, decode;
};

/// The built-in default, derived from ANCHORS.md kernel figures (DeepGEMM TFLOPS per shape, FlashMLA
/// bandwidth/TFLOPS, measured HBM copy bandwidth) for DeepSeek-V3 shapes. NOT measured.
kernel_times derived_kernel_times();

/// JSON schema "petrel.kernel_times.v1" (documented in docs/simulator.md).
nlohmann::json to_json(const kernel_times& k);
/// Throws std::invalid_argument naming the bad field.
kernel_times kernel_times_from_json(const nlohmann::json& j);

/// True when a phase's times were measured (its own "source", else the file's, starts with "measured").
bool phase_is_measured(const kernel_times& k, bool decode);
/// Overlays the measured phases of `top` onto `base` (several bench-rank files, one per phase, make one set).
kernel_times merge_measured(const kernel_times& base, const kernel_times& top);

// -- communication -------------------------------------------------------------------------------

struct normal_mode_point { int ep; double dispatch_GBps, combine_GBps; };
struct low_latency_point { int ep; double dispatch_us, combine_us; };

/// Dispatch/combine costs. Normal mode (prefill): bottleneck-link bandwidth per EP size, bytes counted as
/// DeepEP does (one copy per token per remote node over RDMA; per remote GPU over NVLink within one node).
/// Low-latency mode (decode): µs per EP size at ll_ref_tokens tokens/rank; ll_fixed_fraction of it does not
/// scale with tokens (latency), the rest scales linearly.
struct comm_figures {
  std::string source;
  std::vector<normal_mode_point> normal;
  std::vector<low_latency_point> low_latency;
  double ll_ref_tokens = 128;
  double ll_fixed_fraction = 0.3;
};

/// DeepEP's published H800 figures (ANCHORS.md).
comm_figures deepep_published_figures();
/// Schema "petrel.comm_figures.v1" (docs/simulator.md). Throws std::invalid_argument naming the bad field.
comm_figures comm_figures_from_json(const nlohmann::json& j);
nlohmann::json to_json(const comm_figures& c);

/// Normal-mode bandwidth (GB/s) at an EP size: the nearest published point (EP <= 8 uses the NVLink point).
normal_mode_point normal_mode_at(const comm_figures& c, int ep);
/// Low-latency µs at an EP size and tokens/rank: log-linear interpolation in EP, clamped at the table's ends.
low_latency_point low_latency_at(const comm_figures& c, int ep, double tokens_per_rank);

// -- the deployment ------------------------------------------------------------------------------

struct link_spec {
  double GBps = 0;      // one direction, per GPU
  double latency_us = 0;
};

struct deployment {
  int gpus_per_node = 8;
  double gpu_hour_usd = 2.0;
  int num_sms = 132;
  int deepep_normal_sms = 24;  // SMs DeepEP's normal kernels hold while TBO overlaps them with GEMMs
  double tbo_overhead_us = 5;  // per micro-batch per layer: extra launches / yield-point synchronisation
  // prefill side
  int prefill_nodes = 4, prefill_ep = 32, prefill_slots = 288;
  double prefill_tokens_per_device = 16384;
  double prefill_no_tbo_max_tokens = 8192; // without TBO the activations of 16,384 tokens do not fit (SGLang)
  // decode side
  int decode_nodes = 9, decode_ep = 72, decode_slots = 288;
  double decode_seqs_per_device = 256, decode_kv_len = 2000;
  double decode_output_len = 100;          // output tokens per request: sets how much KV arrives per step
  // model
  int num_experts = 256, top_k = 8, num_groups = 8, topk_group = 4, hidden = 7168, num_layers = 61;
  double kv_bytes_per_token = 61.0 * 576 * 2; // latent cache, bf16, all layers
  // links
  link_spec nvlink{160, 2};  // H800-class effective NVLink per GPU (DeepEP measures 153-158 GB/s)
  link_spec rdma{50, 5};     // 400 Gb/s InfiniBand per GPU
};

/// Checks the deployment; "" when usable, else a message naming the field.
std::string check_deployment(const deployment& d);

/// Dispatch and combine time of one MoE layer on the busiest rank (balance = mean/max load, 1 = perfect), as the
/// step simulation charges them: prefill = normal mode at d.prefill_ep, decode = low-latency mode at d.decode_ep.
struct a2a_layer_cost { double dispatch_us = 0, combine_us = 0; };
a2a_layer_cost prefill_a2a_per_layer(const deployment& d, const comm_figures& c, double tokens_per_rank, double balance);
a2a_layer_cost decode_a2a_per_layer(const deployment& d, const comm_figures& c, double seqs_per_rank, double balance);

// -- one step ---------------------------------------------------------------------------------

struct step_result {
  double step_us = 0;          // makespan of the step on the busiest rank
  double compute_busy_us = 0;  // time the compute stream was busy
  double comm_busy_us = 0;     // time the communication path was busy
  double exposed_comm_us = 0;  // step_us - compute_busy_us (communication not hidden behind compute)
  double tokens_per_rank = 0;
  int micro_batches = 1;
};

/// Per-MoE-layer balancedness (mean/max GPU load); empty = perfectly balanced. If it has fewer entries than MoE
/// layers it is cycled.
using balance_profile = std::vector<double>;

step_result simulate_prefill_step(const deployment& d, const kernel_times& k, const comm_figures& c,
                                  double tokens_per_rank, double prompt_len, bool tbo, const balance_profile& balance);
step_result simulate_decode_step(const deployment& d, const kernel_times& k, const comm_figures& c,
                                 double seqs_per_rank, double kv_len, bool tbo, const balance_profile& balance);

/// Balancedness the busiest GPU sees in one step: EPLB (or the identity placement without redundancy when
/// eplb = false) is computed on `window` (the long-run load), then evaluated on a step-sized multinomial sample
/// of step_tokens tokens x top_k drawn from the window's proportions (sampling noise included). Seeded.
balance_profile step_balance(const eplb::expert_load_matrix& window, int ep, int slots, int groups, int nodes,
                             int top_k, double step_tokens, bool eplb, uint64_t seed);

// -- the discrete-event core ---------------------------------------------------------------------

struct sim_op {
  int resource = 0;        // 0 = compute stream, 1 = communication
  double duration_us = 0;
  std::vector<int> deps;   // indices of earlier ops
};

struct schedule_result {
  double makespan_us = 0;
  std::vector<double> busy_us;  // per resource
  std::vector<double> start_us, finish_us;
};

/// Runs ops on num_resources resources: each resource runs one op at a time; when free it starts the ready
/// op (all deps finished) with the lowest index. Throws std::invalid_argument on a forward/self dependency.
schedule_result run_event_schedule(const std::vector<sim_op>& ops, int num_resources);

// -- the anchor suite -------------------------------------------------------------------------

struct suite_inputs {
  deployment dep;
  kernel_times kernels = derived_kernel_times();
  comm_figures comm = deepep_published_figures();
  std::optional<eplb::expert_load_matrix> expert_load; // real load dump; else Zipf
  double zipf_s = 1.0;
  double window_tokens = 65536;  // tokens in the synthetic long-run window EPLB balances for
  uint64_t seed = 1;
};

struct suite_row {
  std::string metric;
  std::string unit;
  double simulated = 0;
  std::optional<double> anchor;
  std::string anchor_source;
  std::optional<double> ratio() const {
    return anchor && *anchor != 0 ? std::optional<double>(simulated / *anchor) : std::nullopt;
  }
};

struct suite_result {
  std::vector<suite_row> rows;
  nlohmann::json detail;  // per-scenario step breakdowns, balancedness, inputs
};

/// Prefill tok/s/node at 1K/2K/4K (EP32, 16,384 tok/device), 4K with ideal balance, decode tok/s/node (EP72,
/// 256 seq/device, KV 2000), TBO and EPLB ablations, cost per 1M output tokens; each with its anchor.
suite_result run_anchor_suite(const suite_inputs& in);

// -- validation against bench-rank ------------------------------------------------------------

struct validation_row {
  std::string metric;  // "step" or a kernel field ("expert_gemm_us", ...), per step
  double measured_us = 0, simulated_us = 0;
  double error() const { return measured_us != 0 ? (simulated_us - measured_us) / measured_us : 0.0; }
};

struct validation_result {
  std::string phase;          // "prefill" or "decode"
  std::string run;            // what was measured (preset, device, date)
  std::string kernels_from;   // the kernel-time source the simulation used
  double tokens = 0, context = 0, imbalance = 1;
  int dense_layers = 0, moe_layers = 0;
  std::vector<validation_row> rows;  // first row: the whole step
};

/// Simulates the single-GPU run a `petrel bench-rank --json` file describes (its "bench_rank" block: phase,
/// layers, tokens, context, imbalance; no all-to-all, because the mirror exchange moves nothing; no TBO) with
/// kernel times `k` scaled to the run's load, and compares with what the run measured: its step time
/// (CUDA graph or eager) and, where the run's file holds measured per-layer times for its phase, each kernel
/// field per step. Throws std::invalid_argument naming a missing or bad field.
validation_result validate_bench_rank(const nlohmann::json& run, const kernel_times& k);

/// $ per 1M output tokens: gpus_per_node * gpu_hour_usd / (tok/s/node * 3600) * 1e6.
double cost_per_million_tokens(double tokens_per_s_per_node, int gpus_per_node, double gpu_hour_usd);

} // namespace petrel::sim
