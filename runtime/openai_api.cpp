#include "runtime/openai_api.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>

#include <nlohmann/json.hpp>

namespace petrel {

using json = nlohmann::json;

namespace {

// Text we render is sanitized already; `replace` is a second line of defence so that a stray byte
// can never turn into an exception in a response path.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string random_hex(std::size_t n) {
  thread_local std::mt19937_64 rng{std::random_device{}() ^
                                   static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count())};
  static const char* digits = "0123456789abcdef";
  std::string s(n, '0');
  for (auto& c : s) c = digits[rng() & 15];
  return s;
}

std::string type_name(const json& v) {
  switch (v.type()) {
  case json::value_t::null: return "null";
  case json::value_t::boolean: return "a boolean";
  case json::value_t::string: return "a string";
  case json::value_t::array: return "an array";
  case json::value_t::object: return "an object";
  case json::value_t::number_float: return "a number";
  default: return "an integer";
  }
}

api_error wrong_type(const std::string& param, const char* expected, const json& got) {
  return api_error::invalid(param, "'" + param + "' must be " + expected + ", got " + type_name(got),
                            "invalid_type");
}

// Field readers: absent or null means "use the default" (OpenAI accepts null for optional fields);
// a present value of the wrong type is an error.
struct reader {
  const json& obj;
  std::string prefix; // "" or "sampling_params."
  std::optional<api_error> error;

  const json* find(const char* key) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return nullptr;
    return &*it;
  }
  std::string name(const char* key) const { return prefix + key; }

  std::optional<int64_t> integer(const char* key) {
    const json* v = find(key);
    if (!v || error) return std::nullopt;
    if (v->is_number_integer()) return v->get<int64_t>();
    if (v->is_number_unsigned()) {
      if (v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        error = api_error::invalid(name(key), "'" + name(key) + "' is too large");
        return std::nullopt;
      }
      return static_cast<int64_t>(v->get<uint64_t>());
    }
    // 16.0 is an integer written as a float; 16.5 is not.
    if (v->is_number_float()) {
      double d = v->get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) return static_cast<int64_t>(d);
    }
    error = wrong_type(name(key), "an integer", *v);
    return std::nullopt;
  }
  std::optional<double> number(const char* key) {
    const json* v = find(key);
    if (!v || error) return std::nullopt;
    if (v->is_number()) return v->get<double>();
    error = wrong_type(name(key), "a number", *v);
    return std::nullopt;
  }
  std::optional<bool> boolean(const char* key) {
    const json* v = find(key);
    if (!v || error) return std::nullopt;
    if (v->is_boolean()) return v->get<bool>();
    error = wrong_type(name(key), "a boolean", *v);
    return std::nullopt;
  }
  std::optional<std::string> string(const char* key) {
    const json* v = find(key);
    if (!v || error) return std::nullopt;
    if (v->is_string()) return v->get<std::string>();
    error = wrong_type(name(key), "a string", *v);
    return std::nullopt;
  }
};

std::string fmt_num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// Token ids from a JSON array, each checked against the vocabulary.
std::optional<api_error> read_token_ids(const json& arr, const std::string& param, int vocab_size,
                                        std::vector<int32_t>& out) {
  out.reserve(arr.size());
  for (std::size_t i = 0; i < arr.size(); ++i) {
    const json& t = arr[i];
    if (!t.is_number_integer() && !t.is_number_unsigned())
      return api_error::invalid(param, "'" + param + "' must contain integer token ids; element " +
                                           std::to_string(i) + " is " + type_name(t),
                                "invalid_type");
    int64_t id = t.is_number_unsigned() ? static_cast<int64_t>(std::min<uint64_t>(
                                              t.get<uint64_t>(), std::numeric_limits<int64_t>::max()))
                                        : t.get<int64_t>();
    if (id < 0 || id >= vocab_size)
      return api_error::invalid(param, "token id " + std::to_string(id) + " at " + param + "[" +
                                           std::to_string(i) + "] is outside the vocabulary [0, " +
                                           std::to_string(vocab_size) + ")");
    out.push_back(static_cast<int32_t>(id));
  }
  return std::nullopt;
}

