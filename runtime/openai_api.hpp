// The HTTP API's request and response bodies: OpenAI-compatible /v1/completions and
// /v1/chat/completions, and Petrel's native /generate. Parsing validates everything the engine relies
// on, so that a bad request gets a 4xx at the gateway and never reaches a scheduler. No HTTP and no
// CAF in here: the gateway actor feeds bodies in and takes bodies / SSE payloads out.
// docs/http-api.md is the reference for every field and rule.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "runtime/tokenizer.hpp"

namespace petrel {

// -- errors -------------------------------------------------------------------------

/// A request the API refuses, as a value: HTTP status plus the OpenAI error object.
struct api_error {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param; // empty renders as null
  std::string code;  // empty renders as null

  /// {"error":{"message":..,"type":..,"param":..|null,"code":..|null}}
  std::string to_json() const;

  /// 400 invalid_request_error naming the offending parameter.
  static api_error invalid(std::string param, std::string message, std::string code = "invalid_value");
  /// 503 for overload / no capacity (send Retry-After with it). type "server_error".
  static api_error unavailable(std::string message);
  /// 500 for an engine failure that is not the client's fault. type "server_error".
  static api_error internal(std::string message);
};

/// Either a value or an api_error.
template <class T>
class api_result {
public:
  api_result(T value) : v_(std::move(value)) {}
  api_result(api_error error) : v_(std::move(error)) {}
  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() { return std::get<0>(v_); }
  const T& value() const { return std::get<0>(v_); }
  const api_error& error() const { return std::get<1>(v_); }

private:
  std::variant<T, api_error> v_;
};

// -- requests -----------------------------------------------------------------------

enum class api_endpoint { completions, chat_completions, generate };

/// POST routes: "/v1/completions", "/v1/chat/completions", "/generate".
std::optional<api_endpoint> endpoint_for_path(std::string_view path);

/// What the parser checks requests against. The gateway fills it from cluster.yaml and the model.
struct api_limits {
  std::string served_model_name = "petrel";
  int context_length = 4096;                     // prompt + max_tokens must fit
  int vocab_size = byte_tokenizer::vocab_size;   // prompt / stop token ids must be below
  bool add_bos = true;                           // prepend BOS to text prompts and chat prompts
  int default_max_tokens = 16;                   // /v1/completions (OpenAI's default)
  int default_max_new_tokens = 128;              // /generate
  std::size_t max_stop_sequences = 16;
};

struct chat_message {
  std::string role; // system | user | assistant | tool | developer
  std::string content;
};

struct request_sampling {
  int max_tokens = 16;           // >= 1; prompt + max_tokens <= context_length
  double temperature = 1.0;      // [0, 2]; 0 means greedy
  double top_p = 1.0;            // (0, 1]
  int top_k = 0;                 // 0 = disabled (requests may send -1 or 0 for that); else >= 1
  std::optional<int64_t> seed;
  std::vector<std::string> stop; // stop strings (excluded from the output text)
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  double frequency_penalty = 0.0; // [-2, 2]; accepted, the sampler may ignore them
  double presence_penalty = 0.0;
  bool greedy() const { return temperature == 0.0 || top_k == 1; }
};

/// One validated request, whatever endpoint it came from.
struct generation_request {
  api_endpoint endpoint = api_endpoint::completions;
  std::string id;                 // "cmpl-…", "chatcmpl-…", or /generate's "rid" (else "gen-…")
  int64_t created = 0;            // unix seconds
  std::string model;              // the served model name
  std::string prompt_text;        // the text prompt or the rendered chat; empty for id prompts
  std::vector<int32_t> prompt_ids; // always set: exactly what the model sees
  std::vector<chat_message> messages; // chat only
  request_sampling sampling;
  bool stream = false;
  bool include_usage = false;     // stream_options.include_usage
  int n = 1;                      // only 1 is supported
};

/// Parses and validates a request body. Never throws.
api_result<generation_request> parse_generation_request(api_endpoint endpoint, std::string_view body,
                                                        const api_limits& limits);

/// The chat template of the embedded byte-level models, in one place:
///   for each message "<|ROLE|>\n" CONTENT "\n", then "<|assistant|>\n".
std::string apply_chat_template(std::span<const chat_message> messages);

// -- outputs --------------------------------------------------------------------------

enum class finish_reason { stop, length, abort };
std::string_view to_string(finish_reason r); // "stop" | "length" | "abort"

/// What one push() made visible.
struct output_delta {
  std::string text;                     // new text, valid UTF-8, never inside a stop string
  std::vector<int32_t> ids;             // the new token ids that were accepted
  std::optional<finish_reason> finished; // set on the delta that ends the request
};

/// Turns generated token ids into output text: incremental UTF-8-safe detokenizing, EOS and
/// stop_token_ids (unless ignore_eos for EOS), stop strings (text is held back while it may still
/// become a stop string, and the stop string itself is cut off), and max_tokens. One per request,
/// not thread-safe.
class output_assembler {
public:
  explicit output_assembler(const generation_request& req);

