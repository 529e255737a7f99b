// A served cluster on the GPU: prefill and decode ranks on cuda (sharing one GPU when there is only one), the
// KV cache moving GPU to GPU through CUDA IPC (or staged through host memory and UCX), outputs equal to the
// single-process cpu model, and a GPU rank restarted live.
// Compiles everywhere; without CUDA or without a GPU every case reports the skip and passes that check only.
#include <doctest/doctest.h>

#ifdef PETREL_HAVE_CUDA
#include <chrono>
#include <csignal>
#include <fstream>
#include <future>
#include <iterator>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "actors/cluster.hpp"
#include "tests/support/cuda_test_util.hpp"
#include "tests/support/launched_cluster.hpp"

namespace {

using namespace petrel::test;
using namespace std::chrono_literals;

/// cluster.yaml of a PD pair on the GPU: p0 prefills, d0 decodes. With one GPU both use cuda:0.
std::string gpu_yaml(const std::string& name, const std::string& run_dir, const std::string& transport) {
  int n = 0;
  cudaGetDeviceCount(&n);
  const std::string decode_gpu = n > 1 ? "cuda:1" : "cuda:0";
  return "cluster: {name: " + name + ", run_dir: " + run_dir + "}\n" + "model: {path: " + fortune_model_dir() +
         ", name: fortune-moe, backend: cuda, share_gpus: true}\n" +
         "gateway: {host: 127.0.0.1, port: 0}\n"
         "nodes:\n  - {name: p0, ranks: [cuda:0]}\n  - {name: d0, ranks: [" +
         decode_gpu +
         "]}\n"
         "groups:\n"
         "  prefill: [{name: prefill0, nodes: [p0], chunk_tokens: 32, max_batch_tokens: 64, kv_pages: 128, "
         "page_size: 16}]\n"
         "  decode: [{name: decode0, nodes: [d0], page_size: 16, max_running: 16, kv_pages: 256}]\n"
         "supervision: {node_intensity: 10, node_period: 60s}\n"
         "transport: " +
         transport + "\n";
}

/// The value of one Prometheus sample (0 when absent).
double metric(int port, const std::string& sample) {
  auto body = http_get(port, "/metrics").body;
  auto at = body.find(sample + " ");
  return at == std::string::npos ? 0.0 : std::stod(body.substr(at + sample.size() + 1));
}

void serve_and_compare(launched_cluster& c) {
  for (const char* prompt : {"The meaning of life is", "Once upon a time", "Never trust"}) {
    CAPTURE(prompt);
    CHECK(completion_text(c.port, prompt, 40) == reference_text(prompt, 40));
  }
  // Several at once: the decode rank batches requests whose KV arrived at different times.
  std::vector<std::future<std::string>> many;
  for (int i = 0; i < 8; ++i)
    many.push_back(std::async(std::launch::async, [&c, i] {
      return completion_text(c.port, "Tell me about " + std::to_string(i), 24);
    }));
  for (int i = 0; i < 8; ++i)
    CHECK(many[i].get() == reference_text("Tell me about " + std::to_string(i), 24));
}

/// The served checks of a cluster whose EP groups move rows through the GPU plane (fp8 out, bf16 back): most
/// completions equal the fp32 reference, every rank's steps went through the plane, and a decode rank restarted
/// mid-request re-forms its group (new buffers or communicator) and the request finishes.
void check_gpu_plane_cluster(launched_cluster& c, const std::string& decode_rank) {
  // fp8 rows into the experts, bf16 back: where the fp32 reference has a near tie the text may take the other
  // branch (measured: "Tell me about 1" -> '9' 6.528 vs '0' 6.494), so most completions, not all, equal it. The
  // logit-level tolerance is checked in tests/unit/test_cuda_ep_plane.
  int same = 0, all = 0;
  auto check_prompt = [&](const std::string& prompt, const std::string& got, int tokens) {
    const std::string want = reference_text(prompt, tokens);
    CAPTURE(prompt);
    CAPTURE(got);
    CHECK(got.size() >= std::min<size_t>(want.size(), 8)); // a full completion, not an error or an empty answer
    same += got == want ? 1 : 0;
    all++;
  };
  for (const char* prompt : {"The meaning of life is", "Once upon a time", "Never trust"})
    check_prompt(prompt, completion_text(c.port, prompt, 40), 40);
  std::vector<std::future<std::string>> many;
  for (int i = 0; i < 6; ++i)
    many.push_back(std::async(std::launch::async,
                              [&c, i] { return completion_text(c.port, "Tell me about " + std::to_string(i), 24); }));
  for (int i = 0; i < 6; ++i) check_prompt("Tell me about " + std::to_string(i), many[size_t(i)].get(), 24);
  MESSAGE(same << " of " << all << " completions equal the fp32 reference text");
  CHECK(same * 3 >= all * 2); // 7 of 9 on the H100
  for (const char* group : {"prefill0", "decode0"}) {
    auto r = run_petrel(std::string("rebalance --json ") + c.cfg + " " + group);
    REQUIRE_MESSAGE(r.exit_code == 0, r.output);
    for (auto& rank : nlohmann::json::parse(r.output)) CHECK(rank.value("device_steps", 0) > 0);
  }
  // A decode rank restarted mid-request: its group re-forms (new buffers, new handles) and the request finishes.
  auto fut = std::async(std::launch::async, [&] { return completion_text(c.port, "Once upon a time", 80); });
  std::this_thread::sleep_for(300ms);
  auto r = run_petrel("restart " + c.cfg + " " + decode_rank);
  CHECK_MESSAGE(r.exit_code == 0, r.output);
  const std::string after = fut.get(), ref = reference_text("Once upon a time", 80);
  CAPTURE(after);
  CHECK(after.size() >= 40);
  CHECK(after.substr(0, 24) == ref.substr(0, 24)); // its first 40 tokens equal the reference above
  CHECK(eventually(30s, [&] { return c.idle(); }));
}

} // namespace