// The sampling fields shared by every endpoint. `r.prefix` is "" for OpenAI, "sampling_params." for
// /generate. max_tokens is handled by the caller because its name and default differ.
std::optional<api_error> read_sampling(reader& r, const api_limits& limits, request_sampling& s) {
  if (auto t = r.number("temperature")) {
    if (!(*t >= 0.0 && *t <= 2.0))
      return api_error::invalid(r.name("temperature"),
                                "'" + r.name("temperature") + "' must be in [0, 2], got " + fmt_num(*t));
    s.temperature = *t;
  }
  if (auto p = r.number("top_p")) {
    if (!(*p > 0.0 && *p <= 1.0))
      return api_error::invalid(r.name("top_p"), "'" + r.name("top_p") + "' must be in (0, 1], got " + fmt_num(*p));
    s.top_p = *p;
  }
  if (auto k = r.integer("top_k")) {
    if (*k < -1)
      return api_error::invalid(r.name("top_k"), "'" + r.name("top_k") +
                                                     "' must be -1 or 0 (disabled) or a positive integer, got " +
                                                     std::to_string(*k));
    s.top_k = *k <= 0 ? 0 : static_cast<int>(std::min<int64_t>(*k, limits.vocab_size));
  }
  if (auto seed = r.integer("seed")) s.seed = *seed;
  for (const char* key : {"frequency_penalty", "presence_penalty"}) {
    if (auto v = r.number(key)) {
      if (!(*v >= -2.0 && *v <= 2.0))
        return api_error::invalid(r.name(key), "'" + r.name(key) + "' must be in [-2, 2], got " + fmt_num(*v));
      (std::string_view(key) == "frequency_penalty" ? s.frequency_penalty : s.presence_penalty) = *v;
    }
  }
  if (auto ie = r.boolean("ignore_eos")) s.ignore_eos = *ie;
  if (r.error) return r.error;

  if (const json* stop = r.find("stop")) {
    const std::string param = r.name("stop");
    if (stop->is_string()) {
      s.stop.push_back(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (const json& e : *stop) {
        if (!e.is_string()) return wrong_type(param, "a string or an array of strings", *stop);
        s.stop.push_back(e.get<std::string>());
      }
    } else {
      return wrong_type(param, "a string or an array of strings", *stop);
    }
    if (s.stop.size() > limits.max_stop_sequences)
      return api_error::invalid(param, "at most " + std::to_string(limits.max_stop_sequences) +
                                           " stop sequences are supported");
    for (auto& st : s.stop) {
      if (st.empty()) return api_error::invalid(param, "stop sequences must not be empty");
      if (sanitize_utf8(st) != st) return api_error::invalid(param, "stop sequences must be valid UTF-8");
    }
  }
  if (const json* ids = r.find("stop_token_ids")) {
    const std::string param = r.name("stop_token_ids");
    if (!ids->is_array()) return wrong_type(param, "an array of integers", *ids);
    if (auto err = read_token_ids(*ids, param, limits.vocab_size, s.stop_token_ids)) return err;
  }
  return std::nullopt;
}

// max_tokens: given values must fit the context; the default is clipped to what is left.
std::optional<api_error> resolve_max_tokens(std::optional<int64_t> given, const std::string& param,
                                            int default_value, const std::string& prompt_param,
                                            std::size_t prompt_len, const api_limits& limits,
                                            request_sampling& s) {
  const int64_t ctx = limits.context_length;
  if (static_cast<int64_t>(prompt_len) >= ctx)
    return api_error::invalid(prompt_param,
                              "This model's maximum context length is " + std::to_string(ctx) +
                                  " tokens, but the prompt has " + std::to_string(prompt_len) +
                                  " tokens, which leaves no room for output.",
                              "context_length_exceeded");
  const int64_t room = ctx - static_cast<int64_t>(prompt_len);
  if (given) {
    if (*given < 1)
      return api_error::invalid(param, "'" + param + "' must be at least 1, got " + std::to_string(*given));
    if (*given > room)
      return api_error::invalid(param,
                                "This model's maximum context length is " + std::to_string(ctx) +
                                    " tokens. However, you requested " +
                                    std::to_string(prompt_len + *given) + " tokens (" +
                                    std::to_string(prompt_len) + " in the prompt, " +
                                    std::to_string(*given) + " for the output).",
                                "context_length_exceeded");
    s.max_tokens = static_cast<int>(*given);
  } else {
    s.max_tokens = static_cast<int>(default_value <= 0 ? room : std::min<int64_t>(default_value, room));
  }
  return std::nullopt;
}

std::optional<api_error> read_model(reader& r, const api_limits& limits, generation_request& req) {
  auto model = r.string("model");
  if (r.error) return r.error;
  if (model && *model != limits.served_model_name) {
    api_error e = api_error::invalid("model", "The model '" + *model + "' does not exist; this server serves '" +
                                                  limits.served_model_name + "'",
                                     "model_not_found");
    e.status = 404;
    return e;
  }
  req.model = limits.served_model_name;
  return std::nullopt;
}

// OpenAI fields Petrel does not implement: refused when they ask for something, so that a client
// never silently gets a different behaviour than it asked for.
std::optional<api_error> refuse_unsupported(reader& r, api_endpoint ep) {
  for (const char* key : {"n", "best_of"}) {
    if (auto n = r.integer(key); n && *n != 1)
      return api_error::invalid(key, std::string("only ") + key + "=1 is supported, got " + std::to_string(*n),
                                "unsupported_value");
  }
  if (ep == api_endpoint::chat_completions) {
    if (auto lp = r.boolean("logprobs"); lp && *lp)
      return api_error::invalid("logprobs", "logprobs are not supported", "unsupported_value");
    if (auto tl = r.integer("top_logprobs"); tl && *tl > 0)
      return api_error::invalid("top_logprobs", "logprobs are not supported", "unsupported_value");
    if (const json* tools = r.find("tools")) {
      if (!tools->is_array()) return wrong_type("tools", "an array", *tools);
      if (!tools->empty()) return api_error::invalid("tools", "tool calling is not supported", "unsupported_value");
    }
    if (const json* rf = r.find("response_format")) {
      if (!rf->is_object()) return wrong_type("response_format", "an object", *rf);
      auto t = rf->find("type");
      if (t != rf->end() && !(t->is_string() && *t == "text"))
        return api_error::invalid("response_format", "only response_format {\"type\": \"text\"} is supported",
                                  "unsupported_value");
    }
  } else if (ep == api_endpoint::completions) {
    if (auto lp = r.integer("logprobs"); lp && *lp > 0)
      return api_error::invalid("logprobs", "logprobs are not supported", "unsupported_value");
    if (auto echo = r.boolean("echo"); echo && *echo)
      return api_error::invalid("echo", "echo is not supported", "unsupported_value");
    if (auto suffix = r.string("suffix"); suffix && !suffix->empty())
      return api_error::invalid("suffix", "suffix is not supported", "unsupported_value");
  }
  return r.error;
}

std::optional<api_error> read_stream(reader& r, generation_request& req) {
  if (auto st = r.boolean("stream")) req.stream = *st;
  if (r.error) return r.error;
  if (const json* so = r.find("stream_options")) {
    if (!so->is_object()) return wrong_type("stream_options", "an object", *so);
    if (!req.stream)
      return api_error::invalid("stream_options", "stream_options is only allowed when stream is true");
    reader sr{*so, "stream_options."};
    if (auto iu = sr.boolean("include_usage")) req.include_usage = *iu;
    if (sr.error) return sr.error;
  }
  return std::nullopt;
}

// -- per endpoint --------------------------------------------------------------------

std::optional<api_error> parse_completions(const json& body, const api_limits& limits,
                                           generation_request& req) {
  reader r{body, ""};
  if (auto e = read_model(r, limits, req)) return e;
  if (auto e = refuse_unsupported(r, req.endpoint)) return e;
  if (auto e = read_stream(r, req)) return e;

  const json* prompt = r.find("prompt");
  if (!prompt) return api_error::invalid("prompt", "'prompt' is required", "missing_required_parameter");
  // A string, an array of token ids, or a batch of one of those ([["..."]] / [[1,2]]).
  const json* p = prompt;
  if (p->is_array() && !p->empty() && (p->front().is_string() || p->front().is_array())) {
    if (p->size() != 1)
      return api_error::invalid("prompt", "batched prompts are not supported; send one prompt per request",
                                "unsupported_value");
    p = &p->front();
  }
  byte_tokenizer tok;
  if (p->is_string()) {
    req.prompt_text = p->get<std::string>();
    if (req.prompt_text.empty()) return api_error::invalid("prompt", "'prompt' must not be empty");
    req.prompt_ids = tok.encode(req.prompt_text, limits.add_bos);
  } else if (p->is_array()) {
    if (p->empty()) return api_error::invalid("prompt", "'prompt' must not be empty");
    if (auto e = read_token_ids(*p, "prompt", limits.vocab_size, req.prompt_ids)) return e;
  } else {
    return wrong_type("prompt", "a string or an array of token ids", *p);
  }

  if (auto e = read_sampling(r, limits, req.sampling)) return e;
  auto max_tokens = r.integer("max_tokens");
  if (r.error) return r.error;
  return resolve_max_tokens(max_tokens, "max_tokens", limits.default_max_tokens, "prompt",
                            req.prompt_ids.size(), limits, req.sampling);
}

std::optional<api_error> parse_chat(const json& body, const api_limits& limits, generation_request& req) {
  reader r{body, ""};
  if (auto e = read_model(r, limits, req)) return e;
  if (auto e = refuse_unsupported(r, req.endpoint)) return e;
  if (auto e = read_stream(r, req)) return e;

  const json* msgs = r.find("messages");
  if (!msgs) return api_error::invalid("messages", "'messages' is required", "missing_required_parameter");
  if (!msgs->is_array()) return wrong_type("messages", "an array", *msgs);
  if (msgs->empty()) return api_error::invalid("messages", "'messages' must not be empty");
  for (std::size_t i = 0; i < msgs->size(); ++i) {
    const json& m = (*msgs)[i];
    const std::string at = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) return wrong_type(at, "an object", m);
    chat_message cm;
    auto role = m.find("role");
    if (role == m.end() || role->is_null())
      return api_error::invalid(at + ".role", "'" + at + ".role' is required", "missing_required_parameter");
    if (!role->is_string()) return wrong_type(at + ".role", "a string", *role);
    cm.role = role->get<std::string>();
    if (cm.role != "system" && cm.role != "user" && cm.role != "assistant" && cm.role != "tool" &&
        cm.role != "developer")
      return api_error::invalid(at + ".role", "unknown role '" + cm.role +
                                                  "'; expected system, developer, user, assistant or tool");
    auto content = m.find("content");
    if (content == m.end() || content->is_null()) {
      if (cm.role != "assistant")
        return api_error::invalid(at + ".content", "'" + at + ".content' is required",
                                  "missing_required_parameter");
    } else if (content->is_string()) {
      cm.content = content->get<std::string>();
    } else if (content->is_array()) { // content parts: only text parts
      for (std::size_t k = 0; k < content->size(); ++k) {
        const json& part = (*content)[k];
        const std::string pat = at + ".content[" + std::to_string(k) + "]";
        if (!part.is_object()) return wrong_type(pat, "an object", part);
        auto type = part.find("type");
        if (type == part.end() || !type->is_string() || *type != "text")
          return api_error::invalid(pat + ".type", "only text content parts are supported", "unsupported_value");
        auto text = part.find("text");
        if (text == part.end() || !text->is_string())
          return api_error::invalid(pat + ".text", "a text content part needs a string 'text'", "invalid_type");
        cm.content += text->get<std::string>();
      }
    } else {
      return wrong_type(at + ".content", "a string or an array of content parts", *content);
    }
    req.messages.push_back(std::move(cm));
  }
  req.prompt_text = apply_chat_template(req.messages);
  req.prompt_ids = byte_tokenizer{}.encode(req.prompt_text, limits.add_bos);

  if (auto e = read_sampling(r, limits, req.sampling)) return e;
  // max_completion_tokens is the newer name; it wins when both are given.
  auto mct = r.integer("max_completion_tokens");
  auto mt = r.integer("max_tokens");
  if (r.error) return r.error;
  const bool newer = mct.has_value();
  return resolve_max_tokens(newer ? mct : mt, newer ? "max_completion_tokens" : "max_tokens",
                            /*default: what is left*/ 0, "messages", req.prompt_ids.size(), limits,
                            req.sampling);
}

