#include "runtime/moe_layout.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace petrel::moe {
namespace {

void check_common(std::span<const int32_t> topk_slots, int num_tokens, int top_k, int num_local, const char* what) {
  if (num_tokens < 0 || top_k <= 0 || num_local <= 0)
    throw std::invalid_argument(std::string(what) + ": need num_tokens >= 0, top_k > 0, num_local > 0");
  if (topk_slots.size() != static_cast<size_t>(num_tokens) * top_k)
    throw std::invalid_argument(std::string(what) + ": topk_slots has " + std::to_string(topk_slots.size()) +
                                " entries, expected num_tokens*top_k = " +
                                std::to_string(static_cast<size_t>(num_tokens) * top_k));
}

void check_size(std::span<const float> s, size_t want, const char* what) {
  if (s.size() != want)
    throw std::invalid_argument(std::string(what) + " has " + std::to_string(s.size()) + " floats, expected " +
                                std::to_string(want));
}

inline int local_of(int32_t slot, int slot_begin, int num_local) {
  const int e = slot - slot_begin;
  return (slot >= 0 && e >= 0 && e < num_local) ? e : -1;
}

// out[t] = sum_k w * src[row(t,k)], shared by both combines.
void combine(std::span<const int32_t> pair_row, int num_tokens, int top_k, std::span<const float> src,
             std::span<const float> weights, int hidden, std::span<float> out) {
  if (!weights.empty()) check_size(weights, static_cast<size_t>(num_tokens) * top_k, "weights");
  check_size(out, static_cast<size_t>(num_tokens) * hidden, "out");
  std::fill(out.begin(), out.end(), 0.0f);
  for (int t = 0; t < num_tokens; ++t) {
    float* o = &out[static_cast<size_t>(t) * hidden];
    for (int k = 0; k < top_k; ++k) {
      const int p = t * top_k + k;
      const int32_t row = pair_row[p];
      if (row < 0) continue;
      const float w = weights.empty() ? 1.0f : weights[p];
      const float* r = &src[static_cast<size_t>(row) * hidden];
      for (int h = 0; h < hidden; ++h) o[h] += w * r[h];
    }
  }
}

} // namespace

// -- contiguous -------------------------------------------------------------------------------

contiguous_layout build_contiguous_layout(std::span<const int32_t> topk_slots, int num_tokens, int top_k,
                                          int slot_begin, int num_local, int alignment) {
  check_common(topk_slots, num_tokens, top_k, num_local, "build_contiguous_layout");
  if (alignment <= 0) throw std::invalid_argument("build_contiguous_layout: alignment must be positive");
  contiguous_layout L;
  L.num_tokens = num_tokens;
  L.top_k = top_k;
  L.num_local = num_local;
  L.alignment = alignment;
  L.expert_count.assign(num_local, 0);
  for (int32_t s : topk_slots)
    if (int e = local_of(s, slot_begin, num_local); e >= 0) ++L.expert_count[e];
  L.expert_begin.assign(num_local + 1, 0);
  for (int e = 0; e < num_local; ++e) {
    const int padded = (L.expert_count[e] + alignment - 1) / alignment * alignment;
    L.expert_begin[e + 1] = L.expert_begin[e] + padded;
  }
  L.num_rows = L.expert_begin[num_local];
  L.row_expert.assign(L.num_rows, -1);
  L.row_pair.assign(L.num_rows, -1);
  L.pair_row.assign(topk_slots.size(), -1);
  std::vector<int32_t> fill(L.expert_begin.begin(), L.expert_begin.end() - 1);
  for (size_t p = 0; p < topk_slots.size(); ++p) {
    const int e = local_of(topk_slots[p], slot_begin, num_local);
    if (e < 0) continue;
    const int row = fill[e]++;
    L.row_expert[row] = e;
    L.row_pair[row] = static_cast<int32_t>(p);
    L.pair_row[p] = row;
  }
  return L;
}

