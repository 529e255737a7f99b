// The GPU data plane of expert parallelism (runtime/ep_device_plane.hpp): an in-process EP group of cuda ranks
// sharing one GPU, with dispatch and combine rows moving between the ranks' device memory through the ep_a2a
// kernels, against the same group moving fp32 rows through the host transport. The plane sends fp8 rows and
// returns bf16 ones, so logits agree within a tolerance, which the cases tie to a control: the same group with
// every token's experts shifted by one (what a routing bug would look like) must be far further away.
// Covered: fp32 experts (the default) and fp8 experts (fp8 grouped GEMMs on the received fp8 rows), normal and
// low-latency mode, two-batch overlap, a live rebalance (new expert pointers), the fallback
// to the transport for micro-batches too big for the buffers (bit-identical to the host plane), a peer that
// stops mid-step (the bounded wait fails the step with a message), and configurations the plane refuses.
// The NCCL exchange (the same plane with NCCL send/recv carrying the rows) runs at EP1 on one GPU (the rank sends to
// itself through NCCL) and at EP2/EP4 with a GPU per rank where the machine has them; NCCL refuses two ranks on one
// GPU, and the plane says so.
// Without a GPU every case passes with a message.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <thread>
#include <filesystem>
#include <string>

#include "runtime/ep_group.hpp"
#include "runtime/generation.hpp"

#ifdef PETREL_HAVE_CUDA
#include "kernels/cuda/ep_nccl.hpp"
#include "kernels/cuda/nccl_api.hpp"
#include "tests/support/cuda_test_util.hpp"
#endif

using namespace petrel;
using namespace petrel::ep;
namespace fs = std::filesystem;

