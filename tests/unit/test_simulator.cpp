// The deployment simulator: event core, monotonicity, TBO behaviour, cost arithmetic, file formats, CLI.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "runtime/expert_load.hpp"
#include "runtime/simulator.hpp"

using namespace petrel::sim;

namespace {

struct fixture {
  deployment d;
  kernel_times k = derived_kernel_times();
  comm_figures c = deepep_published_figures();
};

int run_cli(const std::string& args, std::string* out = nullptr) {
  const std::string cmd = std::string(PETREL_BINARY) + " simulate " + args + " 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  const int status = pclose(p);
  if (out) *out = text;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

} // namespace

TEST_CASE("simulator: event core schedules by dependencies and resources") {
  // a(compute 10) -> b(comm 5) -> c(compute 10); d(compute 3) independent; e(comm 4) independent.
  std::vector<sim_op> ops = {{0, 10, {}}, {1, 5, {0}}, {0, 10, {1}}, {0, 3, {}}, {1, 4, {}}};
  const auto r = run_event_schedule(ops, 2);
  // compute: a [0,10), d [10,13) (b not done until 15), c [15,25); comm: e [0,4), b [10,15).
  CHECK(r.start_us[0] == 0);
  CHECK(r.start_us[4] == 0);
  CHECK(r.start_us[3] == 10);
  CHECK(r.start_us[1] == 10);
  CHECK(r.start_us[2] == 15);
  CHECK(r.makespan_us == 25);
  CHECK(r.busy_us[0] == 23);
  CHECK(r.busy_us[1] == 9);
  CHECK_THROWS_AS(run_event_schedule({{0, 1, {0}}}, 1), std::invalid_argument);
  CHECK_THROWS_AS(run_event_schedule({{2, 1, {}}}, 2), std::invalid_argument);
}

TEST_CASE("simulator: better expert balance is never slower, and strictly faster at the anchor batches") {
  fixture f;
  double last_p = 0, last_d = 0;
  for (double b : {0.3, 0.5, 0.8, 1.0}) {
    const balance_profile prof(58, b);
    const auto p = simulate_prefill_step(f.d, f.k, f.c, 16384, 4096, true, prof);
    const auto d = simulate_decode_step(f.d, f.k, f.c, 256, 2000, true, prof);
    if (last_p > 0) {
      CHECK(p.step_us < last_p);
      CHECK(d.step_us < last_d);
    }
    last_p = p.step_us;
    last_d = d.step_us;
  }
  // Balancedness 1.0 is the same as an empty (ideal) profile.
  CHECK(simulate_decode_step(f.d, f.k, f.c, 256, 2000, true, {}).step_us == doctest::Approx(last_d));
}

TEST_CASE("simulator: TBO helps at large batches and hurts a tiny decode batch under the overhead model") {
  fixture f;
  const auto pon = simulate_prefill_step(f.d, f.k, f.c, 8192, 4096, true, {});
  const auto poff = simulate_prefill_step(f.d, f.k, f.c, 8192, 4096, false, {});
  CHECK(pon.step_us < poff.step_us);
  CHECK(pon.micro_batches == 2);
  CHECK(poff.exposed_comm_us > pon.exposed_comm_us);
  const auto don = simulate_decode_step(f.d, f.k, f.c, 256, 2000, true, {});
  const auto doff = simulate_decode_step(f.d, f.k, f.c, 256, 2000, false, {});
  CHECK(don.step_us < doff.step_us);
  // 32 tokens/device: each micro-batch of 16 pays the same weight-read-bound GEMMs and the fixed LL latency.
  const auto son = simulate_decode_step(f.d, f.k, f.c, 32, 2000, true, {});
  const auto soff = simulate_decode_step(f.d, f.k, f.c, 32, 2000, false, {});
  CHECK(son.step_us > soff.step_us);
  // The per-micro-batch overhead is part of that loss: without it TBO at 32 tok/device costs less.
  deployment free = f.d;
  free.tbo_overhead_us = 0;
  CHECK(simulate_decode_step(free, f.k, f.c, 32, 2000, true, {}).step_us < son.step_us);
}

TEST_CASE("simulator: longer prompts and longer KV cost more; throughput scales sanely") {
  fixture f;
  const auto p1 = simulate_prefill_step(f.d, f.k, f.c, 16384, 1024, true, {});
  const auto p4 = simulate_prefill_step(f.d, f.k, f.c, 16384, 4096, true, {});
  CHECK(p1.step_us < p4.step_us);
  const auto d1 = simulate_decode_step(f.d, f.k, f.c, 256, 1000, true, {});
  const auto d4 = simulate_decode_step(f.d, f.k, f.c, 256, 4000, true, {});
  CHECK(d1.step_us < d4.step_us);
  // Sanity: a 256-sequence decode step of a 61-layer model takes tens of ms, a 16K-token prefill step ~a second.
  CHECK(d1.step_us > 10e3);
  CHECK(d1.step_us < 200e3);
  CHECK(p4.step_us > 300e3);
  CHECK(p4.step_us < 5e6);
}

TEST_CASE("simulator: cost arithmetic matches the published $0.20 per 1M output tokens") {
  // 8 GPUs x $2/h = 16 $/node-hour over 22.3k tok/s/node.
  CHECK(cost_per_million_tokens(22300, 8, 2.0) == doctest::Approx(16.0 / (22300.0 * 3600.0) * 1e6));
  CHECK(cost_per_million_tokens(22300, 8, 2.0) == doctest::Approx(0.20).epsilon(0.01));
  CHECK(cost_per_million_tokens(44600, 8, 2.0) == doctest::Approx(0.0996).epsilon(0.01));
  CHECK_THROWS_AS(cost_per_million_tokens(0, 8, 2.0), std::invalid_argument);
}

TEST_CASE("simulator: DeepEP figures and interpolation") {
  const auto c = deepep_published_figures();
  CHECK(normal_mode_at(c, 32).dispatch_GBps == 58);
  CHECK(normal_mode_at(c, 8).dispatch_GBps == 153);
  const auto at32 = low_latency_at(c, 32, 128);
  CHECK(at32.dispatch_us == doctest::Approx(155));
  CHECK(at32.combine_us == doctest::Approx(273));
  const auto at72 = low_latency_at(c, 72, 128);
  CHECK(at72.dispatch_us > 173);
  CHECK(at72.dispatch_us < 192);
  // Half the tokens: the fixed part stays, the rest halves.
  CHECK(low_latency_at(c, 32, 64).dispatch_us == doctest::Approx(155 * (0.3 + 0.7 * 0.5)));
}

TEST_CASE("simulator: kernel-time and comm files round-trip and reject bad fields") {
  const auto k = derived_kernel_times();
  CHECK(k.source.find("derived") != std::string::npos);
  CHECK(k.source.find("not measured") != std::string::npos);
  const auto back = kernel_times_from_json(to_json(k));
  REQUIRE(back.prefill.layers.size() == k.prefill.layers.size());
  CHECK(back.prefill.layers[1].expert_gemm_us == doctest::Approx(k.prefill.layers[1].expert_gemm_us));
  CHECK(back.decode.gemm_knee_tokens == doctest::Approx(k.decode.gemm_knee_tokens));
  auto j = to_json(k);
  j["phases"]["decode"]["layers"][1]["expert_gem_us"] = 3.0;
  CHECK_THROWS_WITH_AS(kernel_times_from_json(j), doctest::Contains("unknown field \"expert_gem_us\""),
                       std::invalid_argument);
  j = to_json(k);
  j["phases"]["prefill"]["tokens_per_rank"] = -1;
  CHECK_THROWS_WITH_AS(kernel_times_from_json(j), doctest::Contains("tokens_per_rank"), std::invalid_argument);
  const auto c = comm_figures_from_json(to_json(deepep_published_figures()));
  CHECK(c.low_latency.size() == 6);
  CHECK(c.normal[2].combine_GBps == 57);
  auto cj = to_json(deepep_published_figures());
  cj["low_latency"].erase("points");
  CHECK_THROWS_AS(comm_figures_from_json(cj), std::invalid_argument);
}

TEST_CASE("simulator: EPLB placement balances a step better than the identity placement") {
  const auto window = petrel::eplb::zipf_load(6, 256, 8, 8192, 1.0, 3);
  const auto with = step_balance(window, 32, 288, 8, 4, 8, 16384.0 * 32, true, 4);
  const auto without = step_balance(window, 32, 256, 8, 4, 8, 16384.0 * 32, false, 4);
  REQUIRE(with.size() == 6);
  for (size_t l = 0; l < with.size(); ++l) {
    CHECK(with[l] > without[l]);
    CHECK(with[l] <= 1.0);
  }
}

TEST_CASE("simulator: the anchor suite reports every figure next to its anchor") {
  suite_inputs in;
  in.window_tokens = 4096;
  const auto res = run_anchor_suite(in);
  REQUIRE(res.rows.size() == 12);
  int with_anchor = 0;
  for (const auto& r : res.rows) {
    CHECK(r.simulated > 0);
    if (r.anchor) {
      ++with_anchor;
      CHECK(r.ratio().has_value());
    }
  }
  CHECK(with_anchor == 11);
  CHECK(res.rows[0].anchor.value() == 57674);
  // 1K prompts are faster than 4K; ideal balance beats EPLB's real balance.
  CHECK(res.rows[0].simulated > res.rows[2].simulated);
  CHECK(res.rows[3].simulated > res.rows[2].simulated);
  // EPLB ablations are speedups.
  CHECK(res.rows[9].simulated > 1.0);
  CHECK(res.rows[10].simulated > 1.0);
  // The cost row follows from the decode row.
  CHECK(res.rows[11].simulated == doctest::Approx(cost_per_million_tokens(res.rows[4].simulated, 8, 2.0)));
}

TEST_CASE("simulator: CLI prints JSON with anchors and exits 2 on bad input") {
  std::string out;
  REQUIRE(run_cli("--json --window-tokens 4096", &out) == 0);
  const auto j = nlohmann::json::parse(out);
  CHECK(j["label"].get<std::string>().find("SIMULATED") != std::string::npos);
  CHECK(j["label"].get<std::string>().find("not measured") != std::string::npos);
  CHECK(j["rows"].size() == 12);
  CHECK(j["rows"][4]["anchor"] == 22282.0);
  const std::string bad = "/tmp/petrel_test_sim_" + std::to_string(getpid()) + ".json";
  std::ofstream(bad) << R"({"phases": {"prefill": {}}})";
  CHECK(run_cli("--kernel-times " + bad) == 2);
  CHECK(run_cli("--kernel-times /nonexistent/k.json") == 2);
  CHECK(run_cli("--zipf -1") == 2);
  std::ofstream(bad) << "[[1, 2, 3]]";
  CHECK(run_cli("--expert-load " + bad) == 2); // 3 experts, the model has 256
  std::remove(bad.c_str());
}

namespace {

// A bench-rank --json file for a run of `tokens` at `context`, whose measured phase is the derived default scaled by
// `factor` (so the expected numbers are known).
nlohmann::json fake_bench_rank(bool decode, double tokens, double context, double step_us, double factor) {
  auto j = to_json(derived_kernel_times());
  const std::string phase = decode ? "decode" : "prefill";
  auto& ph = j["phases"][phase];
  ph["source"] = "measured: test";
  ph["min_kernel_us"] = 0;  // no launch floor: at its own load a file must reproduce itself exactly
  ph["tokens_per_rank"] = tokens;
  ph["context"] = context;
  for (auto& l : ph["layers"])
    for (auto& [key, v] : l.items())
      if (key.size() > 3 && key.substr(key.size() - 3) == "_us") v = v.get<double>() * factor;
  ph["layers"][0]["other_us"] = 10.0;
  j["bench_rank"] = {{"phase", phase}, {"preset", "test"}, {"device", "none"}, {"date", "today"}, {"layers", 61},
                     {"dense_layers", 3}, {"tokens", tokens}, {"context", context}, {"imbalance", 1.0},
                     {"step_us", step_us}};
  return j;
}

double sum_step(const kernel_times& k, bool decode) {
  double s = 0;
  for (const auto& l : (decode ? k.decode : k.prefill).layers)
    s += l.count * (l.attention_core_us + l.attention_gemm_us + l.mlp_gemm_us + l.shared_expert_gemm_us + l.expert_gemm_us +
                    l.head_gemm_us + l.routing_us + l.norm_us + l.quant_us + l.other_us);
  return s;
}

} // namespace

TEST_CASE("simulator: validation reproduces a bench-rank run from its own times and reports the step error") {
  auto run = fake_bench_rank(true, 256, 2000, 0, 1.5);
  const auto own = kernel_times_from_json(run);
  CHECK(phase_is_measured(own, true));
  CHECK_FALSE(phase_is_measured(own, false));
  const double kernels = sum_step(own, true);
  run["bench_rank"]["step_us"] = kernels * 1.1;  // the step took 10% longer than its kernels
  const auto v = validate_bench_rank(run, own);
  REQUIRE(v.rows.size() > 5);
  CHECK(v.rows[0].metric == "step");
  CHECK(v.rows[0].simulated_us == doctest::Approx(kernels));
  CHECK(v.rows[0].error() == doctest::Approx(1 / 1.1 - 1));
  for (std::size_t i = 1; i < v.rows.size(); ++i) CHECK(v.rows[i].error() == doctest::Approx(0.0));
  bool saw_other = false;
  for (const auto& r : v.rows) saw_other |= r.metric == "other_us";
  CHECK(saw_other);
  // Simulating a run at another load from these times scales the kernels (here: half the sequences).
  auto half = fake_bench_rank(true, 128, 2000, kernels, 1.5);
  half["bench_rank"]["tokens"] = 128;
  const auto v2 = validate_bench_rank(half, own);
  CHECK(v2.rows[0].simulated_us < kernels);
  // Missing block or bad phase: a clear error.
  CHECK_THROWS_WITH_AS(validate_bench_rank(nlohmann::json::object(), own), doctest::Contains("bench_rank"), std::invalid_argument);
  run["bench_rank"]["phase"] = "train";
  CHECK_THROWS_WITH_AS(validate_bench_rank(run, own), doctest::Contains("phase"), std::invalid_argument);
}

TEST_CASE("simulator: measured phases from two bench-rank files merge; a2a per layer matches the step model") {
  const auto pre = kernel_times_from_json(fake_bench_rank(false, 16384, 4096, 1, 2.0));
  const auto dec = kernel_times_from_json(fake_bench_rank(true, 256, 2000, 1, 3.0));
  const auto both = merge_measured(pre, dec);
  CHECK(phase_is_measured(both, false));
  CHECK(phase_is_measured(both, true));
  CHECK(sum_step(both, false) == doctest::Approx(sum_step(pre, false)));
  CHECK(sum_step(both, true) == doctest::Approx(sum_step(dec, true)));
  CHECK(both.source.find("prefill") != std::string::npos);
  // other_us survives the round trip
  CHECK(kernel_times_from_json(to_json(both)).decode.layers[0].other_us == 10.0);

  deployment d;
  const auto c = deepep_published_figures();
  const auto a = prefill_a2a_per_layer(d, c, 16384, 1.0);
  const auto a_busy = prefill_a2a_per_layer(d, c, 16384, 0.5);
  CHECK(a.dispatch_us > 0);
  CHECK(a.combine_us > a.dispatch_us);  // bf16 combine moves about twice the bytes of fp8 dispatch at similar GB/s
  CHECK(a_busy.dispatch_us - d.rdma.latency_us == doctest::Approx(2 * (a.dispatch_us - d.rdma.latency_us)));
  const auto ll = decode_a2a_per_layer(d, c, 128, 1.0);
  const auto p64 = low_latency_at(c, 72, 128);
  CHECK(ll.dispatch_us == doctest::Approx(p64.dispatch_us));
}

TEST_CASE("simulator: CLI --validate prints simulated vs measured and exits 2 on a file without a bench_rank block") {
  const std::string run = "/tmp/petrel_test_validate_" + std::to_string(getpid()) + ".json";
  auto j = fake_bench_rank(false, 16384, 4096, 0, 1.0);
  j["bench_rank"]["step_us"] = sum_step(kernel_times_from_json(j), false);
  std::ofstream(run) << j.dump();
  std::string out;
  REQUIRE(run_cli("--validate " + run + " --json", &out) == 0);
  const auto v = nlohmann::json::parse(out);
  CHECK(v["label"].get<std::string>().find("SIMULATED vs MEASURED") != std::string::npos);
  REQUIRE(v["validation"].size() == 1);
  CHECK(v["validation"][0]["phase"] == "prefill");
  CHECK(v["validation"][0]["rows"][0]["metric"] == "step");
  CHECK(std::fabs(v["validation"][0]["rows"][0]["error"].get<double>()) < 1e-9);
  // the same file also works as measured kernel times for the cluster model (its prefill phase overlays the default)
  REQUIRE(run_cli("--kernel-times " + run + " --json --window-tokens 4096", &out) == 0);
  CHECK(nlohmann::json::parse(out)["label"].get<std::string>().find("measured: test") != std::string::npos);
  std::ofstream(run) << to_json(derived_kernel_times()).dump();  // no bench_rank block
  CHECK(run_cli("--validate " + run) == 2);
  CHECK(run_cli("--validate /nonexistent/run.json") == 2);
  std::remove(run.c_str());
}
