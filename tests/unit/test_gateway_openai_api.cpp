// Request parsing and validation for /v1/completions, /v1/chat/completions and /generate, and the
// rendering of full and streamed responses.
#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include "runtime/openai_api.hpp"

using namespace petrel;
using json = nlohmann::json;

namespace {

api_limits limits() {
  api_limits l;
  l.served_model_name = "tiny";
  l.context_length = 64;
  return l;
}

api_result<generation_request> parse(api_endpoint ep, const json& body) {
  return parse_generation_request(ep, body.dump(), limits());
}

// The request is refused with `status`, the OpenAI error shape, and the given param.
void expect_error(api_endpoint ep, const std::string& body, const std::string& param, int status = 400) {
  CAPTURE(body);
  auto r = parse_generation_request(ep, body, limits());
  REQUIRE_FALSE(r.ok());
  CHECK(r.error().status == status);
  CHECK(r.error().param == param);
  json j = json::parse(r.error().to_json());
  REQUIRE(j.contains("error"));
  CHECK(j["error"]["type"] == "invalid_request_error");
  CHECK(j["error"]["message"].is_string());
  CHECK_FALSE(j["error"]["message"].get<std::string>().empty());
  if (param.empty()) CHECK(j["error"]["param"].is_null());
  else CHECK(j["error"]["param"] == param);
  CHECK(j["error"].contains("code"));
}

constexpr auto C = api_endpoint::completions;
constexpr auto CH = api_endpoint::chat_completions;
constexpr auto G = api_endpoint::generate;

} // namespace

TEST_CASE("completions: a valid request parses into generation_request") {
  auto r = parse(C, {{"model", "tiny"}, {"prompt", "hi"}, {"max_tokens", 5}, {"temperature", 0},
                     {"top_p", 0.9}, {"top_k", 3}, {"seed", 42}, {"stop", "\n"}, {"stream", true},
                     {"stream_options", {{"include_usage", true}}}, {"ignore_eos", true},
                     {"user", "ignored"}, {"some_future_field", {1, 2}}});
  REQUIRE(r.ok());
  auto& q = r.value();
  CHECK(q.endpoint == C);
  CHECK(q.model == "tiny");
  CHECK(q.id.rfind("cmpl-", 0) == 0);
  CHECK(q.created > 1700000000);
  CHECK(q.prompt_ids == std::vector<int32_t>{byte_tokenizer::bos_id, 'h', 'i'});
  CHECK(q.sampling.max_tokens == 5);
  CHECK(q.sampling.temperature == 0.0);
  CHECK(q.sampling.greedy());
  CHECK(q.sampling.top_p == doctest::Approx(0.9));
  CHECK(q.sampling.top_k == 3);
  CHECK(q.sampling.seed == 42);
  CHECK(q.sampling.stop == std::vector<std::string>{"\n"});
  CHECK(q.sampling.ignore_eos);
  CHECK(q.stream);
  CHECK(q.include_usage);

  // Token-id prompts, batch of one, defaults, model omitted.
  auto ids = parse(C, {{"prompt", {{1, 2, 3}}}});
  REQUIRE(ids.ok());
  CHECK(ids.value().prompt_ids == std::vector<int32_t>{1, 2, 3});
  CHECK(ids.value().model == "tiny");
  CHECK(ids.value().sampling.max_tokens == 16);
  CHECK(ids.value().sampling.top_k == 0);
  CHECK(ids.value().sampling.temperature == 1.0);
  CHECK_FALSE(ids.value().stream);
  // top_k -1 means disabled; nulls mean defaults; 16.0 is an integer.
  auto k = parse(C, {{"prompt", "x"}, {"top_k", -1}, {"temperature", nullptr}, {"max_tokens", 16.0}});
  REQUIRE(k.ok());
  CHECK(k.value().sampling.top_k == 0);
  CHECK(k.value().sampling.max_tokens == 16);
  // The default max_tokens is clipped to the room left in the context.
  auto room = parse(C, {{"prompt", std::vector<int>(60, 5)}});
  REQUIRE(room.ok());
  CHECK(room.value().sampling.max_tokens == 4);
}