TEST_CASE("a GPU cluster serves the cpu model's text with KV moved through CUDA IPC, across a rank restart") {
  if (!gpu_available()) {
    MESSAGE("skipped: no GPU");
    return;
  }
  launched_cluster c("gpuipc", [](const std::string& run) { return gpu_yaml("gpuipc", run, "{kv_gpu_path: auto}"); },
                     120s);
  serve_and_compare(c);
  CHECK(metric(c.port, "petrel_kv_transfers_total{path=\"cuda_ipc\"}") >= 11);
  CHECK(metric(c.port, "petrel_kv_transfers_total{path=\"staged\"}") == 0);

  // The decode rank restarts mid-request (new pool, new IPC handle): the request migrates, the text is the same;
  // later transfers map the new pool.
  auto fut = std::async(std::launch::async, [&] { return completion_text(c.port, "Once upon a time", 120); });
  std::this_thread::sleep_for(300ms);
  auto r = run_petrel("restart " + c.cfg + " d0/rank0");
  CHECK_MESSAGE(r.exit_code == 0, r.output);
  CHECK(fut.get() == reference_text("Once upon a time", 120));
  CHECK(completion_text(c.port, "Never trust", 32) == reference_text("Never trust", 32));
  CHECK(eventually(30s, [&] { return c.idle(); }));

  // SIGKILL the decode node's process mid-request, then the prefill node's: the IPC mappings of the dead process
  // are dropped with its endpoint, the restarted process registers new pools, and the text stays the same.
  for (const char* node : {"d0", "p0"}) {
    CAPTURE(node);
    int pid = node_pid(c.cfg, node);
    REQUIRE(pid > 0);
    auto during = std::async(std::launch::async, [&] { return completion_text(c.port, "Once upon a time", 120); });
    std::this_thread::sleep_for(400ms);
    ::kill(pid, SIGKILL);
    CHECK(during.get() == reference_text("Once upon a time", 120));
    CHECK(completion_text(c.port, "The meaning of life is", 40) == reference_text("The meaning of life is", 40));
    CHECK(eventually(60s, [&] { return c.idle() && c.health()["status"] == "ok"; }));
  }

  // A device fault in the decode rank (a kernel traps: sticky error): its process exits with the sticky-error code,
  // the head restarts it, and the request in flight finishes with the same text.
  {
    const int before = node_pid(c.cfg, "d0");
    auto run = petrel::read_run_file(petrel::run_file_path(petrel::load_cluster_config(c.cfg)));
    REQUIRE(run);
    auto during = std::async(std::launch::async, [&] { return completion_text(c.port, "Once upon a time", 400); });
    std::this_thread::sleep_for(100ms);
    petrel::fault_request fault;
    fault.kind = "gpu_fault", fault.node = "d0", fault.child = "rank0";
    std::string detail;
    CHECK_MESSAGE(petrel::inject_fault(*run, fault, detail) == 0, detail);
    CHECK(during.get() == reference_text("Once upon a time", 400));
    // A new process (the old context was lost), then serving as before.
    bool replaced = eventually(60s, [&] {
      int now = node_pid(c.cfg, "d0");
      return now > 0 && now != before;
    });
    if (!replaced) { // say what the node process printed
      std::ifstream log(c.dir.path / "run" / "gpuipc" / "d0.log");
      std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
      MESSAGE("d0.log (last 3000 bytes): " << text.substr(text.size() > 3000 ? text.size() - 3000 : 0));
    }
    CHECK(replaced);
    CHECK(eventually(60s, [&] { return c.idle() && c.health()["status"] == "ok"; }));
    CHECK(completion_text(c.port, "Never trust", 32) == reference_text("Never trust", 32));
  }
  CHECK(metric(c.port, "petrel_kv_transfers_total{path=\"staged\"}") == 0); // every transfer stayed on the GPU
}

