// The intranode GPU expert all-to-all (kernels/cuda/ep_a2a) against a host reference, with 2 and 4 ranks
// sharing whatever GPUs there are: as processes that exchange real CUDA IPC handles (petrel bench-ep
// --check-only re-executes itself once per rank) and as threads of one process (direct pointers). Both modes;
// the low-latency check includes a CUDA-graph capture replayed twice, compared with the eager round.
// Without a GPU every case passes with a message.
#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#ifdef PETREL_HAVE_CUDA
#include "kernels/cuda/ep_a2a.hpp"
#include "tests/support/cuda_test_util.hpp"
#endif

namespace {
#ifdef PETREL_HAVE_CUDA

// Runs `petrel bench-ep ARGS`; returns its exit code and keeps its output for the failure message.
int run_bench_ep(const std::string& args, std::string* output) {
  // $PETREL_BINARY wins over the build path (the device machine runs a packaged copy elsewhere)
  const char* env = std::getenv("PETREL_BINARY");
  const std::string cmd = std::string(env && *env ? env : PETREL_BINARY) + " bench-ep " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  while (fgets(buf, sizeof(buf), p)) *output += buf;
  const int status = pclose(p);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

bool skip_without_gpu() {
  if (petrel::test::gpu_available()) return false;
  MESSAGE("no CUDA device: the GPU expert all-to-all cases are skipped");
  return true;
}

void expect_check_passes(const std::string& args) {
  std::string out;
  const int rc = run_bench_ep(args + " --check-only --timeout 30", &out);
  INFO("petrel bench-ep " << args << "\n" << out);
  CHECK(rc == 0);
  CHECK(out.find("passed on every rank") != std::string::npos);
}
#endif

} // namespace

#ifdef PETREL_HAVE_CUDA
TEST_CASE("bench-ep rejects bad flags with exit code 2") { // checked before any GPU is touched
  std::string out;
  CHECK(run_bench_ep("--ranks 9", &out) == 2);
  CHECK(out.find("--ranks") != std::string::npos);
  out.clear();
  CHECK(run_bench_ep("--ranks 3 --experts 256", &out) == 2); // 256 % 3 != 0
  CHECK(out.find("--experts") != std::string::npos);
  out.clear();
  CHECK(run_bench_ep("--mode fast", &out) == 2);
  out.clear();
  CHECK(run_bench_ep("--hidden 100", &out) == 2);
  out.clear();
  CHECK(run_bench_ep("--mode low_latency --tokens 5000", &out) == 2);
}

TEST_CASE("ep_buffer rejects a bad config and foreign handles") {
  if (skip_without_gpu()) return;
  using namespace petrel::cuda;
  ep_buffer_config c;
  c.ranks = 2;
  c.experts = 255;
  CHECK_THROWS_AS(ep_buffer{c}, std::invalid_argument);
  c.experts = 8;
  c.hidden = 256;
  c.topk = 2;
  c.max_tokens = 16;
  c.ll_max_tokens = 8;
  c.rank = 0;
  ep_buffer a(c);
  ep_buffer_config c1 = c;
  c1.rank = 1;
  c1.hidden = 384; // another config
  ep_buffer b(c1);
  const auto st = a.open_peers({a.export_handle(), b.export_handle()});
  CHECK_FALSE(st.ok());
  CHECK(st.message.find("configured differently") != std::string::npos);
  CHECK_FALSE(a.open_peers({a.export_handle()}).ok()); // one handle for two ranks
  ep_handle_info info;
  std::string err;
  REQUIRE(parse_ep_handle(b.export_handle(), &info, &err));
  CHECK(info.rank == 1);
  CHECK_FALSE(parse_ep_handle({1, 2, 3}, &info, &err));
}

TEST_CASE("a wait for a rank that never comes times out with an error, not a hang") {
  if (skip_without_gpu()) return;
  using namespace petrel::cuda;
  ep_buffer_config c;
  c.ranks = 2;
  c.experts = 8;
  c.hidden = 256;
  c.topk = 2;
  c.max_tokens = 16;
  c.normal = false;
  c.ll_max_tokens = 8;
  c.timeout_s = 0.5;
  ep_buffer a(c), b([&] { auto d = c; d.rank = 1; return d; }());
  const std::vector<std::vector<std::uint8_t>> handles = {a.export_handle(), b.export_handle()};
  REQUIRE(a.open_peers(handles).ok());
  REQUIRE(b.open_peers(handles).ok());
  // rank 1 never sends: rank 0's receive hook must give up after 0.5 s and say why
  void* x = nullptr;
  int* ids = nullptr;
  REQUIRE(cudaMalloc(&x, 8 * 256 * 2) == cudaSuccess);
  REQUIRE(cudaMalloc(reinterpret_cast<void**>(&ids), 8 * 2 * 4) == cudaSuccess);
  cudaMemset(x, 0, 8 * 256 * 2);
  cudaMemset(ids, 0xFF, 8 * 2 * 4); // all -1: nothing to send, only the signals
  REQUIRE(a.ll_dispatch_send(x, ids, 8).ok());
  REQUIRE(a.ll_dispatch_recv().ok());
  CHECK(cudaStreamSynchronize(a.stream()) == cudaSuccess);
  const std::string e = a.error();
  INFO(e);
  CHECK(e.find("timed out") != std::string::npos);
  CHECK(e.find("rank 1") != std::string::npos);
  // rank 1 catches up late: its receive finds rank 0's rows of that round and completes
  a.clear_error();
  REQUIRE(b.ll_dispatch_send(x, ids, 8).ok());
  REQUIRE(b.ll_dispatch_recv().ok());
  CHECK(cudaStreamSynchronize(b.stream()) == cudaSuccess);
  CHECK(b.error() == "");
  cudaFree(x);
  cudaFree(ids);
}

TEST_CASE("normal mode, 2 ranks as processes through CUDA IPC handles") {
  if (skip_without_gpu()) return;
  expect_check_passes("--ranks 2 --mode normal --tokens 512 --hidden 1024 --topk 8 --experts 64");
}

TEST_CASE("normal mode, 4 ranks as processes through CUDA IPC handles") {
  if (skip_without_gpu()) return;
  expect_check_passes("--ranks 4 --mode normal --tokens 384 --hidden 2048 --topk 8 --experts 64");
}

TEST_CASE("normal mode, 4 ranks as threads of one process") {
  if (skip_without_gpu()) return;
  expect_check_passes("--ranks 4 --launch threads --mode normal --tokens 1024 --hidden 7168 --topk 8 --experts 256");
}

TEST_CASE("low-latency mode, 2 ranks as processes, graph capture and replay") {
  if (skip_without_gpu()) return;
  expect_check_passes("--ranks 2 --mode low_latency --tokens 64 --hidden 1024 --topk 8 --experts 64");
}

TEST_CASE("low-latency mode, 4 ranks as processes, graph capture and replay") {
  if (skip_without_gpu()) return;
  expect_check_passes("--ranks 4 --mode low_latency --tokens 32 --hidden 2048 --topk 6 --experts 32");
}

TEST_CASE("low-latency mode, 2 and 4 ranks as threads of one process") {
  if (skip_without_gpu()) return;
  expect_check_passes("--ranks 2 --launch threads --mode low_latency --tokens 128 --hidden 7168 --topk 8 --experts 256");
  expect_check_passes("--ranks 4 --launch threads --mode low_latency --tokens 128 --hidden 7168 --topk 8 --experts 256");
}
#endif