TEST_CASE("completions: every validation rule names its param") {
  expect_error(C, "{\"prompt\": \"hi\"", "");              // malformed JSON
  expect_error(C, "[1,2]", "");                            // not an object
  expect_error(C, "", "");                                 // empty body
  expect_error(C, R"({"prompt":"hi","temperature":1e999})", ""); // number out of double range
  expect_error(C, R"({"prompt":"hi","model":"gpt-4"})", "model", 404);
  expect_error(C, R"({"prompt":"hi","model":7})", "model");
  expect_error(C, R"({})", "prompt");
  expect_error(C, R"({"prompt":""})", "prompt");
  expect_error(C, R"({"prompt":[]})", "prompt");
  expect_error(C, R"({"prompt":12})", "prompt");
  expect_error(C, R"({"prompt":[1,258]})", "prompt");      // out of vocab
  expect_error(C, R"({"prompt":[1,-1]})", "prompt");
  expect_error(C, R"({"prompt":[1,"a"]})", "prompt");
  expect_error(C, R"({"prompt":["a","b"]})", "prompt");    // batch
  expect_error(C, R"({"prompt":"hi","max_tokens":0})", "max_tokens");
  expect_error(C, R"({"prompt":"hi","max_tokens":-3})", "max_tokens");
  expect_error(C, R"({"prompt":"hi","max_tokens":"5"})", "max_tokens");
  expect_error(C, R"({"prompt":"hi","max_tokens":2.5})", "max_tokens");
  expect_error(C, R"({"prompt":"hi","max_tokens":62})", "max_tokens"); // 3 + 62 > 64
  expect_error(C, "{\"prompt\":[" + std::string("1,", 0) + [] {
    std::string s; for (int i = 0; i < 64; ++i) s += (i ? ",7" : "7"); return s; }() + "]}", "prompt");
  expect_error(C, R"({"prompt":"hi","temperature":-0.1})", "temperature");
  expect_error(C, R"({"prompt":"hi","temperature":2.5})", "temperature");
  expect_error(C, R"({"prompt":"hi","temperature":"hot"})", "temperature");
  expect_error(C, R"({"prompt":"hi","top_p":0})", "top_p");
  expect_error(C, R"({"prompt":"hi","top_p":1.5})", "top_p");
  expect_error(C, R"({"prompt":"hi","top_k":-2})", "top_k");
  expect_error(C, R"({"prompt":"hi","top_k":1.5})", "top_k");
  expect_error(C, R"({"prompt":"hi","seed":"x"})", "seed");
  expect_error(C, R"({"prompt":"hi","stop":5})", "stop");
  expect_error(C, R"({"prompt":"hi","stop":[""]})", "stop");
  expect_error(C, R"({"prompt":"hi","stop":["a",1]})", "stop");
  expect_error(C, R"({"prompt":"hi","stream":"yes"})", "stream");
  expect_error(C, R"({"prompt":"hi","stream_options":{"include_usage":true}})", "stream_options");
  expect_error(C, R"({"prompt":"hi","stream":true,"stream_options":{"include_usage":1}})",
               "stream_options.include_usage");
  expect_error(C, R"({"prompt":"hi","n":2})", "n");
  expect_error(C, R"({"prompt":"hi","n":"1"})", "n");
  expect_error(C, R"({"prompt":"hi","best_of":3})", "best_of");
  expect_error(C, R"({"prompt":"hi","logprobs":2})", "logprobs");
  expect_error(C, R"({"prompt":"hi","echo":true})", "echo");
  expect_error(C, R"({"prompt":"hi","ignore_eos":"no"})", "ignore_eos");
  expect_error(C, R"({"prompt":"hi","frequency_penalty":3})", "frequency_penalty");
  expect_error(C, R"({"prompt":"hi","stop_token_ids":[300]})", "stop_token_ids");
  // n == 1 is fine
  CHECK(parse(C, {{"prompt", "hi"}, {"n", 1}}).ok());
}

