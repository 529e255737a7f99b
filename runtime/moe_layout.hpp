// Token layouts for the grouped expert GEMMs of one EP rank (host-side reference; the CUDA permute kernels
// must produce the same index arrays).
//
// Input: for each received token, its top_k physical expert slots (int32, [num_tokens x top_k] row-major;
// -1 = no expert). The rank owns slots [slot_begin, slot_begin + num_local); other slots are ignored.
// A "pair" is one (token, k) entry, numbered token * top_k + k.
//
// CONTIGUOUS layout (prefill, DeepGEMM "m_grouped ... contiguous"): rows grouped by local expert, each expert's
//   block padded to a multiple of `alignment` (128) rows; row_expert[row] = local expert or -1 for padding.
// MASKED layout (decode, "... masked"): a [num_local, max_m, hidden] buffer plus a count per expert; CUDA-graph
//   safe because its shape does not depend on routing. More than max_m pairs for one expert is an overflow,
//   reported in the layout and refused by the combine, never dropped silently.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace petrel::moe {

/// Row-block alignment the grouped GEMM needs (one 128-row M tile per expert block).
inline constexpr int k_grouped_gemm_alignment = 128;

// -- contiguous layout ---------------------------------------------------------------------

struct contiguous_layout {
  int num_tokens = 0, top_k = 0, num_local = 0, alignment = k_grouped_gemm_alignment;
  int num_rows = 0;                  // total rows, padding included (a multiple of alignment)
  std::vector<int32_t> expert_begin; // [num_local + 1]: first row of each expert's block; last = num_rows
  std::vector<int32_t> expert_count; // [num_local]: real (non-padding) rows of each expert
  std::vector<int32_t> row_expert;   // [num_rows]: local expert of the row, -1 for padding rows
  std::vector<int32_t> row_pair;     // [num_rows]: the pair (token*top_k+k) the row came from, -1 for padding
  std::vector<int32_t> pair_row;     // [num_tokens*top_k]: row of the pair, -1 when the slot is not local
};

/// Builds the layout; pairs of one expert keep their (token, k) order. Throws std::invalid_argument when
/// topk_slots.size() is not num_tokens*top_k or any argument is non-positive (num_tokens may be 0).
contiguous_layout build_contiguous_layout(std::span<const int32_t> topk_slots, int num_tokens, int top_k,
                                          int slot_begin, int num_local, int alignment = k_grouped_gemm_alignment);

/// x [num_tokens x hidden] -> rows [num_rows x hidden] (padding rows zeroed).
void permute_contiguous(const contiguous_layout& layout, std::span<const float> x, int hidden, std::span<float> rows);

/// Combine: out[t] = sum over local pairs (t,k) of weight[t*top_k+k] * rows[pair_row[t*top_k+k]].
/// Empty `weights` means weight 1. out is [num_tokens x hidden] and is overwritten.
void unpermute_contiguous(const contiguous_layout& layout, std::span<const float> rows, std::span<const float> weights,
                          int hidden, std::span<float> out);

// -- masked layout -------------------------------------------------------------------------

/// pair_slot value of a pair that belonged to a local expert but did not fit into max_m.
inline constexpr int32_t k_pair_overflowed = -2;

struct masked_layout {
  int num_tokens = 0, top_k = 0, num_local = 0, max_m = 0;
  std::vector<int32_t> count;      // [num_local]: rows filled per expert, min(wanted, max_m) (the kernel's mask)
  std::vector<int32_t> wanted;     // [num_local]: pairs routed to the expert, before clamping
  std::vector<int32_t> slot_pair;  // [num_local*max_m]: pair in buffer row e*max_m+m, -1 when empty
  std::vector<int32_t> pair_slot;  // [num_tokens*top_k]: buffer row of the pair, -1 not local, -2 overflowed
  int64_t overflow = 0;            // pairs that did not fit (sum of wanted - count)
  std::vector<int32_t> overflowed_experts; // local experts whose wanted > max_m

  bool overflowed() const { return overflow > 0; }
};

masked_layout build_masked_layout(std::span<const int32_t> topk_slots, int num_tokens, int top_k, int slot_begin,
                                  int num_local, int max_m);

/// x [num_tokens x hidden] -> buffer [num_local x max_m x hidden]; unused rows zeroed. Copies the pairs that fit.
void permute_masked(const masked_layout& layout, std::span<const float> x, int hidden, std::span<float> buffer);

/// Weighted combine like unpermute_contiguous. Throws std::runtime_error when the layout overflowed, since
/// some expert outputs were never computed.
void unpermute_masked(const masked_layout& layout, std::span<const float> buffer, std::span<const float> weights,
                      int hidden, std::span<float> out);

} // namespace petrel::moe
