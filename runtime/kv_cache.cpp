#include "runtime/kv_cache.hpp"

#include <stdexcept>
#include <string>

namespace petrel {

kv_page_allocator::kv_page_allocator(int32_t num_pages) : num_pages_(num_pages), used_(size_t(num_pages), 0) {
  if (num_pages < 0) throw std::invalid_argument("kv_page_allocator: negative page count");
  free_list_.reserve(size_t(num_pages));
  for (int32_t p = num_pages - 1; p >= 0; --p) free_list_.push_back(p);
}

std::optional<std::vector<int32_t>> kv_page_allocator::allocate(int32_t n) {
  std::lock_guard lock(mu_);
  if (n < 0 || size_t(n) > free_list_.size()) return std::nullopt;
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) {
    out[size_t(i)] = free_list_.back();
    free_list_.pop_back();
    used_[size_t(out[size_t(i)])] = 1;
  }
  return out;
}

void kv_page_allocator::free(std::span<const int32_t> pages) {
  std::lock_guard lock(mu_);
  // Mark first (2 = being freed) so that a bad or repeated page leaves the allocator untouched.
  for (size_t i = 0; i < pages.size(); ++i) {
    int32_t p = pages[i];
    if (p < 0 || p >= num_pages_ || used_[size_t(p)] != 1) {
      for (size_t j = 0; j < i; ++j) used_[size_t(pages[j])] = 1;
      throw std::invalid_argument("kv_page_allocator: page " + std::to_string(p) + " is not allocated (pool of " +
                                  std::to_string(num_pages_) + " pages)");
    }
    used_[size_t(p)] = 2;
  }
  for (int32_t p : pages) {
    used_[size_t(p)] = 0;
    free_list_.push_back(p);
  }
}

int32_t kv_page_allocator::free_count() const {
  std::lock_guard lock(mu_);
  return int32_t(free_list_.size());
}

bool kv_page_allocator::in_use(int32_t page) const {
  std::lock_guard lock(mu_);
  return page >= 0 && page < num_pages_ && used_[size_t(page)];
}

size_t kv_pool::page_bytes(const model_config& cfg, int32_t page_size) {
  return size_t(cfg.num_hidden_layers) * size_t(page_size) * size_t(cfg.kv_entry_floats()) * sizeof(float);
}

kv_pool::kv_pool(backend& be, const model_config& cfg, int32_t num_pages, int32_t page_size)
    : allocator_(num_pages) {
  if (page_size <= 0) throw std::invalid_argument("kv_pool: page_size must be positive");
  if (num_pages <= 0) throw std::invalid_argument("kv_pool: num_pages must be positive");
  bytes_per_page_ = page_bytes(cfg, page_size);
  buffer_ = be.allocate(bytes_per_page_ * size_t(num_pages));
  geometry_.base = buffer_.f32();
  geometry_.num_layers = int32_t(cfg.num_hidden_layers);
  geometry_.page_size = page_size;
  geometry_.entry_floats = int32_t(cfg.kv_entry_floats());
  geometry_.num_pages = num_pages;
}

bool kv_pool::reserve(kv_page_table& table, int64_t tokens) {
  int32_t need = pages_for_tokens(tokens, page_size()) - int32_t(table.pages.size());
  if (need <= 0) return true;
  auto got = allocator_.allocate(need);
  if (!got) return false;
  table.pages.insert(table.pages.end(), got->begin(), got->end());
  return true;
}

void kv_pool::release(kv_page_table& table) {
  allocator_.free(table.pages);
  table.pages.clear();
  table.num_tokens = 0;
}

} // namespace petrel