namespace {

const fs::path model_dir = fs::path(PETREL_SOURCE_DIR) / "tests/data/fortune-moe";

/// The reason loading a group with `go` is refused (std::invalid_argument), or "accepted".
std::string refusal(const ep_group_options& go) {
  try {
    ep_group::load(model_dir, go);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "accepted";
}

#ifdef PETREL_HAVE_CUDA

// Before any CUDA call of this process (static initialisation runs before doctest's main).
const bool process_prepared = (prepare_process_for_device_plane(), true);

bool skip_without_gpu() {
  if (petrel::test::gpu_available()) return false;
  MESSAGE("no CUDA device: the GPU data plane cases are skipped");
  return true;
}

std::vector<int32_t> bytes_of(const std::string& s) {
  std::vector<int32_t> v{256}; // BOS
  for (unsigned char c : s) v.push_back(int32_t(c));
  return v;
}

/// Prompts of different lengths: with EP 2 rank 0 gets prompts 0 and 2, rank 1 prompt 1 and 3.
std::vector<std::vector<int32_t>> prompts() {
  return {bytes_of("The quick brown fox jumps over the lazy dog. "), bytes_of("Fortune favours"),
          bytes_of("A penny saved is a penny earned, and a stitch in time saves nine."), bytes_of("Q")};
}

ep_group_options group_options(int size, int redundant, ep_mode mode, bool tbo, bool device) {
  ep_group_options go;
  go.size = size;
  go.redundant = redundant;
  go.backend = "cuda";
  go.rank.mode = mode;
  go.rank.two_batch_overlap = tbo;
  go.rank.device_exchange = device;
  go.rank.device_timeout_s = 3;
  return go;
}

/// || a - b ||_2 / || b ||_2 over all prompts' prompt logits.
double rel_l2(const std::vector<generate_result>& a, const std::vector<generate_result>& b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    REQUIRE(a[i].prompt_logits.size() == b[i].prompt_logits.size());
    for (size_t j = 0; j < a[i].prompt_logits.size(); ++j) {
      const double d = double(a[i].prompt_logits[j]) - double(b[i].prompt_logits[j]);
      num += d * d;
      den += double(b[i].prompt_logits[j]) * double(b[i].prompt_logits[j]);
    }
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

/// Share of generated tokens equal position by position (up to the shorter output).
double same_tokens(const std::vector<generate_result>& a, const std::vector<generate_result>& b) {
  size_t same = 0, all = 0;
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t j = 0; j < std::min(a[i].output_ids.size(), b[i].output_ids.size()); ++j, ++all)
      same += a[i].output_ids[j] == b[i].output_ids[j] ? 1 : 0;
  return all ? double(same) / double(all) : 1.0;
}

generate_options gen_options() {
  generate_options o;
  o.max_new_tokens = 8;
  o.prompt_logits = true;
  return o;
}

struct run_result {
  std::vector<generate_result> results;
  int64_t device_steps = 0, tokens_sent = 0;
};

/// What `f` throws (its message), or `none` when it returns.
std::string error_of(const std::function<void()>& f, const std::string& none) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return none;
}

/// The same group with the NCCL exchange, a GPU per rank.
ep_group_options nccl_options(ep_group_options go) {
  go.rank.device_kind = device_exchange_kind::nccl;
  go.backend = "cuda:each";
  return go;
}

int gpus() { return petrel::cuda_device_count(); }

run_result run(const ep_group_options& go, const step_hook& hook = {}) {
  auto group = ep_group::load(model_dir, go);
  run_result r;
  r.results = generate_ep(*group, prompts(), gen_options(), 16, hook);
  for (int i = 0; i < group->size(); ++i) {
    r.device_steps += group->rank(i).stats().device_steps;
    r.tokens_sent += group->rank(i).stats().device_tokens_sent;
  }
  return r;
}

/// The control: the host plane with every routed expert id shifted by one.
std::vector<generate_result> misrouted(ep_group_options go) {
  const int experts = 8;
  go.rank.device_exchange = false;
  go.rank.routing_override = [experts](int, int, std::span<int32_t> ids) {
    for (auto& e : ids) e = (e + 1) % experts;
  };
  auto group = ep_group::load(model_dir, go);
  return generate_ep(*group, prompts(), gen_options());
}

void expect_close(const std::string& what, ep_group_options host_opts, ep_group_options gpu_opts) {
  CAPTURE(what);
  const run_result host = run(host_opts);
  const run_result gpu = run(gpu_opts);
  CHECK(host.device_steps == 0);
  CHECK(gpu.device_steps > 0);
  CHECK(gpu.tokens_sent > 0);
  const double err = rel_l2(gpu.results, host.results);
  const double control = rel_l2(misrouted(host_opts), host.results);
  MESSAGE(what << ": prompt logits rel. L2 error " << err << " (misrouted control " << control << "), generated tokens "
               << "equal " << same_tokens(gpu.results, host.results));
  CHECK(err < 0.02);
  CHECK(err * 10 < control);
  CHECK(same_tokens(gpu.results, host.results) >= 0.75);
  for (size_t i = 0; i < gpu.results.size(); ++i) CHECK(gpu.results[i].output_ids[0] == host.results[i].output_ids[0]);
}

#endif
} // namespace

#ifdef PETREL_HAVE_CUDA

TEST_CASE("the GPU data plane serves EP groups within fp8 tolerance of the host plane") {
  if (skip_without_gpu()) return;
  SUBCASE("EP2 normal mode") {
    expect_close("EP2 normal", group_options(2, 0, ep_mode::normal, false, false),
                 group_options(2, 0, ep_mode::normal, false, true));
  }
  SUBCASE("EP2 low-latency mode with redundant experts") {
    expect_close("EP2 low-latency", group_options(2, 2, ep_mode::low_latency, false, false),
                 group_options(2, 2, ep_mode::low_latency, false, true));
  }
  SUBCASE("EP4 normal mode with two-batch overlap (two buffers per rank)") {
    expect_close("EP4 TBO", group_options(4, 0, ep_mode::normal, false, false),
                 group_options(4, 0, ep_mode::normal, true, true));
  }
  SUBCASE("EP2 low-latency with two-batch overlap") {
    expect_close("EP2 low-latency TBO", group_options(2, 0, ep_mode::low_latency, false, false),
                 group_options(2, 0, ep_mode::low_latency, true, true));
  }
  SUBCASE("fp8 experts (fp8 grouped GEMMs on the received rows), normal and low-latency, with TBO") {
    for (ep_mode mode : {ep_mode::normal, ep_mode::low_latency}) {
      ep_group_options gpu = group_options(2, 0, mode, true, true);
      gpu.rank.device_fp8_experts = true;
      expect_close(std::string("EP2 fp8 experts TBO ") + mode_name(mode), group_options(2, 0, mode, false, false), gpu);
    }
  }
}