std::optional<api_error> parse_generate(const json& body, const api_limits& limits, generation_request& req) {
  reader r{body, ""};
  if (auto e = read_model(r, limits, req)) return e;
  if (auto e = read_stream(r, req)) return e;
  if (auto rid = r.string("rid")) {
    if (rid->empty()) return api_error::invalid("rid", "'rid' must not be empty");
    req.id = *rid;
  }
  if (r.error) return r.error;

  const json* text = r.find("text");
  const json* ids = r.find("input_ids");
  if (text && ids) return api_error::invalid("input_ids", "give either 'text' or 'input_ids', not both");
  if (!text && !ids)
    return api_error::invalid("text", "one of 'text' or 'input_ids' is required", "missing_required_parameter");
  std::string prompt_param;
  if (text) {
    prompt_param = "text";
    if (!text->is_string()) return wrong_type("text", "a string", *text);
    req.prompt_text = text->get<std::string>();
    if (req.prompt_text.empty()) return api_error::invalid("text", "'text' must not be empty");
    req.prompt_ids = byte_tokenizer{}.encode(req.prompt_text, limits.add_bos);
  } else {
    prompt_param = "input_ids";
    if (!ids->is_array()) return wrong_type("input_ids", "an array of token ids", *ids);
    if (ids->empty()) return api_error::invalid("input_ids", "'input_ids' must not be empty");
    if (auto e = read_token_ids(*ids, "input_ids", limits.vocab_size, req.prompt_ids)) return e;
  }

  std::optional<int64_t> max_new;
  if (const json* sp = r.find("sampling_params")) {
    if (!sp->is_object()) return wrong_type("sampling_params", "an object", *sp);
    reader s{*sp, "sampling_params."};
    if (auto n = s.integer("n"); n && *n != 1)
      return api_error::invalid("sampling_params.n", "only n=1 is supported", "unsupported_value");
    if (auto e = read_sampling(s, limits, req.sampling)) return e;
    max_new = s.integer("max_new_tokens");
    if (s.error) return s.error;
  }
  return resolve_max_tokens(max_new, "sampling_params.max_new_tokens", limits.default_max_new_tokens,
                            prompt_param, req.prompt_ids.size(), limits, req.sampling);
}

} // namespace

