// libFuzzer target: transport::kv_pool_descriptor::from_bytes (the pool descriptor that travels inside
// kv_destination / rank_info), plus from_hex and coalesce_page_ranges, which take peer-supplied data too.
// Byte 0 picks the function. Errors are values here; a crash or a broken invariant is a finding.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "transport/kv_transfer.hpp"

namespace {
void fail(const char* what) {
  std::fprintf(stderr, "fuzz_kv_descriptor: invariant broken: %s\n", what);
  std::abort();
}
void write_file(const std::string& path, uint8_t sel, const std::vector<uint8_t>& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  std::fputc(sel, f);
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
}

// PETREL_FUZZ_WRITE_SEEDS=DIR: write valid inputs for each mode into DIR and exit.
void write_seeds(const std::string& dir) {
  using namespace petrel::transport;
  kv_pool_descriptor d;
  // A worker address as an engine publishes it: "PKVA", version 2, reserved, engine id, process token,
  // u32-length-prefixed raw UCX address, FNV-1a of everything before (all little endian).
  std::vector<uint8_t> a;
  auto put = [](std::vector<uint8_t>& v, uint64_t x, int n) { for (int i = 0; i < n; ++i) v.push_back(uint8_t(x >> (8 * i))); };
  put(a, 0x41564B50, 4);
  put(a, 2, 2);
  put(a, 0, 2);
  put(a, 3, 8);
  put(a, 0x1234567890abcdefULL, 8);
  put(a, 32, 4);
  for (int i = 0; i < 32; ++i) a.push_back(uint8_t(i * 7));
  uint64_t h = 0xcbf29ce484222325ull;
  for (uint8_t b : a) { h ^= b; h *= 0x100000001b3ull; }
  put(a, h, 8);
  d.worker_address = a;
  d.remote_base = 0x7f0000001000;
  d.size = 1 << 20;
  d.rkey = std::vector<uint8_t>(24, 0x11);
  d.engine_id = 3;
  d.pool_id = 1;
  d.process_token = 0x1234567890abcdefULL;
  d.seal();
  if (!d.validate()) std::abort();
  write_file(dir + "/descriptor", 0, d.to_bytes());
  // A GPU pool: the UCX fields name its pinned host mirror, the others the device pool and its IPC handle.
  kv_pool_descriptor g = d;
  g.pool_id = 2;
  g.memory = 1;
  g.device_base = 0x7f1000000000;
  g.device = 0;
  g.ipc_handle = std::vector<uint8_t>(64, 0x5a);
  g.host_id = 0xfeedfacecafef00dULL;
  g.staging = 1;
  g.seal();
  if (!g.validate()) std::abort();
  write_file(dir + "/descriptor_gpu", 0, g.to_bytes());
  auto hex = to_hex(d.to_bytes());
  write_file(dir + "/hex", 1, std::vector<uint8_t>(hex.begin(), hex.end()));
  std::vector<uint8_t> ranges;
  for (uint64_t i : {0, 1, 3, 2}) {
    put(ranges, i * 4096, 8);
    put(ranges, i * 4096 + 65536, 8);
    put(ranges, 4096, 8);
  }
  write_file(dir + "/ranges", 2, ranges);
}
} // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("PETREL_FUZZ_WRITE_SEEDS")) {
    write_seeds(dir);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace petrel::transport;
  if (size < 1) return 0;
  const uint8_t sel = data[0] % 3;
  std::vector<uint8_t> bytes(data + 1, data + size);
  if (sel == 0) {
    auto d = kv_pool_descriptor::from_bytes(bytes);
    if (!d) return 0;
    if (!d.value().validate()) fail("from_bytes accepted a descriptor that validate() rejects");
    // from_bytes ignores the 16-bit reserved field after the version (bytes 6-7); to_bytes writes 0 there.
    std::vector<uint8_t> expect = bytes;
    expect[6] = expect[7] = 0;
    if (d.value().to_bytes() != expect) fail("to_bytes(from_bytes(b)) differs from b beyond the reserved field");
  } else if (sel == 1) {
    std::string text(bytes.begin(), bytes.end());
    auto b = from_hex(text);
    if (b && to_hex(b.value()).size() != text.size()) fail("hex round trip changed the length");
  } else {
    std::vector<kv_page_range> ranges;
    for (size_t i = 0; i + 24 <= bytes.size() && ranges.size() < 64; i += 24) {
      kv_page_range r;
      std::memcpy(&r.src_offset, &bytes[i], 8);
      std::memcpy(&r.dst_offset, &bytes[i + 8], 8);
      std::memcpy(&r.length, &bytes[i + 16], 8);
      ranges.push_back(r);
    }
    uint64_t total = 0;
    for (auto& r : ranges) total += r.length;
    auto out = coalesce_page_ranges(ranges);
    if (!out) return 0;
    uint64_t total2 = 0;
    for (size_t i = 0; i < out.value().size(); ++i) {
      const auto& r = out.value()[i];
      if (r.length == 0) fail("empty range in the output");
      total2 += r.length;
      if (i > 0) {
        const auto& p = out.value()[i - 1];
        if (p.dst_offset + p.length > r.dst_offset) fail("output ranges overlap or are unsorted");
      }
    }
    if (total != total2) fail("coalescing changed the byte count");
  }
  return 0;
}