TEST_CASE("a live rebalance switches the GPU plane to the new experts") {
  if (skip_without_gpu()) return;
  auto hook = [](int64_t step, ep_group& g) {
    if (step == 2) g.rank(1).request_rebalance();
  };
  ep_group_options host = group_options(2, 2, ep_mode::normal, false, false);
  ep_group_options gpu = group_options(2, 2, ep_mode::normal, false, true);
  auto hg = ep_group::load(model_dir, host);
  const auto href = generate_ep(*hg, prompts(), gen_options(), 16, hook);
  auto gg = ep_group::load(model_dir, gpu);
  const ep_placement initial = gg->rank(0).placement();
  const auto got = generate_ep(*gg, prompts(), gen_options(), 16, hook);
  // (The placement may differ from the host plane's: the loads come from routing of fp8-perturbed activations.)
  CHECK(gg->rank(0).stats().rebalances == 1);
  CHECK(gg->rank(1).stats().rebalances == 1);
  CHECK_FALSE(gg->rank(0).placement() == initial);
  CHECK(gg->rank(0).stats().device_steps >= 6); // steps after the switch ran on the plane too
  // The steps after the switch run the new placement's experts: the generated text stays the host plane's.
  MESSAGE("tokens equal after a rebalance: " << same_tokens(got, href));
  CHECK(same_tokens(got, href) >= 0.75);
}

TEST_CASE("micro-batches larger than the GPU buffers go through the transport, bit-identical to the host plane") {
  if (skip_without_gpu()) return;
  ep_group_options host = group_options(2, 0, ep_mode::normal, false, false);
  ep_group_options gpu = group_options(2, 0, ep_mode::normal, false, true);
  gpu.rank.device_max_tokens = 4; // every prefill step is larger; the decode steps (1-2 tokens per rank) fit
  const run_result h = run(host), g = run(gpu);
  CHECK(g.device_steps > 0); // the decode steps
  for (size_t i = 0; i < h.results.size(); ++i) {
    CAPTURE(i);
    CHECK(g.results[i].prompt_logits == h.results[i].prompt_logits); // the prefill went through the transport
  }
}

/// Two steps of a 2-rank group (a 7-token prefill each, then one decode token each) with rank 1's routing hook
/// `fault` called at every MoE layer; returns each rank's error ("" if none) and the seconds both steps took.
struct fault_run {
  std::string errors[2];
  double secs = 0;
};
fault_run run_with_fault(double timeout_s, std::function<void(int layer, int call)> fault, bool nccl = false) {
  ep_group_options go = group_options(2, 0, ep_mode::normal, false, true);
  if (nccl) go = nccl_options(go);
  go.rank.device_timeout_s = timeout_s;
  auto calls = std::make_shared<std::atomic<int>>(0);
  go.rank.routing_override = [calls, fault](int rank, int layer, std::span<int32_t>) {
    if (rank == 1 && layer == 1) fault(layer, ++*calls);
  };
  auto group = ep_group::load(model_dir, go);
  kv_pool k0(group->rank_backend(0), group->config(), 32, 16), k1(group->rank_backend(1), group->config(), 32, 16);
  kv_pool* kv[2] = {&k0, &k1};
  kv_page_table t0, t1;
  k0.reserve(t0, 8);
  k1.reserve(t1, 8);
  const std::vector<int32_t> p = bytes_of("abcdefg");
  const std::vector<int32_t> one{65};
  std::vector<sequence_step> b0{{p, 0, t0.pages, false}}, b1{{p, 0, t1.pages, false}};
  std::vector<sequence_step> d0{{one, 7, t0.pages, false}}, d1{{one, 7, t1.pages, false}};
  step_result out[2];
  fault_run fr;
  const auto t_start = std::chrono::steady_clock::now();
  for (int s = 0; s < 2; ++s)
    group->run_on_ranks([&](int r) {
      try {
        if (s == 0)
          group->rank(r).step(r == 0 ? b0 : b1, *kv[r], out[r]);
        else
          group->rank(r).step(r == 0 ? d0 : d1, *kv[r], out[r]); // one decode token each
      } catch (const std::exception& e) {
        fr.errors[r] = e.what();
      }
    });
  fr.secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  MESSAGE("rank 0: " << fr.errors[0] << " | rank 1: " << fr.errors[1] << " | " << fr.secs << " s");
  return fr;
}