// -- api_error ------------------------------------------------------------------------

std::string api_error::to_json() const {
  json e = {{"message", sanitize_utf8(message)},
            {"type", type},
            {"param", param.empty() ? json(nullptr) : json(sanitize_utf8(param))},
            {"code", code.empty() ? json(nullptr) : json(code)}};
  return dump(json{{"error", std::move(e)}});
}

api_error api_error::invalid(std::string param, std::string message, std::string code) {
  api_error e;
  e.status = 400;
  e.param = std::move(param);
  e.message = std::move(message);
  e.code = std::move(code);
  return e;
}

api_error api_error::unavailable(std::string message) {
  api_error e;
  e.status = 503;
  e.type = "server_error";
  e.message = std::move(message);
  e.code = "overloaded";
  return e;
}

api_error api_error::internal(std::string message) {
  api_error e;
  e.status = 500;
  e.type = "server_error";
  e.message = std::move(message);
  e.code = "internal_error";
  return e;
}

// -- requests ---------------------------------------------------------------------------

std::optional<api_endpoint> endpoint_for_path(std::string_view path) {
  if (path == "/v1/completions") return api_endpoint::completions;
  if (path == "/v1/chat/completions") return api_endpoint::chat_completions;
  if (path == "/generate") return api_endpoint::generate;
  return std::nullopt;
}

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string apply_chat_template(std::span<const chat_message> messages) {
  std::string out;
  for (const auto& m : messages) {
    out += "<|";
    out += m.role;
    out += "|>\n";
    out += m.content;
    out += '\n';
  }
  out += "<|assistant|>\n";
  return out;
}

