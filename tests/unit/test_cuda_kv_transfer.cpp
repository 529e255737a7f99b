// KV transfer between GPU pools (transport/kv_transfer + kernels/device_memory): the CUDA IPC path between two
// processes, the staged path (pinned host mirrors + UCX), mixed host/GPU pools, and the in-process copy.
// Compiles everywhere; without CUDA or without a GPU every case reports the skip and passes that check only.
#include <doctest/doctest.h>

#ifdef PETREL_HAVE_CUDA
#include <chrono>
#include <condition_variable>
#include <random>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "actors/kv_agent.hpp"
#include "kernels/device_memory.hpp"
#include "tests/support/cuda_test_util.hpp"
#include "tests/support/process.hpp"
#include "transport/kv_transfer.hpp"

namespace {

using namespace petrel::transport;
namespace dm = petrel::device_memory;
using petrel::test::gpu_available;

/// `petrel bench-kv --memory cuda ...` as JSON; REQUIREs success (the tool checks every destination byte).
nlohmann::json bench_kv(const std::string& args) {
  auto r = petrel::test::run_petrel("bench-kv --memory cuda --pages 16 --page-bytes 65536 --transfers 12 --repeat 1 "
                                    "--inflight 4 --json " +
                                    args);
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  auto j = nlohmann::json::parse(r.output.substr(r.output.find('{')));
  CHECK(j["verified"] == true);
  return j;
}

/// A pool on the GPU or in host memory, with a byte pattern or zeros.
struct test_pool {
  bool gpu;
  size_t bytes;
  std::vector<uint8_t> host;
  void* dev = nullptr;
  test_pool(bool on_gpu, size_t n, uint8_t seed) : gpu(on_gpu), bytes(n), host(n) {
    for (size_t i = 0; i < n; ++i)
      host[i] = seed ? uint8_t(i * 29 + seed) : 0;
    if (gpu) {
      dev = dm::alloc_device(n, 0);
      dm::copy(dev, host.data(), n);
    }
  }
  ~test_pool() { dm::free_device(dev); }
  void* data() { return gpu ? dev : host.data(); }
  std::vector<uint8_t> read() {
    if (!gpu)
      return host;
    std::vector<uint8_t> out(bytes);
    dm::copy(out.data(), dev, bytes);
    return out;
  }
};

/// Moves pages 1 and 3 of `src` to pages 2 and 0 of `dst` between two engines of this process over UCX
/// (no memcpy shortcut), and checks every byte of the destination.
void move_pages(bool src_gpu, bool dst_gpu, bool allow_ipc, bool mirror = true) {
  const size_t page = 8192, pages = 4;
  kv_transfer_options o;
  o.allow_local_copy = false;
  o.allow_cuda_ipc = allow_ipc;
  o.gpu_host_mirror = mirror;
  o.net_devices = "lo";
  auto a = kv_transfer_engine::create(o);
  auto b = kv_transfer_engine::create(o);
  REQUIRE(a);
  REQUIRE(b);
  test_pool src(src_gpu, page * pages, 7), dst(dst_gpu, page * pages, 0);
  auto sd = (*a)->register_pool(src.data(), src.bytes);
  auto dd = (*b)->register_pool(dst.data(), dst.bytes);
  REQUIRE_MESSAGE(sd, sd.error());
  REQUIRE_MESSAGE(dd, dd.error());
  CHECK(dd->on_device() == dst_gpu);
  CHECK(sd->on_device() == src_gpu);
  // The descriptor survives its byte form with the GPU fields.
  auto round = kv_pool_descriptor::from_bytes(dd->to_bytes());
  REQUIRE(round);
  CHECK(round->device_base == dd->device_base);
  CHECK(round->ipc_handle == dd->ipc_handle);
  auto peer = (*a)->connect(dd->worker_address);
  REQUIRE(peer);
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  kv_transfer_result result;
  (*a)->transfer(*peer, sd->pool_id, *dd, {{1 * page, 2 * page, page}, {3 * page, 0, page}}, 42, 1,
                 [&](const kv_transfer_result& r) {
                   std::lock_guard<std::mutex> lock(m);
                   result = r;
                   done = true;
                   cv.notify_all();
                 });
  std::unique_lock<std::mutex> lock(m);
  REQUIRE(cv.wait_for(lock, std::chrono::seconds(20), [&] { return done; }));
  if (!mirror) {
    // No host mirror and no IPC (one process): refused before any byte moves, saying what to set.
    CHECK(result.status == kv_transfer_status::bad_descriptor);
    CHECK_MESSAGE(result.error.find("no host staging mirror") != std::string::npos, result.error);
    CHECK(dst.read() == std::vector<uint8_t>(page * pages, 0));
    return;
  }
  REQUIRE_MESSAGE(result.ok(), result.error);
  // One process: CUDA refuses to open its own IPC handles, so GPU pools here are always staged.
  CHECK(result.staged == (src_gpu || dst_gpu));
  CHECK_FALSE(result.cuda_ipc);
  std::vector<uint8_t> want(page * pages, 0);
  std::memcpy(want.data() + 2 * page, src.host.data() + 1 * page, page);
  std::memcpy(want.data() + 0, src.host.data() + 3 * page, page);
  CHECK(dst.read() == want); // the pages moved, the rest of the pool untouched
  if (src_gpu || dst_gpu)
    CHECK((*a)->counters().staged_bytes + (*b)->counters().staged_bytes >= 2 * page);
}

} // namespace

