// The byte-level tokenizer and the streaming detokenizer: round trips, specials, and UTF-8 that is
// never split across streamed chunks.
#include <doctest/doctest.h>

#include "runtime/tokenizer.hpp"

using namespace petrel;

TEST_CASE("byte tokenizer round trips text and handles BOS/EOS") {
  byte_tokenizer tok;
  const std::string text = "Hello, w\xC3\xB6rld \xE2\x82\xAC \xF0\x9F\x98\x80!"; // ö € 😀
  auto ids = tok.encode(text);
  CHECK(ids.size() == text.size());
  CHECK(ids[0] == 'H');
  CHECK(tok.decode(ids) == text);

  auto with_bos = tok.encode("ab", true);
  REQUIRE(with_bos.size() == 3);
  CHECK(with_bos[0] == byte_tokenizer::bos_id);
  with_bos.push_back(byte_tokenizer::eos_id);
  CHECK(tok.decode(with_bos) == "ab"); // specials are skipped
  CHECK(byte_tokenizer::vocab_size == 258);
  CHECK(byte_tokenizer::in_vocab(257));
  CHECK_FALSE(byte_tokenizer::in_vocab(258));
  CHECK_FALSE(byte_tokenizer::in_vocab(-1));
}

TEST_CASE("decode replaces invalid UTF-8 with U+FFFD") {
  byte_tokenizer tok;
  const std::string fffd = "\xEF\xBF\xBD";
  CHECK(tok.decode(std::vector<int32_t>{'a', 0xFF, 'b'}) == "a" + fffd + "b");
  CHECK(tok.decode(std::vector<int32_t>{0x80}) == fffd);              // stray continuation
  CHECK(tok.decode(std::vector<int32_t>{0xC0, 0xAF}) == fffd + fffd); // overlong lead: two subparts
  CHECK(tok.decode(std::vector<int32_t>{0xE2, 0x82, 'x'}) == fffd + "x"); // truncated 3-byte: one U+FFFD
  CHECK(tok.decode(std::vector<int32_t>{0xED, 0xA0, 0x80}) == fffd + fffd + fffd); // surrogate
  CHECK(tok.decode(std::vector<int32_t>{0xF0, 0x9F, 0x98}) == fffd); // cut off at the end
  CHECK(sanitize_utf8("ok") == "ok");
}

TEST_CASE("incremental detokenizer never splits a multi-byte sequence") {
  byte_tokenizer tok;
  const std::string text = "a\xC3\xB6\xE2\x82\xAC\xF0\x9F\x98\x80z"; // a ö € 😀 z
  auto ids = tok.encode(text, true);
  ids.push_back(byte_tokenizer::eos_id);
  incremental_detokenizer detok;
  std::vector<std::string> chunks;
  for (int32_t id : ids) chunks.push_back(detok.push(id));
  chunks.push_back(detok.flush());
  std::string joined;
  for (auto& c : chunks) {
    joined += c;
    CHECK(sanitize_utf8(c) == c); // every chunk is complete, valid UTF-8 on its own
  }
  CHECK(joined == text);
  // ids: BOS a C3 B6 E2 82 AC F0 9F 98 80 z EOS
  CHECK(chunks[0].empty());
  CHECK(chunks[1] == "a");
  CHECK(chunks[2].empty()); // C3 held back
  CHECK(chunks[3] == "\xC3\xB6");
  CHECK(chunks[4].empty());
  CHECK(chunks[5].empty());
  CHECK(chunks[6] == "\xE2\x82\xAC");
  CHECK(chunks[9].empty());
  CHECK(chunks[10] == "\xF0\x9F\x98\x80");
  CHECK(chunks[11] == "z");

  // A held-back tail that never completes becomes U+FFFD on flush; a broken one at once.
  incremental_detokenizer d2;
  CHECK(d2.push(0xE2).empty());
  CHECK(d2.pending_bytes() == 1);
  CHECK(d2.push(0x82).empty());
  CHECK(d2.flush() == "\xEF\xBF\xBD");
  CHECK(d2.pending_bytes() == 0);
  CHECK(d2.push(0xE2).empty());
  CHECK(d2.push('q') == "\xEF\xBF\xBDq");
}