api_result<generation_request> parse_generation_request(api_endpoint endpoint, std::string_view body,
                                                        const api_limits& limits) {
  json j;
  try {
    j = json::parse(body);
  } catch (const json::exception& e) { // parse_error, and out_of_range for numbers like 1e999
    return api_error::invalid("", std::string("the request body is not valid JSON: ") + e.what(), "invalid_json");
  }
  if (!j.is_object()) return api_error::invalid("", "the request body must be a JSON object, got " + type_name(j),
                                                "invalid_json");
  generation_request req;
  req.endpoint = endpoint;
  req.created = unix_now();
  std::optional<api_error> err;
  try {
    switch (endpoint) {
    case api_endpoint::completions: err = parse_completions(j, limits, req); break;
    case api_endpoint::chat_completions: err = parse_chat(j, limits, req); break;
    case api_endpoint::generate: err = parse_generate(j, limits, req); break;
    }
  } catch (const std::exception& e) { // a reader bug must not take the gateway down
    err = api_error::invalid("", std::string("could not read the request: ") + e.what());
  }
  if (err) return *err;
  if (req.id.empty()) {
    switch (endpoint) {
    case api_endpoint::completions: req.id = "cmpl-" + random_hex(24); break;
    case api_endpoint::chat_completions: req.id = "chatcmpl-" + random_hex(24); break;
    case api_endpoint::generate: req.id = "gen-" + random_hex(24); break;
    }
  }
  return req;
}

