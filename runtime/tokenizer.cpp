#include "runtime/tokenizer.hpp"

namespace petrel {

namespace {

constexpr std::string_view replacement = "\xEF\xBF\xBD"; // U+FFFD

// The valid range of the second byte after a lead byte (Unicode Table 3-7); the later
// continuation bytes are always 0x80..0xBF.
struct lead_info {
  int length;          // 0: not a valid lead byte
  unsigned char lo, hi;
};

lead_info classify_lead(unsigned char b) {
  if (b < 0x80) return {1, 0, 0};
  if (b >= 0xC2 && b <= 0xDF) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) return {3, 0x80, 0xBF};
  if (b == 0xED) return {3, 0x80, 0x9F}; // no surrogates
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b >= 0xF1 && b <= 0xF3) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F}; // nothing above U+10FFFF
  return {0, 0, 0};
}

} // namespace

std::size_t append_sanitized_utf8(std::string_view in, std::string& out, bool final) {
  std::size_t i = 0;
  const std::size_t n = in.size();
  out.reserve(out.size() + n);
  while (i < n) {
    const auto b = static_cast<unsigned char>(in[i]);
    if (b < 0x80) { // fast path for ASCII runs
      std::size_t j = i + 1;
      while (j < n && static_cast<unsigned char>(in[j]) < 0x80) ++j;
      out.append(in.substr(i, j - i));
      i = j;
      continue;
    }
    const lead_info info = classify_lead(b);
    if (info.length == 0) { // stray continuation or never-valid byte
      out.append(replacement);
      ++i;
      continue;
    }
    // Walk the continuation bytes while they stay valid.
    std::size_t k = 1;
    bool broken = false;
    while (k < static_cast<std::size_t>(info.length)) {
      if (i + k >= n) break; // truncated by the end of the input
      const auto c = static_cast<unsigned char>(in[i + k]);
      const unsigned char lo = k == 1 ? info.lo : 0x80;
      const unsigned char hi = k == 1 ? info.hi : 0xBF;
      if (c < lo || c > hi) { broken = true; break; }
      ++k;
    }
    if (k == static_cast<std::size_t>(info.length)) {
      out.append(in.substr(i, k));
      i += k;
    } else if (broken) {
      out.append(replacement); // the maximal subpart i..i+k-1 becomes one U+FFFD
      i += k;
    } else { // valid so far, cut off by the end
      if (!final) return i;
      out.append(replacement);
      i = n;
    }
  }
  return i;
}

std::string sanitize_utf8(std::string_view in) {
  std::string out;
  append_sanitized_utf8(in, out, true);
  return out;
}

std::vector<int32_t> byte_tokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() + (add_bos ? 1 : 0));
  if (add_bos) ids.push_back(bos_id);
  for (char c : text) ids.push_back(static_cast<unsigned char>(c));
  return ids;
}

std::string byte_tokenizer::decode(std::span<const int32_t> ids) const {
  std::string bytes;
  bytes.reserve(ids.size());
  for (int32_t id : ids)
    if (id >= 0 && id < 256) bytes.push_back(static_cast<char>(id));
  return sanitize_utf8(bytes);
}

std::string incremental_detokenizer::push(int32_t id) {
  if (id < 0 || id >= 256) return {};
  pending_.push_back(static_cast<char>(id));
  return drain(false);
}

std::string incremental_detokenizer::push(std::span<const int32_t> ids) {
  for (int32_t id : ids)
    if (id >= 0 && id < 256) pending_.push_back(static_cast<char>(id));
  return drain(false);
}

std::string incremental_detokenizer::flush() { return drain(true); }

std::string incremental_detokenizer::drain(bool final) {
  std::string out;
  const std::size_t used = append_sanitized_utf8(pending_, out, final);
  pending_.erase(0, used);
  return out;
}

} // namespace petrel