TEST_CASE("a peer whose step fails releases the ranks waiting for it on the GPU at once") {
  if (skip_without_gpu()) return;
  // Rank 1 dies at its second MoE layer of the second step, after its first layer went through the plane; rank 0
  // is then spinning on the GPU for rows that never come. The group's abort reaches its plane.
  const fault_run fr = run_with_fault(20, [](int, int call) {
    if (call == 2) throw std::runtime_error("rank 1 crashed (test)");
  });
  CHECK(fr.errors[1].find("rank 1 crashed") != std::string::npos);
  CHECK(fr.errors[0].find("aborted") != std::string::npos);
  CHECK(fr.errors[0].find("rank 1 crashed") != std::string::npos);
  CHECK(fr.secs < 10); // far below the 20 s bounded wait
}

TEST_CASE("a peer that stalls without failing is caught by the plane's bounded wait") {
  if (skip_without_gpu()) return;
  // Rank 1 stops for 2.5 s in its second step (a hung peer that says nothing): rank 0's receive times out after 1 s.
  const fault_run fr = run_with_fault(1, [](int, int call) {
    if (call == 2) std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  });
  CHECK(fr.errors[0].find("timed out after 1") != std::string::npos);
  CHECK(fr.errors[0].find("waiting for rank 1") != std::string::npos);
  CHECK_FALSE(fr.errors[1].empty()); // the group failed for rank 1 too (rank 0's step aborted it)
}

TEST_CASE("the NCCL exchange serves EP groups within fp8 tolerance of the host plane") {
  if (skip_without_gpu()) return;
  SUBCASE("EP1: every row goes to the rank itself through NCCL, normal and low-latency mode, with TBO") {
    for (ep_mode mode : {ep_mode::normal, ep_mode::low_latency})
      expect_close(std::string("NCCL EP1 TBO ") + mode_name(mode), group_options(1, 0, mode, false, false),
                   nccl_options(group_options(1, 0, mode, true, true)));
  }
  SUBCASE("EP2 and EP4 with a GPU per rank") {
    if (gpus() < 2) {
      MESSAGE("one GPU: NCCL refuses two ranks on it, so EP2 over NCCL needs a machine with two or more");
      return;
    }
    expect_close("NCCL EP2 normal", group_options(2, 0, ep_mode::normal, false, false),
                 nccl_options(group_options(2, 0, ep_mode::normal, false, true)));
    expect_close("NCCL EP2 low-latency TBO, redundant experts", group_options(2, 2, ep_mode::low_latency, false, false),
                 nccl_options(group_options(2, 2, ep_mode::low_latency, true, true)));
    if (gpus() >= 4)
      expect_close("NCCL EP4 TBO", group_options(4, 0, ep_mode::normal, false, false),
                   nccl_options(group_options(4, 0, ep_mode::normal, true, true)));
  }
}

