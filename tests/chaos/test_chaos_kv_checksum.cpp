// The KV page checksum (CRC32C): known answers, and its speed, which docs/benchmarks.md reports
// ("KV page checksums"). Every shipped KV page is checksummed twice (sender and decode node).
#include <doctest/doctest.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "actors/kv_agent.hpp"

using petrel::kv_page_crc32c;

TEST_CASE("kv checksum: CRC32C known answers (RFC 3720 B.4 and the check value)") {
  const char* check = "123456789";
  CHECK(kv_page_crc32c(check, 9) == 0xE3069283u);
  std::vector<uint8_t> zeros(32, 0), ones(32, 0xff), inc(32), dec(32);
  std::iota(inc.begin(), inc.end(), uint8_t{0});
  for (int i = 0; i < 32; ++i)
    dec[i] = static_cast<uint8_t>(31 - i);
  CHECK(kv_page_crc32c(zeros.data(), 32) == 0x8A9136AAu);
  CHECK(kv_page_crc32c(ones.data(), 32) == 0x62A8AB43u);
  CHECK(kv_page_crc32c(inc.data(), 32) == 0x46DD794Eu);
  CHECK(kv_page_crc32c(dec.data(), 32) == 0x113FDB5Cu);
  // Continuing from a partial CRC equals one pass; odd lengths take the byte tail.
  std::vector<uint8_t> buf(1001);
  std::mt19937 rng(7);
  for (auto& b : buf)
    b = static_cast<uint8_t>(rng());
  auto whole = kv_page_crc32c(buf.data(), buf.size());
  CHECK(kv_page_crc32c(buf.data() + 333, buf.size() - 333, kv_page_crc32c(buf.data(), 333)) == whole);
  // One flipped bit anywhere changes it.
  for (size_t at : {size_t(0), size_t(500), buf.size() - 1}) {
    buf[at] ^= 0x10;
    CHECK(kv_page_crc32c(buf.data(), buf.size()) != whole);
    buf[at] ^= 0x10;
  }
}

TEST_CASE("kv checksum: throughput over KV pages") {
  // Page sizes: the embedded model's page in the chaos cluster (16 tokens x 4 layers x (64 + 16)
  // fp32 = 20 KiB), and a DeepSeek-V3 page (64 tokens x 61 layers x 576 bf16 = 4.5 MB).
  for (size_t page : {size_t(16) * 4 * 80 * 4, size_t(64) * 61 * 576 * 2}) {
    size_t total = size_t(256) << 20;
    size_t pages = std::max<size_t>(1, total / page);
    std::vector<uint8_t> pool(pages * page);
    std::mt19937_64 rng(1);
    for (size_t i = 0; i + 8 <= pool.size(); i += 8) {
      uint64_t v = rng();
      std::memcpy(pool.data() + i, &v, 8);
    }
    uint32_t sink = 0;
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
      for (size_t p = 0; p < pages; ++p)
        sink ^= kv_page_crc32c(pool.data() + p * page, page);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    double gbs = static_cast<double>(pool.size()) / best / 1e9;
    // The same bytes copied page by page (read + write), for a ratio on this machine.
    std::vector<uint8_t> copy(page);
    double best_copy = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
      for (size_t p = 0; p < pages; ++p) {
        std::memcpy(copy.data(), pool.data() + p * page, page);
        sink ^= copy[p % page];
      }
      best_copy = std::min(best_copy, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    double copy_gbs = static_cast<double>(pool.size()) / best_copy / 1e9;
    std::printf("kv checksum: CRC32C over %zu pages of %zu bytes: %.2f GB/s; memcpy of the same pages %.2f GB/s "
                "(ratio %.2f; best of 5; sink %08x)\n",
                pages, page, gbs, copy_gbs, gbs / copy_gbs, sink);
    CHECK(gbs > 0.1);
  }
}