TEST_CASE("GPU pools: staged transfers GPU->GPU, GPU->host and host->GPU land every byte") {
  if (!gpu_available()) {
    MESSAGE("skipped: no GPU");
    return;
  }
  SUBCASE("gpu to gpu") { move_pages(true, true, false); }
  SUBCASE("gpu to gpu, IPC allowed (same process: falls back to staging)") { move_pages(true, true, true); }
  SUBCASE("gpu to host") { move_pages(true, false, true); }
  SUBCASE("host to gpu") { move_pages(false, true, true); }
  SUBCASE("gpu to gpu without host mirrors or IPC: refused") { move_pages(true, true, true, false); }
}

TEST_CASE("GPU pools: two processes copy through CUDA IPC, or stage when told to") {
  if (!gpu_available()) {
    MESSAGE("skipped: no GPU");
    return;
  }
  auto ipc = bench_kv("--mode process");
  CHECK(ipc["cuda_ipc_copies"].get<uint64_t>() > 0);
  CHECK(ipc["staged_bytes"].get<uint64_t>() == 0);
  auto staged = bench_kv("--mode process --gpu-path staged");
  CHECK(staged["cuda_ipc_copies"].get<uint64_t>() == 0);
  CHECK(staged["staged_bytes"].get<uint64_t>() > 0);
  auto ipc_only = bench_kv("--mode process --gpu-path ipc"); // no host mirrors pinned
  CHECK(ipc_only["cuda_ipc_copies"].get<uint64_t>() > 0);
  CHECK(ipc_only["staged_bytes"].get<uint64_t>() == 0);
  auto local = bench_kv("--mode memcpy");
  CHECK(local["local_copies"].get<uint64_t>() > 0);
  MESSAGE("RESULT kv GPU->GPU CUDA IPC " << ipc["gbps"].get<double>() << " GB/s, staged "
                                         << staged["gbps"].get<double>() << " GB/s, same-process "
                                         << local["gbps"].get<double>() << " GB/s (device copy "
                                         << ipc["memcpy_gbps"].get<double>() << " GB/s)");
}

TEST_CASE("GPU CRC32C of KV pages equals the host's kv_page_crc32c, and sees a flipped byte") {
  if (!gpu_available()) {
    MESSAGE("skipped: no GPU");
    return;
  }
  std::mt19937 rng(5);
  for (uint64_t page_bytes : {uint64_t(1024), uint64_t(73728), uint64_t(2359296)}) {
    CAPTURE(page_bytes);
    const int pages = 6;
    std::vector<uint8_t> host(page_bytes * pages);
    for (auto& b : host)
      b = uint8_t(rng());
    void* dev = dm::alloc_device(host.size(), 0);
    dm::copy(dev, host.data(), host.size());
    std::vector<int32_t> which{4, 0, 5, 2};
    auto crcs = dm::crc32c_pages(dev, which, page_bytes);
    REQUIRE(crcs.size() == which.size());
    for (size_t i = 0; i < which.size(); ++i)
      CHECK(crcs[i] == petrel::kv_page_crc32c(host.data() + uint64_t(which[i]) * page_bytes, page_bytes));
    // One flipped bit in page 5 changes its CRC and no other.
    uint8_t b = host[5 * page_bytes + page_bytes / 3] ^ 0x10;
    dm::copy(static_cast<uint8_t*>(dev) + 5 * page_bytes + page_bytes / 3, &b, 1);
    auto again = dm::crc32c_pages(dev, which, page_bytes);
    CHECK(again[0] == crcs[0]);
    CHECK(again[2] != crcs[2]);
    dm::free_device(dev);
  }
  CHECK_FALSE(dm::crc32c_on_device_fits(1000));
  CHECK_THROWS_AS(dm::crc32c_pages(nullptr, {0}, 1000), std::invalid_argument);
  // Throughput at a DeepSeek-V3-sized page (61 layers x 64 tokens x 576 x bf16 = 4.29 MiB), 64 pages.
  const uint64_t big = 4497408;
  void* dev = dm::alloc_device(big * 64, 0);
  std::vector<int32_t> all(64);
  for (int i = 0; i < 64; ++i)
    all[size_t(i)] = i;
  dm::crc32c_pages(dev, all, big);
  auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < 5; ++r)
    dm::crc32c_pages(dev, all, big);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 5;
  MESSAGE("RESULT GPU CRC32C " << (double(big) * 64 / s / 1e9) << " GB/s (64 pages x 4.29 MiB, host call included)");
  dm::free_device(dev);
}

TEST_CASE("GPU pools: a bad IPC handle is refused with a reason") {
  if (!gpu_available()) {
    MESSAGE("skipped: no GPU");
    return;
  }
  std::vector<uint8_t> garbage(64, 0xab);
  CHECK_THROWS_WITH_AS(dm::open_ipc(garbage, 0), doctest::Contains("cudaIpcOpenMemHandle"), std::runtime_error);
  CHECK_THROWS_WITH_AS(dm::open_ipc(std::vector<uint8_t>(3), 0), doctest::Contains("64 bytes"), std::runtime_error);
}
#else
TEST_CASE("GPU KV transfer: this build has no CUDA") { MESSAGE("skipped: built without CUDA"); }
#endif