// -- output_assembler --------------------------------------------------------------------

std::string_view to_string(finish_reason r) {
  switch (r) {
  case finish_reason::stop: return "stop";
  case finish_reason::length: return "length";
  case finish_reason::abort: return "abort";
  }
  return "stop";
}

output_assembler::output_assembler(const generation_request& req)
  : sampling_(req.sampling), prompt_tokens_(static_cast<int>(req.prompt_ids.size())) {
  for (const auto& s : sampling_.stop) max_stop_len_ = std::max(max_stop_len_, s.size());
}

// The longest tail of pending_ that is a proper prefix of some stop string: it may still grow
// into a stop string, so it is not shown yet.
std::size_t output_assembler::stop_holdback() const {
  std::size_t best = 0;
  for (const auto& s : sampling_.stop) {
    const std::size_t upto = std::min(s.size() - 1, pending_.size());
    for (std::size_t len = upto; len > best; --len) {
      if (pending_.compare(pending_.size() - len, len, s, 0, len) == 0) {
        best = len;
        break;
      }
    }
  }
  return best;
}

output_delta output_assembler::push(std::span<const int32_t> ids) {
  std::vector<int32_t> accepted;
  for (int32_t id : ids) {
    if (reason_) break;
    accepted.push_back(id);
    ids_.push_back(id);
    if ((id == byte_tokenizer::eos_id && !sampling_.ignore_eos) ||
        std::find(sampling_.stop_token_ids.begin(), sampling_.stop_token_ids.end(), id) !=
            sampling_.stop_token_ids.end()) {
      matched_token_ = id;
      reason_ = finish_reason::stop;
      break;
    }
    const std::size_t before = pending_.size();
    pending_ += detok_.push(id);
    if (!sampling_.stop.empty() && pending_.size() > before) {
      // A stop string that completes now ends inside the new text; search only where it can start.
      const std::size_t from = before >= max_stop_len_ ? before - max_stop_len_ + 1 : 0;
      std::size_t hit = std::string::npos;
      for (const auto& s : sampling_.stop) {
        std::size_t p = pending_.find(s, from);
        if (p != std::string::npos && p < hit) {
          hit = p;
          matched_stop_ = s;
        }
      }
      if (hit != std::string::npos) {
        pending_.resize(hit);
        reason_ = finish_reason::stop;
        break;
      }
    }
    if (static_cast<int>(ids_.size()) >= sampling_.max_tokens) {
      reason_ = finish_reason::length;
      break;
    }
  }
  return emit(std::move(accepted));
}

output_delta output_assembler::finish(finish_reason reason) {
  if (reason_) return {};
  reason_ = reason;
  return emit({});
}

output_delta output_assembler::emit(std::vector<int32_t> ids) {
  output_delta d;
  d.ids = std::move(ids);
  if (reason_) {
    if (matched_stop_.empty()) pending_ += detok_.flush(); // a stop string cut the text already
    d.text = std::move(pending_);
    pending_.clear();
    d.finished = reason_;
  } else {
    const std::size_t keep = stop_holdback();
    d.text = pending_.substr(0, pending_.size() - keep);
    pending_.erase(0, pending_.size() - keep);
  }
  emitted_ += d.text;
  return d;
}

// -- response_builder ----------------------------------------------------------------------

namespace {

json usage_json(const output_assembler& out) {
  return {{"prompt_tokens", out.prompt_tokens()},
          {"completion_tokens", out.completion_tokens()},
          {"total_tokens", out.prompt_tokens() + out.completion_tokens()}};
}

json finish_json(const output_assembler& out) {
  return out.reason() ? json(std::string(to_string(*out.reason()))) : json(nullptr);
}

json generate_meta(const generation_request& req, const output_assembler& out) {
  json fr = nullptr;
  if (out.reason()) {
    json matched = nullptr;
    if (!out.matched_stop().empty()) matched = out.matched_stop();
    else if (out.matched_token()) matched = *out.matched_token();
    fr = {{"type", std::string(to_string(*out.reason()))}, {"matched", matched}};
  }
  return {{"id", req.id},
          {"finish_reason", fr},
          {"prompt_tokens", out.prompt_tokens()},
          {"completion_tokens", out.completion_tokens()}};
}

} // namespace