  /// Feeds generated ids; ids after the request finished are ignored.
  output_delta push(std::span<const int32_t> ids);
  output_delta push(int32_t id) { return push(std::span<const int32_t>(&id, 1)); }
  /// The engine ended the request (length, abort): flushes held-back text. No-op once finished.
  output_delta finish(finish_reason reason);

  bool finished() const { return reason_.has_value(); }
  std::optional<finish_reason> reason() const { return reason_; }
  const std::string& text() const { return emitted_; }       // all text emitted so far
  const std::vector<int32_t>& output_ids() const { return ids_; } // every accepted id, EOS included
  int prompt_tokens() const { return prompt_tokens_; }
  int completion_tokens() const { return static_cast<int>(ids_.size()); }
  const std::string& matched_stop() const { return matched_stop_; } // the stop string, if one
  std::optional<int32_t> matched_token() const { return matched_token_; } // EOS / stop token id

private:
  output_delta emit(std::vector<int32_t> ids);
  std::size_t stop_holdback() const;

  request_sampling sampling_;
  int prompt_tokens_ = 0;
  std::size_t max_stop_len_ = 0;
  incremental_detokenizer detok_;
  std::string pending_; // decoded but not yet emitted (may be the start of a stop string)
  std::string emitted_;
  std::vector<int32_t> ids_;
  std::optional<finish_reason> reason_;
  std::string matched_stop_;
  std::optional<int32_t> matched_token_;
};

/// Per-request response rendering for all three endpoints, streaming or not.
class response_builder {
public:
  explicit response_builder(generation_request req);

  const generation_request& request() const { return req_; }
  const output_assembler& output() const { return out_; }
  bool finished() const { return out_.finished(); }

  output_delta push(std::span<const int32_t> ids) { return out_.push(ids); }
  output_delta push(int32_t id) { return out_.push(id); }
  output_delta finish(finish_reason r) { return out_.finish(r); }

  /// SSE payloads (what follows "data: ") to send, in order, for this delta. Chat streams open
  /// with a role chunk; the delta that finishes the request adds the finish chunk, a usage chunk
  /// when stream_options.include_usage, and "[DONE]".
  std::vector<std::string> stream_events(const output_delta& delta);
  /// The opening events (chat: the role chunk) to send right after the stream begins; optional,
  /// stream_events() sends them itself when they were not sent yet.
  std::vector<std::string> stream_start();

  /// The non-streaming JSON body (call once finished()).
  std::string final_body() const;

private:
  generation_request req_;
  output_assembler out_;
  bool started_ = false;
};

/// GET /v1/models.
std::string render_models(const api_limits& limits, int64_t created);

/// Seconds since the Unix epoch (the "created" field).
int64_t unix_now();

} // namespace petrel
