// petrel eplb: run DeepSeek's EPLB on an expert load and print the placement, or (--report) compare the
// balancedness before (identity placement, no redundancy) and after EPLB.
//   petrel eplb --input loads.json --replicas 16 --groups 4 --nodes 2 --gpus 8
//   petrel eplb --zipf 1.2 --experts 256 --layers 58 --replicas 288 --groups 8 --nodes 4 --gpus 32 --tokens 65536 --report
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "runtime/eplb.hpp"
#include "runtime/expert_load.hpp"
#include "tools/command.hpp"

namespace {

using namespace petrel::eplb;

struct eplb_options {
  std::string input;
  double zipf = -1;
  int experts = 256;
  int layers = 58;
  int top_k = 8;
  int64_t tokens = 65536;
  uint64_t seed = 1;
  eplb_shape shape;
  bool report = false;
};

int bad_input(const std::string& msg) {
  std::fprintf(stderr, "petrel eplb: %s\n", msg.c_str());
  return petrel::cli::exit_bad_input;
}

nlohmann::ordered_json summary(const balancedness_report& r) {
  double lo = 1.0;
  for (double x : r.per_layer) lo = std::min(lo, x);
  return {{"balancedness_mean", r.mean}, {"balancedness_step_weighted", r.step_weighted}, {"worst_layer", lo}};
}

int run(const eplb_options& o) {
  expert_load_matrix load;
  nlohmann::ordered_json source;
  if (!o.input.empty()) {
    std::ifstream in(o.input);
    if (!in) return bad_input("cannot open --input file '" + o.input + "'");
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      return bad_input("--input file '" + o.input + "' is not valid JSON: " + e.what());
    }
    try {
      load = load_matrix_from_json(j);
    } catch (const std::exception& e) {
      return bad_input("--input file '" + o.input + "': " + e.what());
    }
    source = {{"input", o.input}};
  } else if (o.zipf >= 0) {
    if (o.experts <= 0 || o.layers <= 0 || o.tokens <= 0 || o.top_k <= 0 || o.top_k > o.experts)
      return bad_input("--experts, --layers, --tokens must be positive and 0 < --top-k <= --experts");
    load = zipf_load(o.layers, o.experts, o.top_k, o.tokens, o.zipf, o.seed);
    source = {{"zipf", o.zipf}, {"experts", o.experts}, {"layers", o.layers}, {"tokens", o.tokens},
              {"top_k", o.top_k}, {"seed", o.seed}};
  } else {
    return bad_input("give either --input loads.json or --zipf S (synthetic load)");
  }
  if (std::string err = check_arguments(load, o.shape); !err.empty()) return bad_input(err);

  const expert_placement placed = rebalance_experts(load, o.shape);
  if (!o.report) {
    nlohmann::ordered_json out = {{"phy2log", placed.phy2log}, {"log2phy", placed.log2phy}, {"logcnt", placed.logcnt}};
    std::cout << out.dump() << "\n";
    return petrel::cli::exit_ok;
  }
  const int num_logical = static_cast<int>(load[0].size());
  if (o.shape.num_gpus > num_logical)
    return bad_input("--report needs gpus <= experts for the identity placement (got " +
                     std::to_string(o.shape.num_gpus) + " GPUs, " + std::to_string(num_logical) + " experts)");
  const auto before = balancedness(identity_placement(static_cast<int>(load.size()), num_logical), load, o.shape.num_gpus);
  const auto after = balancedness(placed, load, o.shape.num_gpus);
  nlohmann::ordered_json out = {
      {"load", source},
      {"shape",
       {{"replicas", o.shape.num_replicas},
        {"groups", o.shape.num_groups},
        {"nodes", o.shape.num_nodes},
        {"gpus", o.shape.num_gpus},
        {"policy", uses_hierarchical_policy(o.shape) ? "hierarchical" : "global"}}},
      {"before", summary(before)},
      {"after", summary(after)},
      {"moe_time_ratio_before_over_after", after.step_weighted / before.step_weighted},
      {"note", "balancedness = mean GPU load / max GPU load per layer; before = identity placement without "
               "redundant experts (expert e on GPU e*gpus/experts)"}};
  std::cout << out.dump(2) << "\n";
  return petrel::cli::exit_ok;
}

const bool registered = petrel::cli::register_command(
    "eplb", "Balance experts over GPUs with DeepSeek's EPLB; print the placement or a balancedness report",
    [](CLI::App& sub) -> petrel::cli::command_fn {
      auto o = std::make_shared<eplb_options>();
      sub.add_option("--input", o->input, "expert load JSON: [[layer 0 loads], ...] or {\"weight\": ...} or a recorder dump");
      sub.add_option("--zipf", o->zipf, "generate a Zipf(S)-skewed routing load instead of reading --input");
      sub.add_option("--experts", o->experts, "logical experts for --zipf (default 256)");
      sub.add_option("--layers", o->layers, "MoE layers for --zipf (default 58)");
      sub.add_option("--top-k", o->top_k, "experts per token for --zipf (default 8)");
      sub.add_option("--tokens", o->tokens, "tokens routed per layer for --zipf (default 65536)");
      sub.add_option("--seed", o->seed, "random seed for --zipf (default 1)");
      sub.add_option("--replicas", o->shape.num_replicas, "physical expert slots in the EP group")->required();
      sub.add_option("--groups", o->shape.num_groups, "expert groups (default 1)");
      sub.add_option("--nodes", o->shape.num_nodes, "nodes (default 1)");
      sub.add_option("--gpus", o->shape.num_gpus, "GPUs in the EP group")->required();
      sub.add_flag("--report", o->report, "print balancedness before/after EPLB instead of the placement");
      return [o] { return run(*o); };
    });

} // namespace