response_builder::response_builder(generation_request req) : req_(std::move(req)), out_(req_) {}

std::vector<std::string> response_builder::stream_start() {
  std::vector<std::string> ev;
  if (started_) return ev;
  started_ = true;
  if (req_.endpoint == api_endpoint::chat_completions) {
    json chunk = {{"id", req_.id}, {"object", "chat.completion.chunk"}, {"created", req_.created},
                  {"model", req_.model},
                  {"choices", json::array({{{"index", 0},
                                            {"delta", {{"role", "assistant"}, {"content", ""}}},
                                            {"logprobs", nullptr},
                                            {"finish_reason", nullptr}}})}};
    if (req_.include_usage) chunk["usage"] = nullptr;
    ev.push_back(dump(chunk));
  }
  return ev;
}

std::vector<std::string> response_builder::stream_events(const output_delta& delta) {
  std::vector<std::string> ev = stream_start();
  const bool done = delta.finished.has_value();
  switch (req_.endpoint) {
  case api_endpoint::completions:
  case api_endpoint::chat_completions: {
    const bool chat = req_.endpoint == api_endpoint::chat_completions;
    auto chunk = [&](const std::string& text, json finish) {
      json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", std::move(finish)}};
      if (chat) choice["delta"] = text.empty() ? json::object() : json{{"content", text}};
      else choice["text"] = text;
      json c = {{"id", req_.id}, {"object", chat ? "chat.completion.chunk" : "text_completion"},
                {"created", req_.created}, {"model", req_.model}, {"choices", json::array({std::move(choice)})}};
      if (req_.include_usage) c["usage"] = nullptr;
      return dump(c);
    };
    if (!delta.text.empty()) ev.push_back(chunk(delta.text, nullptr));
    if (done) {
      ev.push_back(chunk("", finish_json(out_)));
      if (req_.include_usage) {
        json u = {{"id", req_.id}, {"object", chat ? "chat.completion.chunk" : "text_completion"},
                  {"created", req_.created}, {"model", req_.model}, {"choices", json::array()},
                  {"usage", usage_json(out_)}};
        ev.push_back(dump(u));
      }
    }
    break;
  }
  case api_endpoint::generate:
    if (!delta.text.empty() || !delta.ids.empty() || done)
      ev.push_back(dump({{"text", delta.text}, {"output_ids", delta.ids}, {"meta", generate_meta(req_, out_)}}));
    break;
  }
  if (done) ev.emplace_back("[DONE]");
  return ev;
}

std::string response_builder::final_body() const {
  switch (req_.endpoint) {
  case api_endpoint::completions:
    return dump({{"id", req_.id}, {"object", "text_completion"}, {"created", req_.created}, {"model", req_.model},
                 {"choices", json::array({{{"index", 0}, {"text", out_.text()}, {"logprobs", nullptr},
                                           {"finish_reason", finish_json(out_)}}})},
                 {"usage", usage_json(out_)}});
  case api_endpoint::chat_completions:
    return dump({{"id", req_.id}, {"object", "chat.completion"}, {"created", req_.created}, {"model", req_.model},
                 {"choices", json::array({{{"index", 0},
                                           {"message", {{"role", "assistant"}, {"content", out_.text()}}},
                                           {"logprobs", nullptr},
                                           {"finish_reason", finish_json(out_)}}})},
                 {"usage", usage_json(out_)}});
  case api_endpoint::generate:
    return dump({{"text", out_.text()}, {"output_ids", out_.output_ids()}, {"meta", generate_meta(req_, out_)}});
  }
  return "{}";
}

std::string render_models(const api_limits& limits, int64_t created) {
  return dump({{"object", "list"},
               {"data", json::array({{{"id", limits.served_model_name},
                                      {"object", "model"},
                                      {"created", created},
                                      {"owned_by", "petrel"},
                                      {"max_model_len", limits.context_length}}})}});
}

} // namespace petrel
