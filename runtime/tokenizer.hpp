// The byte-level tokenizer of Petrel's embedded models: ids 0..255 are the bytes themselves, 256 is
// BOS and 257 is EOS (vocab 258). Real checkpoints bring their own tokenizer later; everything that
// touches text outside the model (the gateway, stop strings, streaming) goes through this header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace petrel {

/// Appends `in` to `out` as valid UTF-8, replacing each maximal invalid subpart with U+FFFD (the
/// Unicode "substitution of maximal subparts" practice). When `final` is false, an incomplete but so
/// far valid sequence at the very end is left unconsumed, so that the next call can complete it.
/// Returns how many bytes of `in` were consumed.
std::size_t append_sanitized_utf8(std::string_view in, std::string& out, bool final);

/// `in` as valid UTF-8 (invalid bytes and a truncated tail become U+FFFD).
std::string sanitize_utf8(std::string_view in);

class byte_tokenizer {
public:
  static constexpr int32_t bos_id = 256;
  static constexpr int32_t eos_id = 257;
  static constexpr int32_t vocab_size = 258;

  static bool is_special(int32_t id) { return id == bos_id || id == eos_id; }
  static bool in_vocab(int32_t id) { return id >= 0 && id < vocab_size; }

  /// One id per byte; BOS first when `add_bos`.
  std::vector<int32_t> encode(std::string_view text, bool add_bos = false) const;

  /// The bytes of the non-special ids as valid UTF-8 (specials and out-of-vocab ids are skipped,
  /// invalid byte sequences become U+FFFD).
  std::string decode(std::span<const int32_t> ids) const;
};

/// Turns a token stream into text chunks for streaming. A chunk never ends inside a UTF-8
/// multi-byte sequence: an incomplete tail is held back until the next token completes it (or
/// flush() gives up on it and emits U+FFFD). Concatenating every chunk equals decode(all ids).
/// Not thread-safe: one per request.
class incremental_detokenizer {
public:
  /// Text that is ready to emit after `id` (may be empty). Specials are skipped.
  std::string push(int32_t id);
  std::string push(std::span<const int32_t> ids);
  /// End of stream: whatever is held back, as U+FFFD.
  std::string flush();
  /// Bytes held back because they may start a multi-byte sequence.
  std::size_t pending_bytes() const { return pending_.size(); }

private:
  std::string drain(bool final);
  std::string pending_;
};

} // namespace petrel