TEST_CASE("a GPU cluster with staged KV (pinned host mirrors + UCX) and checksums serves the same text") {
  if (!gpu_available()) {
    MESSAGE("skipped: no GPU");
    return;
  }
  launched_cluster c(
      "gpustaged",
      [](const std::string& run) { return gpu_yaml("gpustaged", run, "{kv_gpu_path: staged, kv_checksum: on}"); },
      120s);
  serve_and_compare(c);
  CHECK(metric(c.port, "petrel_kv_transfers_total{path=\"staged\"}") >= 11);
  CHECK(metric(c.port, "petrel_kv_transfers_total{path=\"cuda_ipc\"}") == 0);
  CHECK(metric(c.port, "petrel_kv_checksum_checks_total{result=\"ok\"}") >= 11);
  CHECK(eventually(30s, [&] { return c.idle(); }));
}
TEST_CASE("expert-parallel groups of GPU ranks sharing one GPU serve the cpu model's text, TBO and low-latency included") {
  if (!gpu_available()) {
    MESSAGE("skipped: no GPU");
    return;
  }
  // Four GPU ranks on one GPU: an EP2 prefill group with two-batch overlap, an EP2 low-latency decode group; each
  // rank owns its streams and memory, the experts are split between the two ranks of each group.
  auto yaml = [](const std::string& run) {
    return "cluster: {name: gpuep, run_dir: " + run + "}\n" + "model: {path: " + fortune_model_dir() +
           ", name: fortune-moe, backend: cuda, share_gpus: true}\n" +
           "gateway: {host: 127.0.0.1, port: 0}\n"
           "nodes:\n  - {name: p0, ranks: [cuda:0, cuda:0]}\n  - {name: d0, ranks: [cuda:0, cuda:0]}\n"
           "groups:\n"
           "  prefill: [{name: prefill0, nodes: [p0], ep_size: 2, redundant_experts: 2, two_batch_overlap: true, "
           "chunk_tokens: 32, max_batch_tokens: 64}]\n"
           "  decode: [{name: decode0, nodes: [d0], ep_size: 2, ep_mode: low_latency}]\n"
           "supervision: {node_intensity: 5, node_period: 60s, intensity: 20, period: 10s}\n"
           // fp32 rows through the host, so the text equals the cpu model's (auto would take the GPU plane, fp8)
           "transport: {expert_exchange: inproc}\n";
  };
  launched_cluster c("gpuep", yaml, 180s);
  serve_and_compare(c);
  // A live rebalance of each group, then a crash of a decode rank mid-request: same text throughout.
  for (const char* group : {"prefill0", "decode0"}) {
    auto r = run_petrel("rebalance " + c.cfg + " " + group);
    CHECK_MESSAGE(r.exit_code == 0, r.output);
  }
  CHECK(completion_text(c.port, "The meaning of life is", 40) == reference_text("The meaning of life is", 40));
  auto fut = std::async(std::launch::async, [&] { return completion_text(c.port, "Once upon a time", 120); });
  std::this_thread::sleep_for(300ms);
  auto r = run_petrel("restart " + c.cfg + " d0/rank1");
  CHECK_MESSAGE(r.exit_code == 0, r.output);
  CHECK(fut.get() == reference_text("Once upon a time", 120));
  CHECK(eventually(30s, [&] { return c.idle(); }));
}