TEST_CASE("chat: template, roles, content parts and validation") {
  auto r = parse(CH, {{"model", "tiny"},
                      {"messages", {{{"role", "system"}, {"content", "be brief"}},
                                    {{"role", "user"}, {"content", {{{"type", "text"}, {"text", "hi"}}}}}}},
                      {"max_completion_tokens", 4}});
  REQUIRE(r.ok());
  auto& q = r.value();
  CHECK(q.id.rfind("chatcmpl-", 0) == 0);
  CHECK(q.messages.size() == 2);
  CHECK(q.prompt_text == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n");
  CHECK(q.prompt_ids.front() == byte_tokenizer::bos_id);
  CHECK(q.prompt_ids.size() == q.prompt_text.size() + 1);
  CHECK(q.sampling.max_tokens == 4);
  // Default max_tokens: all the room that is left.
  auto d = parse(CH, {{"messages", {{{"role", "user"}, {"content", "hi"}}}}});
  REQUIRE(d.ok());
  CHECK(d.value().sampling.max_tokens == 64 - static_cast<int>(d.value().prompt_ids.size()));

  expect_error(CH, R"({})", "messages");
  expect_error(CH, R"({"messages":"hi"})", "messages");
  expect_error(CH, R"({"messages":[]})", "messages");
  expect_error(CH, R"({"messages":[5]})", "messages[0]");
  expect_error(CH, R"({"messages":[{"content":"x"}]})", "messages[0].role");
  expect_error(CH, R"({"messages":[{"role":"wizard","content":"x"}]})", "messages[0].role");
  expect_error(CH, R"({"messages":[{"role":"user","content":"a"},{"role":"user","content":3}]})",
               "messages[1].content");
  expect_error(CH, R"({"messages":[{"role":"user"}]})", "messages[0].content");
  expect_error(CH, R"({"messages":[{"role":"user","content":[{"type":"image_url"}]}]})",
               "messages[0].content[0].type");
  expect_error(CH, R"({"messages":[{"role":"user","content":"hi"}],"model":"other"})", "model", 404);
  expect_error(CH, R"({"messages":[{"role":"user","content":"hi"}],"max_tokens":0})", "max_tokens");
  expect_error(CH, R"({"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":1000})",
               "max_completion_tokens");
  expect_error(CH, R"({"messages":[{"role":"user","content":"hi"}],"n":3})", "n");
  expect_error(CH, R"({"messages":[{"role":"user","content":"hi"}],"logprobs":true})", "logprobs");
  expect_error(CH, R"({"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function"}]})", "tools");
  expect_error(CH, R"({"messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_object"}})",
               "response_format");
  expect_error(CH, R"({"messages":[{"role":"user","content":"hi"}],"top_p":-1})", "top_p");
  expect_error(CH, "{\"messages\":[{\"role\":\"user\",\"content\":\"" + std::string(80, 'x') + "\"}]}",
               "messages");
}

TEST_CASE("generate: native request with input_ids or text and sampling_params") {
  auto r = parse(G, {{"input_ids", {256, 104, 105}},
                     {"sampling_params", {{"max_new_tokens", 8}, {"temperature", 0.5}, {"top_k", 1},
                                          {"stop_token_ids", {10}}}},
                     {"rid", "my-req"}});
  REQUIRE(r.ok());
  CHECK(r.value().id == "my-req");
  CHECK(r.value().prompt_ids == std::vector<int32_t>{256, 104, 105});
  CHECK(r.value().sampling.max_tokens == 8);
  CHECK(r.value().sampling.top_k == 1);
  CHECK(r.value().sampling.stop_token_ids == std::vector<int32_t>{10});
  auto t = parse(G, {{"text", "abc"}});
  REQUIRE(t.ok());
  CHECK(t.value().id.rfind("gen-", 0) == 0);
  CHECK(t.value().prompt_ids.size() == 4);
  CHECK(t.value().sampling.max_tokens == 60); // min(128, 64 - 4)

  expect_error(G, R"({})", "text");
  expect_error(G, R"({"text":"a","input_ids":[1]})", "input_ids");
  expect_error(G, R"({"text":""})", "text");
  expect_error(G, R"({"text":5})", "text");
  expect_error(G, R"({"input_ids":[]})", "input_ids");
  expect_error(G, R"({"input_ids":[999]})", "input_ids");
  expect_error(G, R"({"input_ids":"abc"})", "input_ids");
  expect_error(G, R"({"text":"a","sampling_params":[]})", "sampling_params");
  expect_error(G, R"({"text":"a","sampling_params":{"max_new_tokens":0}})", "sampling_params.max_new_tokens");
  expect_error(G, R"({"text":"a","sampling_params":{"max_new_tokens":63}})", "sampling_params.max_new_tokens");
  expect_error(G, R"({"text":"a","sampling_params":{"temperature":3}})", "sampling_params.temperature");
  expect_error(G, R"({"text":"a","sampling_params":{"top_p":0}})", "sampling_params.top_p");
  expect_error(G, R"({"text":"a","sampling_params":{"top_k":-5}})", "sampling_params.top_k");
  expect_error(G, R"({"text":"a","sampling_params":{"seed":1.5}})", "sampling_params.seed");
  expect_error(G, R"({"text":"a","sampling_params":{"n":2}})", "sampling_params.n");
  expect_error(G, R"({"text":"a","model":"nope"})", "model", 404);
}

TEST_CASE("output_assembler: EOS, stop tokens, stop strings held back, max_tokens") {
  byte_tokenizer tok;
  auto req = parse(C, {{"prompt", "p"}, {"max_tokens", 10}, {"stop", {"END", "\xC3\xB6!"}}}).value();

  SUBCASE("stop string split across tokens is never shown and is cut off") {
    output_assembler out(req);
    auto d1 = out.push(tok.encode("abE"));
    CHECK(d1.text == "ab"); // "E" may start "END"
    CHECK_FALSE(d1.finished);
    auto d2 = out.push(tok.encode("Nx")); // "ENx": not a stop string after all
    CHECK(d2.text == "ENx");
    auto d3 = out.push(tok.encode("EN"));
    CHECK(d3.text.empty());
    auto d4 = out.push(tok.encode("Dzz")); // completes END; the rest of the batch is ignored
    CHECK(d4.finished == finish_reason::stop);
    CHECK(d4.text.empty());
    CHECK(d4.ids == std::vector<int32_t>{'D'});
    CHECK(out.text() == "abENx");
    CHECK(out.matched_stop() == "END");
    CHECK(out.completion_tokens() == 8);
    CHECK(out.push(tok.encode("more")).ids.empty()); // finished: ignored
  }
  SUBCASE("multi-byte stop string and a held-back UTF-8 lead byte") {
    output_assembler out(req);
    auto d1 = out.push(std::vector<int32_t>{'a', 0xC3});
    CHECK(d1.text == "a");
    auto d2 = out.push(0xB6); // "ö" is the start of "ö!"
    CHECK(d2.text.empty());
    auto d3 = out.push('!');
    CHECK(d3.finished == finish_reason::stop);
    CHECK(out.text() == "a");
  }
  SUBCASE("EOS stops unless ignore_eos; stop_token_ids; max_tokens gives length") {
    output_assembler out(req);
    auto d = out.push(std::vector<int32_t>{'h', 'i', byte_tokenizer::eos_id, 'x'});
    CHECK(d.finished == finish_reason::stop);
    CHECK(d.text == "hi");
    CHECK(out.matched_token() == byte_tokenizer::eos_id);
    CHECK(out.output_ids() == std::vector<int32_t>{'h', 'i', byte_tokenizer::eos_id});

    auto req2 = req;
    req2.sampling.ignore_eos = true;
    req2.sampling.max_tokens = 3;
    output_assembler out2(req2);
    auto d2 = out2.push(std::vector<int32_t>{byte_tokenizer::eos_id, 'a', 0xE2, 'z'});
    CHECK(d2.finished == finish_reason::length);
    CHECK(d2.text == "a\xEF\xBF\xBD"); // the unfinished E2 is flushed as U+FFFD
    CHECK(out2.completion_tokens() == 3);

    auto req3 = req;
    req3.sampling.stop_token_ids = {'q'};
    output_assembler out3(req3);
    CHECK(out3.push(tok.encode("aqb")).finished == finish_reason::stop);
    CHECK(out3.text() == "a");
    CHECK(out3.matched_token() == 'q');
  }
  SUBCASE("finish from the engine flushes held-back text") {
    output_assembler out(req);
    CHECK(out.push(tok.encode("xEN")).text == "x");
    auto d = out.finish(finish_reason::abort);
    CHECK(d.text == "EN");
    CHECK(d.finished == finish_reason::abort);
    CHECK(out.finish(finish_reason::length).text.empty()); // no-op once finished
    CHECK(out.reason() == finish_reason::abort);
  }
}

TEST_CASE("response rendering: full bodies, stream chunks and [DONE]") {
  byte_tokenizer tok;
  SUBCASE("completions") {
    response_builder b(parse(C, {{"prompt", "p"}, {"max_tokens", 3}}).value());
    b.push(tok.encode("abc"));
    REQUIRE(b.finished());
    json j = json::parse(b.final_body());
    CHECK(j["object"] == "text_completion");
    CHECK(j["model"] == "tiny");
    CHECK(j["id"] == b.request().id);
    CHECK(j["choices"][0]["text"] == "abc");
    CHECK(j["choices"][0]["index"] == 0);
    CHECK(j["choices"][0]["finish_reason"] == "length");
    CHECK(j["choices"][0]["logprobs"].is_null());
    CHECK(j["usage"]["prompt_tokens"] == 2);
    CHECK(j["usage"]["completion_tokens"] == 3);
    CHECK(j["usage"]["total_tokens"] == 5);
  }
  SUBCASE("chat stream with usage") {
    response_builder b(parse(CH, {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 4},
                                  {"stream", true}, {"stream_options", {{"include_usage", true}}}})
                           .value());
    auto e1 = b.stream_events(b.push(tok.encode("ok")));
    REQUIRE(e1.size() == 2);
    json role = json::parse(e1[0]);
    CHECK(role["object"] == "chat.completion.chunk");
    CHECK(role["choices"][0]["delta"]["role"] == "assistant");
    CHECK(role["usage"].is_null());
    CHECK(json::parse(e1[1])["choices"][0]["delta"]["content"] == "ok");
    auto e2 = b.stream_events(b.push(byte_tokenizer::eos_id));
    REQUIRE(e2.size() == 3);
    json fin = json::parse(e2[0]);
    CHECK(fin["choices"][0]["finish_reason"] == "stop");
    CHECK(fin["choices"][0]["delta"].empty());
    json usage = json::parse(e2[1]);
    CHECK(usage["choices"].empty());
    CHECK(usage["usage"]["completion_tokens"] == 3);
    CHECK(e2[2] == "[DONE]");
    json full = json::parse(b.final_body());
    CHECK(full["object"] == "chat.completion");
    CHECK(full["choices"][0]["message"]["role"] == "assistant");
    CHECK(full["choices"][0]["message"]["content"] == "ok");
  }
  SUBCASE("completions stream") {
    response_builder b(parse(C, {{"prompt", "p"}, {"max_tokens", 2}, {"stream", true}}).value());
    CHECK(b.stream_start().empty());
    auto e = b.stream_events(b.push(tok.encode("yz")));
    REQUIRE(e.size() == 3);
    CHECK(json::parse(e[0])["choices"][0]["text"] == "yz");
    CHECK(json::parse(e[0])["choices"][0]["finish_reason"].is_null());
    CHECK_FALSE(json::parse(e[0]).contains("usage"));
    CHECK(json::parse(e[1])["choices"][0]["finish_reason"] == "length");
    CHECK(e[2] == "[DONE]");
  }
  SUBCASE("generate, full and streamed") {
    response_builder b(parse(G, {{"input_ids", {256, 1}}, {"sampling_params", {{"max_new_tokens", 2}}},
                                 {"stream", true}})
                           .value());
    auto e1 = b.stream_events(b.push('h'));
    REQUIRE(e1.size() == 1);
    json c1 = json::parse(e1[0]);
    CHECK(c1["text"] == "h");
    CHECK(c1["output_ids"] == json::array({'h'}));
    CHECK(c1["meta"]["finish_reason"].is_null());
    auto e2 = b.stream_events(b.push('i'));
    REQUIRE(e2.size() == 2);
    CHECK(json::parse(e2[0])["meta"]["finish_reason"]["type"] == "length");
    CHECK(e2[1] == "[DONE]");
    json full = json::parse(b.final_body());
    CHECK(full["text"] == "hi");
    CHECK(full["output_ids"] == json::array({'h', 'i'}));
    CHECK(full["meta"]["prompt_tokens"] == 2);
    CHECK(full["meta"]["completion_tokens"] == 2);
    CHECK(full["meta"]["id"] == b.request().id);
  }
  SUBCASE("models and errors") {
    json m = json::parse(render_models(limits(), 123));
    CHECK(m["object"] == "list");
    CHECK(m["data"][0]["id"] == "tiny");
    CHECK(m["data"][0]["object"] == "model");
    json e = json::parse(api_error::unavailable("busy").to_json());
    CHECK(e["error"]["type"] == "server_error");
    CHECK(api_error::unavailable("busy").status == 503);
    CHECK(endpoint_for_path("/v1/chat/completions") == CH);
    CHECK_FALSE(endpoint_for_path("/v2/x"));
  }
}
