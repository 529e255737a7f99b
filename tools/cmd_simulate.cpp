// petrel simulate: the discrete-event model of the SGLang PD + large-EP deployment (runtime/simulator.hpp).
// Prints each simulated figure next to its published anchor and the ratio; --json for machines.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "runtime/expert_load.hpp"
#include "runtime/simulator.hpp"
#include "tools/command.hpp"
#include "tools/svg_plot.hpp"

namespace {

using namespace petrel::sim;

struct simulate_options {
  std::vector<std::string> kernel_times_files, validate_files;
  std::string comm_file, expert_load_file, write_kernel_times, write_comm;
  double zipf = 1.0, window_tokens = 65536, gpu_hour_usd = 2.0, tbo_overhead_us = 5;
  double prefill_tokens = 16384, decode_seqs = 256, kv_len = 2000;
  int prefill_nodes = 4, decode_nodes = 9, prefill_slots = 288, decode_slots = 288;
  uint64_t seed = 1;
  bool json = false;
  std::string plot_file;
};

int bad_input(const std::string& msg) {
  std::fprintf(stderr, "petrel simulate: %s\n", msg.c_str());
  return petrel::cli::exit_bad_input;
}

// Reads a JSON file; on failure returns the message for bad_input.
std::string read_json(const std::string& path, const char* flag, nlohmann::json& out) {
  std::ifstream in(path);
  if (!in) return std::string("cannot open ") + flag + " file '" + path + "'";
  try {
    out = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    return std::string(flag) + " file '" + path + "' is not valid JSON: " + e.what();
  }
  return {};
}

int write_json(const std::string& path, const nlohmann::json& j) {
  std::ofstream out(path);
  if (!out) return bad_input("cannot write '" + path + "'");
  out << j.dump(2) << "\n";
  std::fprintf(stderr, "petrel simulate: wrote %s\n", path.c_str());
  return petrel::cli::exit_ok;
}

// A short bar label from a row's metric: "prefill input tok/s/node, 4K prompts, ideal expert balance (EP32...)"
// -> "prefill 4K prompts, ideal expert balance"; the full metric stays in the table and in --json.
std::string short_label(const std::string& metric) {
  std::string s = metric.substr(0, metric.find(" ("));
  for (const char* noise : {"input tok/s/node, ", "output tok/s/node", " (4K prompts)"})
    if (auto p = s.find(noise); p != std::string::npos) s.erase(p, std::string(noise).size());
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

/// Simulated next to published: per-node throughput (tok/s rows) and the speedups (x rows) that have an anchor.
int write_plot(const std::string& path, const suite_result& res, const std::string& label) {
  petrel::plot::bar_chart tput, speedup;
  tput.title = "Throughput per node: simulated vs published";
  tput.y_label = "tokens/s per node";
  speedup.title = "TBO and EPLB speedups: simulated vs published";
  speedup.y_label = "speedup (x)";
  for (auto* c : {&tput, &speedup}) c->series_names = {"simulated (petrel simulate)", "published (SGLang, H100)"};
  for (const auto& r : res.rows) {
    if (!r.anchor) continue;
    auto* c = r.unit == "tok/s" ? &tput : r.unit == "x" ? &speedup : nullptr;
    if (c) c->groups.push_back({short_label(r.metric), {r.simulated, *r.anchor}});
  }
  std::vector<petrel::plot::chart> panels{tput, speedup};
  auto svg = petrel::plot::render_svg(panels, 1, 900, 420);
  // The inputs the figures came from, as a footnote-free comment a reader of the file can find.
  std::string note = label;
  for (auto& ch : note)
    if (ch == '-') ch = ' '; // "--" may not appear inside an XML comment
  svg.insert(svg.find("<svg"), "<!-- " + note + " -->\n");
  if (auto err = petrel::plot::write_svg_file(path, svg); !err.empty()) return bad_input("--plot: " + err);
  std::fprintf(stderr, "petrel simulate: wrote %s\n", path.c_str());
  return petrel::cli::exit_ok;
}

// --validate: simulate each single-GPU bench-rank run and show the error against what it measured.
int validate(const simulate_options& o, const kernel_times& given) {
  nlohmann::json all = nlohmann::json::array();
  for (const auto& path : o.validate_files) {
    nlohmann::json j;
    if (auto err = read_json(path, "--validate", j); !err.empty()) return bad_input(err);
    validation_result v;
    try {
      const kernel_times k = o.kernel_times_files.empty() ? kernel_times_from_json(j) : given;
      v = validate_bench_rank(j, k);
    } catch (const std::exception& e) {
      return bad_input("--validate '" + path + "': " + e.what());
    }
    nlohmann::json rows = nlohmann::json::array();
    for (const auto& r : v.rows)
      rows.push_back({{"metric", r.metric}, {"measured_us", r.measured_us}, {"simulated_us", r.simulated_us}, {"error", r.error()}});
    all.push_back({{"file", path}, {"run", v.run}, {"phase", v.phase}, {"tokens", v.tokens}, {"context", v.context},
                   {"imbalance", v.imbalance}, {"kernel_times", v.kernels_from}, {"rows", rows}});
    if (o.json) continue;
    std::cout << fmt::format("validation: SIMULATED single-GPU {} run vs MEASURED ({})\n", v.phase, path);
    std::cout << fmt::format("  run: {}; {} tokens/rank, context {}, {} dense + {} MoE layers, imbalance {:.2f}, no all-to-all\n",
                             v.run, v.tokens, v.context, v.dense_layers, v.moe_layers, v.imbalance);
    std::cout << fmt::format("  kernel times: {}\n", v.kernels_from);
    std::cout << fmt::format("  {:<24} {:>14} {:>14} {:>9}\n", "per step", "measured ms", "simulated ms", "error");
    for (const auto& r : v.rows)
      std::cout << fmt::format("  {:<24} {:>14.3f} {:>14.3f} {:>8.1f}%\n", r.metric, r.measured_us / 1000, r.simulated_us / 1000,
                               100 * r.error());
  }
  if (o.json) std::cout << nlohmann::json({{"label", "SIMULATED vs MEASURED (petrel simulate --validate)"}, {"validation", all}}).dump(2) << "\n";
  return petrel::cli::exit_ok;
}

int run(const simulate_options& o) {
  if (!o.write_kernel_times.empty()) return write_json(o.write_kernel_times, to_json(derived_kernel_times()));
  if (!o.write_comm.empty()) return write_json(o.write_comm, to_json(deepep_published_figures()));
  suite_inputs in;
  // Several --kernel-times files: the first is taken whole, later ones overlay their measured phases
  // (one bench-rank file per phase makes one measured set).
  for (std::size_t i = 0; i < o.kernel_times_files.size(); ++i) {
    const auto& path = o.kernel_times_files[i];
    nlohmann::json j;
    if (auto err = read_json(path, "--kernel-times", j); !err.empty()) return bad_input(err);
    try {
      const auto k = kernel_times_from_json(j);
      in.kernels = i == 0 ? k : merge_measured(in.kernels, k);
    } catch (const std::exception& e) {
      return bad_input("--kernel-times '" + path + "': " + e.what());
    }
  }
  // Say per phase where the times come from when a file measured one of them (a bench-rank file measures one phase
  // and carries the derived default for the other).
  if (phase_is_measured(in.kernels, false) || phase_is_measured(in.kernels, true)) {
    auto src = [&](const phase_kernel_times& p) { return p.source.empty() ? in.kernels.source : p.source; };
    in.kernels.source = "prefill: " + src(in.kernels.prefill) + "; decode: " + src(in.kernels.decode);
  }
  if (!o.validate_files.empty()) return validate(o, in.kernels);
  if (!o.comm_file.empty()) {
    nlohmann::json j;
    if (auto err = read_json(o.comm_file, "--comm", j); !err.empty()) return bad_input(err);
    try {
      in.comm = comm_figures_from_json(j);
    } catch (const std::exception& e) {
      return bad_input("--comm '" + o.comm_file + "': " + e.what());
    }
  }
  if (!o.expert_load_file.empty()) {
    nlohmann::json j;
    if (auto err = read_json(o.expert_load_file, "--expert-load", j); !err.empty()) return bad_input(err);
    try {
      in.expert_load = petrel::eplb::load_matrix_from_json(j);
    } catch (const std::exception& e) {
      return bad_input("--expert-load '" + o.expert_load_file + "': " + e.what());
    }
    if (static_cast<int>((*in.expert_load)[0].size()) != in.dep.num_experts)
      return bad_input("--expert-load '" + o.expert_load_file + "' has " +
                       std::to_string((*in.expert_load)[0].size()) + " experts per layer, the model has " +
                       std::to_string(in.dep.num_experts));
  }
  if (!(o.zipf >= 0) || !(o.window_tokens >= 1) || !(o.gpu_hour_usd > 0) || !(o.tbo_overhead_us >= 0) ||
      !(o.prefill_tokens >= 2) || !(o.decode_seqs >= 2) || !(o.kv_len > 0))
    return bad_input("--zipf >= 0, --window-tokens >= 1, --gpu-hour-usd > 0, --tbo-overhead-us >= 0, "
                     "--prefill-tokens and --decode-seqs >= 2, --kv-len > 0");
  in.zipf_s = o.zipf;
  in.window_tokens = o.window_tokens;
  in.seed = o.seed;
  in.dep.gpu_hour_usd = o.gpu_hour_usd;
  in.dep.tbo_overhead_us = o.tbo_overhead_us;
  in.dep.prefill_tokens_per_device = o.prefill_tokens;
  in.dep.prefill_no_tbo_max_tokens = std::min(in.dep.prefill_no_tbo_max_tokens, o.prefill_tokens);
  in.dep.decode_seqs_per_device = o.decode_seqs;
  in.dep.decode_kv_len = o.kv_len;
  in.dep.prefill_nodes = o.prefill_nodes;
  in.dep.decode_nodes = o.decode_nodes;
  in.dep.prefill_ep = o.prefill_nodes * in.dep.gpus_per_node;
  in.dep.decode_ep = o.decode_nodes * in.dep.gpus_per_node;
  in.dep.prefill_slots = o.prefill_slots;
  in.dep.decode_slots = o.decode_slots;
  if (auto err = check_deployment(in.dep); !err.empty()) return bad_input(err);

  const auto res = run_anchor_suite(in);
  const std::string label = "SIMULATED (petrel simulate); kernel times: " + in.kernels.source +
                            "; dispatch/combine: " + in.comm.source;
  if (!o.plot_file.empty())
    if (int rc = write_plot(o.plot_file, res, label); rc != petrel::cli::exit_ok) return rc;
  if (o.json) {
    nlohmann::ordered_json rows = nlohmann::ordered_json::array();
    for (const auto& r : res.rows) {
      nlohmann::ordered_json j = {{"metric", r.metric}, {"unit", r.unit}, {"simulated", r.simulated}};
      j["anchor"] = r.anchor ? nlohmann::ordered_json(*r.anchor) : nlohmann::ordered_json(nullptr);
      j["ratio"] = r.ratio() ? nlohmann::ordered_json(*r.ratio()) : nlohmann::ordered_json(nullptr);
      j["anchor_source"] = r.anchor_source;
      rows.push_back(j);
    }
    nlohmann::ordered_json out = {{"label", label}, {"rows", rows}, {"detail", res.detail}};
    std::cout << out.dump(2) << "\n";
    return petrel::cli::exit_ok;
  }
  std::cout << label << "\n";
  std::cout << fmt::format("expert load: {}\n", res.detail["expert_load"].dump());
  std::cout << fmt::format("{:<84} {:>12} {:>10} {:>7}  {}\n", "metric", "simulated", "anchor", "ratio", "anchor source");
  for (const auto& r : res.rows) {
    const bool big = r.unit == "tok/s";
    const std::string sim = big ? fmt::format("{:.0f}", r.simulated) : fmt::format("{:.3f}", r.simulated);
    const std::string anc = !r.anchor ? "-" : big ? fmt::format("{:.0f}", *r.anchor) : fmt::format("{:.3f}", *r.anchor);
    const std::string ratio = r.ratio() ? fmt::format("{:.2f}", *r.ratio()) : "-";
    std::cout << fmt::format("{:<84} {:>12} {:>10} {:>7}  {}\n", r.metric, sim, anc, ratio, r.anchor_source);
  }
  std::cout << "\nstep breakdown (busiest rank)                 step ms   compute busy   comm busy   exposed comm\n";
  for (const auto& [name, s] : res.detail["scenarios"].items())
    std::cout << fmt::format("{:<44} {:>9.2f} {:>14.2f} {:>11.2f} {:>14.2f}\n", name, s["step_ms"].get<double>(),
                             s["compute_busy_ms"].get<double>(), s["comm_busy_ms"].get<double>(),
                             s["exposed_comm_ms"].get<double>());
  std::cout << fmt::format("balancedness (mean over MoE layers): {}\n", res.detail["balancedness"].dump());
  return petrel::cli::exit_ok;
}

const bool registered = petrel::cli::register_command(
    "simulate", "Discrete-event model of the PD + large-EP deployment; simulated figures next to published anchors",
    [](CLI::App& sub) -> petrel::cli::command_fn {
      auto o = std::make_shared<simulate_options>();
      sub.add_option("--kernel-times", o->kernel_times_files,
                     "per-layer kernel times JSON (petrel.kernel_times.v1, e.g. petrel bench-rank --json); repeat to "
                     "overlay measured phases; default: derived from published figures");
      sub.add_option("--validate", o->validate_files,
                     "bench-rank --json file(s): simulate that single-GPU run and show the error against its "
                     "measurement (kernel times: --kernel-times, else the run's own)");
      sub.add_option("--comm", o->comm_file, "dispatch/combine figures JSON (petrel.comm_figures.v1); default: DeepEP's");
      sub.add_option("--expert-load", o->expert_load_file, "real expert-load dump or [[...]] matrix instead of Zipf");
      sub.add_option("--zipf", o->zipf, "Zipf exponent of the synthetic expert load (default 1.0)");
      sub.add_option("--window-tokens", o->window_tokens, "tokens in the synthetic long-run load EPLB sees (default 65536)");
      sub.add_option("--seed", o->seed, "random seed (default 1)");
      sub.add_option("--gpu-hour-usd", o->gpu_hour_usd, "price of one GPU-hour (default 2.0)");
      sub.add_option("--tbo-overhead-us", o->tbo_overhead_us, "TBO cost per micro-batch per layer, µs (default 5)");
      sub.add_option("--prefill-tokens", o->prefill_tokens, "prefill tokens per device (default 16384)");
      sub.add_option("--decode-seqs", o->decode_seqs, "decode sequences per device (default 256)");
      sub.add_option("--kv-len", o->kv_len, "decode KV length (default 2000)");
      sub.add_option("--prefill-nodes", o->prefill_nodes, "prefill nodes of 8 GPUs; EP = 8 x nodes (default 4)");
      sub.add_option("--decode-nodes", o->decode_nodes, "decode nodes of 8 GPUs; EP = 8 x nodes (default 9)");
      sub.add_option("--prefill-slots", o->prefill_slots, "expert slots in the prefill EP group (default 288)");
      sub.add_option("--decode-slots", o->decode_slots, "expert slots in the decode EP group (default 288)");
      sub.add_option("--write-kernel-times", o->write_kernel_times, "write the default kernel-time file and exit");
      sub.add_option("--write-comm", o->write_comm, "write the default (DeepEP published) comm file and exit");
      sub.add_flag("--json", o->json, "print JSON instead of a table");
      sub.add_option("--plot", o->plot_file, "also write an SVG of simulated next to published figures to this file");
      return [o] { return run(*o); };
    });

} // namespace