TEST_CASE("EP groups with the GPU expert exchange (auto -> cuda_ipc) serve within fp8 tolerance, across processes too") {
  if (!gpu_available()) {
    MESSAGE("skipped: no GPU");
    return;
  }
  // Every rank in a node process of its own (ranks of one group sharing a GPU must not share a CUDA context:
  // cluster_config refuses it for cuda_ipc); the ranks open each other's buffers through CUDA IPC handles and take
  // UCX for the control traffic.
  auto yaml = [](const std::string& run) {
    return "cluster: {name: gpuipc, run_dir: " + run + "}\n" + "model: {path: " + fortune_model_dir() +
           ", name: fortune-moe, backend: cuda, share_gpus: true}\n" +
           "gateway: {host: 127.0.0.1, port: 0}\n"
           "nodes:\n  - {name: p0, ranks: [cuda:0]}\n  - {name: p1, ranks: [cuda:0]}\n"
           "  - {name: d0, ranks: [cuda:0]}\n  - {name: d1, ranks: [cuda:0]}\n"
           "groups:\n"
           "  prefill: [{name: prefill0, nodes: [p0, p1], ep_size: 2, two_batch_overlap: true, chunk_tokens: 32, "
           "max_batch_tokens: 64}]\n"
           "  decode: [{name: decode0, nodes: [d0, d1], ep_size: 2, redundant_experts: 2, ep_mode: low_latency}]\n"
           "supervision: {node_intensity: 5, node_period: 60s, intensity: 20, period: 10s}\n";
    // No transport section: expert_exchange auto resolves to cuda_ipc (cuda ranks on one host); the ranks' stats
    // below show that the rows went through the GPU plane.
  };
  launched_cluster c("gpuipc", yaml, 180s);
  check_gpu_plane_cluster(c, "d1/rank0");
}

TEST_CASE("EP groups with the NCCL expert exchange serve within fp8 tolerance, a GPU per rank, across processes too") {
  int gpus = 0;
  cudaGetDeviceCount(&gpus);
  if (gpus < 2) {
    MESSAGE("skipped: the NCCL exchange needs a GPU per rank and this machine has " << gpus);
    return;
  }
  // Rank 0 of each group makes the NCCL unique id; the scheduler's ep_peers message (CAF) carries it to the others.
  auto yaml = [](const std::string& run) {
    return "cluster: {name: gpunccl, run_dir: " + run + "}\n" + "model: {path: " + fortune_model_dir() +
           ", name: fortune-moe, backend: cuda, share_gpus: true}\n" +
           "gateway: {host: 127.0.0.1, port: 0}\n"
           "nodes:\n  - {name: p0, ranks: [cuda:0]}\n  - {name: p1, ranks: [cuda:1]}\n"
           "  - {name: d0, ranks: [cuda:0, cuda:1]}\n"
           "groups:\n"
           "  prefill: [{name: prefill0, nodes: [p0, p1], ep_size: 2, two_batch_overlap: true, chunk_tokens: 32, "
           "max_batch_tokens: 64}]\n"
           "  decode: [{name: decode0, nodes: [d0], ep_size: 2, redundant_experts: 2, ep_mode: low_latency}]\n"
           "supervision: {node_intensity: 5, node_period: 60s, intensity: 20, period: 10s}\n"
           "transport: {expert_exchange: nccl}\n";
  };
  launched_cluster c("gpunccl", yaml, 180s);
  check_gpu_plane_cluster(c, "d0/rank1");
}
#else
TEST_CASE("GPU cluster: this build has no CUDA") { MESSAGE("skipped: built without CUDA"); }
#endif