TEST_CASE("NCCL exchange: a dead or stalled peer fails the step instead of hanging it") {
  if (skip_without_gpu()) return;
  if (gpus() < 2) {
    MESSAGE("one GPU: the NCCL fault cases need a GPU per rank");
    return;
  }
  SUBCASE("a peer whose step fails: the group's abort ends NCCL's kernels") {
    const fault_run fr = run_with_fault(20, [](int, int call) {
      if (call == 2) throw std::runtime_error("rank 1 crashed (test)");
    }, /*nccl=*/true);
    CHECK(fr.errors[1].find("rank 1 crashed") != std::string::npos);
    CHECK(fr.errors[0].find("rank 1 crashed") != std::string::npos);
    CHECK(fr.secs < 10);
  }
  SUBCASE("a peer that stalls: the watchdog aborts the communicator after the timeout") {
    const fault_run fr = run_with_fault(1, [](int, int call) {
      if (call == 2) std::this_thread::sleep_for(std::chrono::milliseconds(2500));
    }, /*nccl=*/true);
    CHECK(fr.errors[0].find("did not finish within") != std::string::npos);
    CHECK_FALSE(fr.errors[1].empty());
  }
}

TEST_CASE("NCCL exchange: a communicator whose peer never joins fails after the timeout instead of hanging") {
  if (skip_without_gpu()) return;
  if (!petrel::cuda::nccl_api::get().ok()) {
    MESSAGE("no libnccl: " << petrel::cuda::nccl_api::get().load_error());
    return;
  }
  if (!petrel::cuda::nccl_api::get().comm_init_rank_config) {
    MESSAGE("this libnccl has no non-blocking creation; a rank that never joins holds its peers in NCCL");
    return;
  }
  // Rank 0 of a 2-rank group whose rank 1 never calls in (it died after the handle exchange).
  petrel::cuda::nccl_rows_config c;
  c.rank = 0;
  c.ranks = 2;
  c.hidden = 256;
  c.experts = 8;
  c.topk = 2;
  c.timeout_s = 2;
  c.device = 0;
  petrel::cuda::nccl_rows rows(c);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string why = error_of([&] { rows.connect(petrel::cuda::nccl_rows::make_unique_id()); }, "joined");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  MESSAGE("after " << secs << " s: " << why);
  CHECK(why.find("not every rank of the group joined") != std::string::npos);
  CHECK(secs < 6);
  CHECK_FALSE(rows.connected());
}

TEST_CASE("the GPU data plane refuses what it cannot carry, with the reason") {
  if (skip_without_gpu()) return;
  // 8 experts over 3 ranks: the slots do not divide.
  ep_group_options go = group_options(3, 0, ep_mode::normal, false, true);
  CHECK(refusal(go).find("divisible") != std::string::npos);
  go = group_options(2, 0, ep_mode::normal, false, true);
  go.backend = "cpu";
  CHECK(refusal(go).find("cuda backend") != std::string::npos);
  // fp8 experts are a cuda_ipc feature.
  go = nccl_options(group_options(1, 0, ep_mode::normal, false, true));
  go.rank.device_fp8_experts = true;
  CHECK(refusal(go).find("not offered with the NCCL exchange") != std::string::npos);
  // Two ranks on one GPU: NCCL refuses them when the communicator is created (the group's first step).
  go = group_options(2, 0, ep_mode::normal, false, true);
  go.rank.device_kind = device_exchange_kind::nccl;
  go.backend = "cuda:0";
  const std::string why = error_of([&] { run(go); }, "accepted");
  MESSAGE("two NCCL ranks on one GPU: " << why);
  CHECK(why.find("a GPU of its own") != std::string::npos);
}

#else
TEST_CASE("GPU data plane: this build has no CUDA") {
  // The cpu build has no plane: asking for one is refused with the reason.
  ep_group_options go;
  go.size = 2;
  go.rank.device_exchange = true;
  CHECK(refusal(go).find("cuda") != std::string::npos);
}
#endif
