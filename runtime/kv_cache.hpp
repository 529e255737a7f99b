// The paged latent KV cache of MLA.
//
// ONE contiguous backend buffer, page-major: page p holds every layer for page_size tokens,
//   page p = [layer][slot][kv_lora_rank + qk_rope_head_dim] floats (RMSNorm(c_kv), then roped k_pe).
// So a request's KV is exactly its pages, each one contiguous range of bytes_per_page() bytes at
// base() + p * bytes_per_page(): shipping KV between ranks = copying whole pages.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "runtime/backend.hpp"
#include "runtime/model_config.hpp"

namespace petrel {

/// Hands out page indices of one pool. All-or-nothing allocation; thread-safe.
class kv_page_allocator {
public:
  explicit kv_page_allocator(int32_t num_pages);

  /// n free pages (lowest indices first), or nullopt (and nothing taken) when fewer than n are free.
  std::optional<std::vector<int32_t>> allocate(int32_t n);
  /// Returns pages to the pool. Throws std::invalid_argument on an out-of-range or already-free page
  /// (and then frees none of them).
  void free(std::span<const int32_t> pages);
  int32_t free_count() const;
  int32_t num_pages() const { return num_pages_; }
  bool in_use(int32_t page) const;

private:
  mutable std::mutex mu_;
  int32_t num_pages_;
  std::vector<int32_t> free_list_; // stack; back() is handed out next
  std::vector<uint8_t> used_;
};

/// One sequence's pages, in token order: token t lives in pages[t / page_size], slot t % page_size.
struct kv_page_table {
  std::vector<int32_t> pages;
  int64_t num_tokens = 0; // tokens whose KV has been written

  int64_t capacity(int32_t page_size) const { return int64_t(pages.size()) * page_size; }
};

/// Pages needed for `tokens` tokens.
inline int32_t pages_for_tokens(int64_t tokens, int32_t page_size) {
  return int32_t((tokens + page_size - 1) / page_size);
}

class kv_pool {
public:
  /// num_pages pages of page_size tokens for every layer of `cfg`, allocated on `be` and zeroed.
  kv_pool(backend& be, const model_config& cfg, int32_t num_pages, int32_t page_size = 64);

  /// Bytes one page takes for `cfg` (to size a pool from a memory budget).
  static size_t page_bytes(const model_config& cfg, int32_t page_size);

  void* base() const { return buffer_.data(); }
  size_t total_bytes() const { return bytes_per_page_ * size_t(geometry_.num_pages); }
  size_t bytes_per_page() const { return bytes_per_page_; }
  int32_t page_size() const { return geometry_.page_size; }
  int32_t num_pages() const { return geometry_.num_pages; }
  /// Backend pointer to page p (all layers).
  void* page_ptr(int32_t p) const { return static_cast<char*>(buffer_.data()) + size_t(p) * bytes_per_page_; }
  const kv_pool_geometry& geometry() const { return geometry_; }
  kv_page_allocator& allocator() { return allocator_; }

  /// Grows `table` to hold `tokens` tokens; false (table unchanged) when the pool has too few free pages.
  bool reserve(kv_page_table& table, int64_t tokens);
  /// Frees every page of `table` and empties it (request end or abort).
  void release(kv_page_table& table);

private:
  device_buffer buffer_;
  kv_pool_geometry geometry_;
  size_t bytes_per_page_ = 0;
  kv_page_allocator allocator_;
};

} // namespace petrel