void permute_contiguous(const contiguous_layout& L, std::span<const float> x, int hidden, std::span<float> rows) {
  check_size(x, static_cast<size_t>(L.num_tokens) * hidden, "x");
  check_size(rows, static_cast<size_t>(L.num_rows) * hidden, "rows");
  for (int row = 0; row < L.num_rows; ++row) {
    float* dst = &rows[static_cast<size_t>(row) * hidden];
    const int32_t p = L.row_pair[row];
    if (p < 0) {
      std::fill(dst, dst + hidden, 0.0f);
      continue;
    }
    const float* src = &x[static_cast<size_t>(p / L.top_k) * hidden];
    std::copy(src, src + hidden, dst);
  }
}

void unpermute_contiguous(const contiguous_layout& L, std::span<const float> rows, std::span<const float> weights,
                          int hidden, std::span<float> out) {
  check_size(rows, static_cast<size_t>(L.num_rows) * hidden, "rows");
  combine(L.pair_row, L.num_tokens, L.top_k, rows, weights, hidden, out);
}

// -- masked -----------------------------------------------------------------------------------

masked_layout build_masked_layout(std::span<const int32_t> topk_slots, int num_tokens, int top_k, int slot_begin,
                                  int num_local, int max_m) {
  check_common(topk_slots, num_tokens, top_k, num_local, "build_masked_layout");
  if (max_m <= 0) throw std::invalid_argument("build_masked_layout: max_m must be positive");
  masked_layout L;
  L.num_tokens = num_tokens;
  L.top_k = top_k;
  L.num_local = num_local;
  L.max_m = max_m;
  L.count.assign(num_local, 0);
  L.wanted.assign(num_local, 0);
  L.slot_pair.assign(static_cast<size_t>(num_local) * max_m, -1);
  L.pair_slot.assign(topk_slots.size(), -1);
  for (size_t p = 0; p < topk_slots.size(); ++p) {
    const int e = local_of(topk_slots[p], slot_begin, num_local);
    if (e < 0) continue;
    ++L.wanted[e];
    if (L.count[e] >= max_m) {
      L.pair_slot[p] = k_pair_overflowed;
      ++L.overflow;
      continue;
    }
    const int row = e * max_m + L.count[e]++;
    L.slot_pair[row] = static_cast<int32_t>(p);
    L.pair_slot[p] = row;
  }
  for (int e = 0; e < num_local; ++e)
    if (L.wanted[e] > max_m) L.overflowed_experts.push_back(e);
  return L;
}

void permute_masked(const masked_layout& L, std::span<const float> x, int hidden, std::span<float> buffer) {
  check_size(x, static_cast<size_t>(L.num_tokens) * hidden, "x");
  check_size(buffer, static_cast<size_t>(L.num_local) * L.max_m * hidden, "buffer");
  for (size_t row = 0; row < L.slot_pair.size(); ++row) {
    float* dst = &buffer[row * hidden];
    const int32_t p = L.slot_pair[row];
    if (p < 0) {
      std::fill(dst, dst + hidden, 0.0f);
      continue;
    }
    const float* src = &x[static_cast<size_t>(p / L.top_k) * hidden];
    std::copy(src, src + hidden, dst);
  }
}

void unpermute_masked(const masked_layout& L, std::span<const float> buffer, std::span<const float> weights,
                      int hidden, std::span<float> out) {
  if (L.overflowed())
    throw std::runtime_error("unpermute_masked: " + std::to_string(L.overflow) + " routed pairs exceeded max_m = " +
                             std::to_string(L.max_m) + " (first overflowing local expert " +
                             std::to_string(L.overflowed_experts.front()) + "); raise max_m or re-dispatch");
  check_size(buffer, static_cast<size_t>(L.num_local) * L.max_m * hidden, "buffer");
  combine(L.pair_slot, L.num_tokens, L.top_k, buffer, weights, hidden, out);
}

} // namespace petrel::moe
