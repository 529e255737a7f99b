// gateway: the HTTP listener (transport/http_server, Beast on Asio). Server threads hand every
// request to this actor; it validates (runtime/openai_api), submits to the router, and streams
// tokens back as SSE or one JSON body. A client that goes away aborts its request, which frees its
// pages on both sides.
#include <cstdlib>
#include <map>
#include <thread>

#include <caf/all.hpp>
#include <nlohmann/json.hpp>

#include "actors/serving.hpp"
#include "runtime/dashboard_page.hpp"
#include "runtime/metrics.hpp"
#include "runtime/model_config.hpp"
#include "runtime/openai_api.hpp"
#include "transport/http_server.hpp"

namespace petrel {

namespace {

using namespace std::chrono_literals;
using transport::response_stream;
using clock_type = std::chrono::steady_clock;

struct open_request {
  std::unique_ptr<response_builder> builder;
  std::shared_ptr<response_stream> out;
  bool stream = false;
  bool engine_done = false;
  clock_type::time_point started, last_token;
  bool got_first = false;
  bool accepted = false;  // the router took it (its submit was answered ok)
  bool orphaned = false;  // its router died: resubmit (with the tokens already streamed) to the next one
  serve_request submission; // what went to the router; `emitted` grows with every token streamed
};

struct gateway_state {
  static inline const char* name = "petrel.gateway";

  service_context sc;
  supervisor_actor services;
  router_actor router;
  std::unique_ptr<transport::http_server> server;
  api_limits limits;
  std::map<uint64_t, open_request> open;
  uint64_t next_rid = 1;
  std::string api_key; // empty: no key needed
  std::map<std::string, uint32_t> restarts_seen; // per actor, for petrel_actor_restarts_total
  int ticks = 0;
};

using gateway_pointer = gateway_actor::stateful_pointer<gateway_state>;

/// How long a new request may wait for a router (one being restarted) before it is answered 503.
constexpr auto unrouted_wait = std::chrono::seconds(5);

void count_request(const std::string& status) {
  serving_metrics().requests.with({status}).inc();
}

void respond_error(const std::shared_ptr<response_stream>& out, const api_error& err,
                   const transport::http_header_list& extra = {}) {
  out->respond_json(err.status, err.to_json(), extra);
}

void close_request(gateway_pointer self, std::map<uint64_t, open_request>::iterator it, const std::string& status) {
  auto& r = it->second;
  serving_metrics().e2e_request_latency.get().observe(
      std::chrono::duration<double>(clock_type::now() - r.started).count());
  count_request(status);
  self->state.open.erase(it);
}

void on_tokens(gateway_pointer self, token_event& ev) {
  auto& st = self->state;
  auto it = st.open.find(ev.rid);
  if (it == st.open.end())
    return;
  auto& r = it->second;
  auto& m = serving_metrics();
  if (!ev.error.empty()) {
    // A request the engine refused as invalid (e.g. it can never fit a decode rank's KV pool) is the
    // client's error (400); anything else failed on our side (500).
    bool invalid = ev.error.rfind("bad_request", 0) == 0;
    auto err = invalid ? api_error::invalid("max_tokens", ev.error, "context_length_exceeded")
                       : api_error::internal(ev.error);
    if (r.stream && r.out->streaming()) {
      r.out->send_event(err.to_json());
      r.out->end_sse();
    } else {
      respond_error(r.out, err);
    }
    close_request(self, it, "failed");
    return;
  }
  auto now = clock_type::now();
  if (!ev.ids.empty()) {
    if (!r.got_first) {
      r.got_first = true;
      m.time_to_first_token.get().observe(std::chrono::duration<double>(now - r.started).count());
    } else {
      m.inter_token_latency.get().observe(std::chrono::duration<double>(now - r.last_token).count() /
                                          static_cast<double>(ev.ids.size()));
    }
    r.last_token = now;
    m.output_tokens.get().inc(static_cast<double>(ev.ids.size()));
  }
  r.submission.emitted.insert(r.submission.emitted.end(), ev.ids.begin(), ev.ids.end());
  auto delta = r.builder->push(ev.ids);
  if (ev.finished && !r.builder->finished()) {
    auto tail = r.builder->finish(finish_reason::length);
    delta.text += tail.text;
    delta.finished = tail.finished;
  }
  if (r.stream) {
    for (auto& payload : r.builder->stream_events(delta))
      r.out->send_event(payload);
  }
  if (!r.builder->finished())
    return;
  if (!ev.finished) // a stop string or stop token ended it before the engine did
    self->anon_send(st.router, abort_atom::value, ev.rid);
  if (r.stream)
    r.out->end_sse();
  else
    r.out->respond_json(200, r.builder->final_body());
  close_request(self, it, "ok");
}

void submit(gateway_pointer self, uint64_t rid);

void on_generation(gateway_pointer self, api_endpoint endpoint, http_call& call) {
  auto& st = self->state;
  auto parsed = parse_generation_request(endpoint, call.body, st.limits);
  if (!parsed) {
    count_request("invalid");
    respond_error(call.out, parsed.error());
    return;
  }
  // No router at this moment (it is being restarted): the request waits, like an orphan, for the next
  // incarnation instead of failing at once; the tick answers 503 if none appears within unrouted_wait.
  auto& req = parsed.value();
  // A request no decode rank's KV pool can ever hold is refused here, before any stream opens.
  int64_t need = static_cast<int64_t>(req.prompt_ids.size()) + req.sampling.max_tokens, largest = 0;
  for (auto* g : st.sc.cfg->groups_with(group_role::decode))
    largest = std::max<int64_t>(largest, int64_t(g->kv_pages) * g->page_size);
  if (largest > 0 && need > largest) {
    count_request("invalid");
    respond_error(call.out, api_error::invalid("max_tokens",
                                               "prompt (" + std::to_string(req.prompt_ids.size()) +
                                                   " tokens) + max_tokens (" + std::to_string(req.sampling.max_tokens) +
                                                   ") = " + std::to_string(need) +
                                                   " tokens, more than the largest decode rank's KV pool holds (" +
                                                   std::to_string(largest) + " tokens)",
                                               "context_length_exceeded"));
    return;
  }
  auto rid = st.next_rid++;
  serve_request sreq;
  sreq.rid = rid;
  sreq.prompt = req.prompt_ids;
  sreq.max_new_tokens = req.sampling.max_tokens;
  sreq.sampling = sampling_spec{static_cast<float>(req.sampling.temperature), req.sampling.top_k,
                                static_cast<float>(req.sampling.top_p),
                                req.sampling.seed ? static_cast<uint64_t>(*req.sampling.seed) : rid};
  sreq.stop_ids = req.sampling.stop_token_ids;
  if (!req.sampling.ignore_eos)
    sreq.stop_ids.push_back(byte_tokenizer::eos_id);
  open_request r;
  r.stream = req.stream;
  r.out = call.out;
  r.started = clock_type::now();
  r.builder = std::make_unique<response_builder>(std::move(req));
  r.submission = std::move(sreq);
  st.open.emplace(rid, std::move(r));
  call.out->on_disconnect([me = caf::actor_cast<gateway_actor>(self), rid] { caf::anon_send(me, abort_atom::value, rid); });
  submit(self, rid);
}

/// Hands open request `rid` to the router: the first time, or again (with the tokens already streamed)
/// after the router it was on died. The client sees one uninterrupted response either way.
void submit(gateway_pointer self, uint64_t rid) {
  auto& st = self->state;
  auto it = st.open.find(rid);
  if (it == st.open.end())
    return;
  if (!st.router) { // between incarnations: resolve_router submits it once the next one is found
    it->second.orphaned = true;
    return;
  }
  it->second.orphaned = false;
  auto router = st.router;
  self->request(router, 10s, submit_atom::value, it->second.submission)
      .then(
          [self, rid](caf::ok_atom) {
            auto it = self->state.open.find(rid);
            if (it == self->state.open.end() || it->second.accepted)
              return;
            it->second.accepted = true;
            serving_metrics().input_tokens.get().inc(static_cast<double>(it->second.submission.prompt.size()));
            if (it->second.stream) {
              it->second.out->begin_sse();
              for (auto& payload : it->second.builder->stream_start())
                it->second.out->send_event(payload);
            }
          },
          [self, rid, router](caf::error& err) {
            auto& st = self->state;
            auto it = st.open.find(rid);
            if (it == st.open.end())
              return;
            // The router died before it answered: the request waits for the next router.
            if (router != st.router || !st.router) {
              it->second.orphaned = true;
              return;
            }
            bool overloaded = err.category() == caf::atom("petrel") &&
                              err.code() == static_cast<uint8_t>(petrel_errc::overloaded);
            auto api = overloaded ? api_error::unavailable("server overloaded: " + describe(err))
                                  : api_error::internal(describe(err));
            if (it->second.accepted && it->second.stream && it->second.out->streaming()) {
              it->second.out->send_event(api.to_json());
              it->second.out->end_sse();
            } else if (overloaded) {
              respond_error(it->second.out, api, {{"Retry-After", "1"}});
            } else {
              respond_error(it->second.out, api);
            }
            it->second.out.reset();
            close_request(self, it, overloaded ? "overloaded" : "failed");
          });
}

/// Constant-time comparison, so the key cannot be guessed byte by byte from response times.
bool same_secret(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() != b.size();
  for (size_t i = 0; i < a.size(); ++i)
    diff |= static_cast<unsigned char>(a[i] ^ (i < b.size() ? b[i] : 0));
  return diff == 0;
}

void on_dashboard_data(gateway_pointer self, http_call& call) {
  // Everything the dashboard shows, in one document: the live actor tree, group loads and the
  // metrics registry.
  auto out = call.out;
  auto& st = self->state;
  auto doc = std::make_shared<nlohmann::json>(nlohmann::json{{"time", unix_now()},
                                                             {"metrics", metrics::global_registry().snapshot_json()}});
  auto finish = [out, doc] { out->respond_json(200, doc->dump()); };
  self->request(st.sc.head, 5s, status_atom::value)
      .then(
          [self, doc, finish](cluster_status& cs) {
            nlohmann::json nodes = nlohmann::json::array();
            for (auto& n : cs.nodes) {
              nlohmann::json children = nlohmann::json::array();
              for (auto& c : n.children)
                children.push_back({{"name", c.name}, {"state", c.state}, {"epoch", c.epoch},
                                    {"restarts", c.restarts}, {"detail", c.detail}});
              nodes.push_back({{"name", n.name}, {"group", n.group}, {"state", n.state}, {"epoch", n.epoch},
                               {"restarts", n.restarts}, {"pid", n.pid}, {"children", children}});
            }
            (*doc)["cluster"] = {{"name", cs.cluster}, {"state", cs.state}, {"nodes", nodes}};
            if (!self->state.router) {
              finish();
              return;
            }
            self->request(self->state.router, 5s, load_atom::value)
                .then(
                    [doc, finish](std::vector<group_load>& loads) {
                      nlohmann::json groups = nlohmann::json::array();
                      for (auto& l : loads)
                        groups.push_back({{"group", l.group}, {"queued", l.queued}, {"running", l.running},
                                          {"free_pages", l.free_pages}, {"total_pages", l.total_pages},
                                          {"ranks_up", l.ranks_up}, {"ranks", l.ranks}});
                      (*doc)["groups"] = groups;
                      finish();
                    },
                    [finish](caf::error&) { finish(); });
          },
          [doc, finish](caf::error& err) {
            (*doc)["error"] = describe(err);
            finish();
          });
}

void on_http(gateway_pointer self, http_call& call) {
  auto& st = self->state;
  bool open_path = call.method == "GET" && (call.path == "/health" || call.path == "/dashboard");
  if (!st.api_key.empty() && !open_path && !same_secret(call.authorization, "Bearer " + st.api_key)) {
    count_request("unauthorized");
    call.out->respond_json(401,
                           api_error{401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                     "invalid_request_error", "", "invalid_api_key"}
                               .to_json(),
                           {{"WWW-Authenticate", "Bearer"}});
    return;
  }
  if (call.method == "GET" && call.path == "/dashboard") {
    call.out->respond(200, "text/html; charset=utf-8", dashboard_html());
  } else if (call.method == "GET" && call.path == "/dashboard/data") {
    on_dashboard_data(self, call);
  } else if (call.method == "GET" && call.path == "/health") {
    if (!st.router) {
      call.out->respond_json(503, nlohmann::json{{"status", "starting"}}.dump(), {{"Retry-After", "1"}});
      return;
    }
    // Health includes every group's load: queue, running, KV pages free, ranks up.
    auto out = call.out;
    auto open = st.open.size();
    self->request(st.router, 5s, load_atom::value)
        .then(
            [out, open](std::vector<group_load>& loads) {
              nlohmann::json groups = nlohmann::json::array();
              bool all_up = true;
              for (auto& l : loads) {
                all_up &= l.ranks_up == l.ranks;
                groups.push_back({{"group", l.group}, {"queued", l.queued}, {"running", l.running},
                                  {"free_pages", l.free_pages}, {"total_pages", l.total_pages},
                                  {"ranks_up", l.ranks_up}, {"ranks", l.ranks}});
              }
              nlohmann::json j{{"status", all_up ? "ok" : "degraded"}, {"open_requests", open}, {"groups", groups}};
              out->respond_json(200, j.dump());
            },
            [out](caf::error& err) {
              out->respond_json(503, nlohmann::json{{"status", "unavailable"}, {"error", describe(err)}}.dump());
            });
  } else if (call.method == "GET" && call.path == "/v1/models") {
    call.out->respond_json(200, render_models(st.limits, unix_now()));
  } else if (call.method == "GET" && call.path == "/metrics") {
    call.out->respond(200, metrics::prometheus_content_type, metrics::global_registry().render_prometheus());
  } else if (auto endpoint = endpoint_for_path(call.path)) {
    on_generation(self, *endpoint, call);
  } else {
    respond_error(call.out, api_error{404, "no route " + call.method + " " + call.path, "invalid_request_error"});
  }
}

void resolve_router(gateway_pointer self) {
  auto& st = self->state;
  if (st.router)
    return;
  self->request(st.services, 2s, whereis_atom::value, std::string(router_name))
      .then(
          [self](caf::actor& handle, uint64_t) {
            auto& st = self->state;
            if (st.router)
              return;
            st.router = caf::actor_cast<router_actor>(handle);
            self->monitor(handle);
            // Requests whose router died go to the new one, continuing from the tokens already streamed.
            std::vector<uint64_t> orphans;
            for (auto& [rid, r] : st.open)
              if (r.orphaned)
                orphans.push_back(rid);
            for (auto rid : orphans)
              submit(self, rid);
          },
          [](caf::error&) {});
}

/// A request that arrived while no router ran and still has none after unrouted_wait gets the 503 it
/// would otherwise have had at once (a router that stays down is an outage, not a restart).
void fail_unrouted(gateway_pointer self) {
  auto& st = self->state;
  auto now = clock_type::now();
  for (auto it = st.open.begin(); it != st.open.end();) {
    auto& r = it->second;
    if (!r.orphaned || r.accepted || now - r.started < unrouted_wait) {
      ++it;
      continue;
    }
    auto next = std::next(it);
    respond_error(r.out, api_error::unavailable("the router is not running yet; retry shortly"),
                  {{"Retry-After", "1"}});
    close_request(self, it, "unavailable");
    it = next;
  }
}

gateway_actor::behavior_type gateway_impl(gateway_pointer self, service_context sc, supervisor_actor services) {
  auto& st = self->state;
  st.sc = std::move(sc);
  st.services = std::move(services);
  auto& cfg = *st.sc.cfg;
  // Limits come from the model's own config.json.
  auto model_dir = cfg.model.is_dummy() ? std::filesystem::path(cfg.model.dummy_config).parent_path().string()
                                        : cfg.model.path;
  auto mcfg = model_config::load(std::filesystem::path(model_dir) / "config.json");
  st.limits.served_model_name = cfg.model.served_name;
  st.limits.context_length =
      cfg.model.max_context > 0 ? cfg.model.max_context : static_cast<int>(mcfg.max_position_embeddings);
  st.limits.vocab_size = static_cast<int>(mcfg.vocab_size);
  st.api_key = cfg.gateway.api_key;
  if (!cfg.gateway.api_key_env.empty()) {
    auto* v = std::getenv(cfg.gateway.api_key_env.c_str());
    if (!v || !*v)
      throw std::runtime_error("gateway: gateway.api_key_env names " + cfg.gateway.api_key_env + ", which is not set");
    st.api_key = v;
  }
  // Request ids start from the clock so that a restarted gateway never reuses one the router holds.
  st.next_rid = static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count()) & ~0xfffull;
  transport::http_server_options opts;
  opts.host = cfg.gateway.address.host;
  opts.port = cfg.gateway.address.port;
  opts.threads = cfg.gateway.threads;
  opts.max_body_bytes = static_cast<size_t>(cfg.gateway.max_body_bytes);
  // A restarted gateway takes the port its previous incarnation had (the one the run file shows), even
  // when cluster.yaml says 0 (any free port).
  uint16_t previous = st.sc.gateway_port->load();
  if (opts.port == 0 && previous != 0)
    opts.port = previous;
  st.server = std::make_unique<transport::http_server>(opts);
  auto me = caf::actor_cast<gateway_actor>(self);
  auto forward = [me](const transport::http_request& req, std::shared_ptr<response_stream> out) {
    caf::anon_send(me, http_call{req.method, req.path, req.body, req.header("Authorization"), std::move(out)});
  };
  for (auto* path : {"/v1/completions", "/v1/chat/completions", "/generate"})
    st.server->route("POST", path, forward);
  for (auto* path : {"/health", "/v1/models", "/metrics", "/dashboard", "/dashboard/data"})
    st.server->route("GET", path, forward);
  auto err = st.server->start();
  for (int attempt = 0; err && previous != 0 && attempt < 20; ++attempt) {
    // The old listener may still be closing: try again briefly.
    std::this_thread::sleep_for(50ms);
    err = st.server->start();
  }
  if (err)
    throw std::runtime_error("gateway: " + *err);
  st.sc.gateway_port->store(st.server->port());
  // The listener closes when the state goes (CAF destroys it in on_exit): ~http_server stops it.
  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    if (st.router && dm.source == st.router.address()) {
      st.router = nullptr;
      // Its request table died with it: every open request goes to the router's next incarnation.
      for (auto& [rid, r] : st.open)
        r.orphaned = true;
      // Look the next incarnation up now rather than on the next tick (up to 200 ms away).
      resolve_router(self);
    }
  });
  resolve_router(self);
  self->send(self, tick_atom::value);
  return {
      [self](http_call& call) { on_http(self, call); },
      [self](abort_atom, uint64_t rid) {
        auto& st = self->state;
        auto it = st.open.find(rid);
        if (it == st.open.end())
          return;
        if (st.router)
          self->anon_send(st.router, abort_atom::value, rid);
        close_request(self, it, "aborted");
      },
      [self](tokens_atom, token_event& ev) { on_tokens(self, ev); },
      [self](tick_atom) {
        resolve_router(self);
        fail_unrouted(self);
        // Once a second, turn the supervisors' restart counts into the restarts counter: node
        // processes and their actors ("d0", "d0/rank0") and the head's serving actors ("head/router").
        if (++self->state.ticks % 5 == 0) {
          auto count = [self](const std::string& actor, uint32_t restarts) {
            auto& last = self->state.restarts_seen[actor];
            if (restarts > last)
              serving_metrics().actor_restarts.with({actor}).inc(restarts - last);
            last = std::max(last, restarts);
          };
          self->request(self->state.sc.head, 2s, status_atom::value)
              .then(
                  [count](cluster_status& cs) {
                    for (auto& n : cs.nodes) {
                      count(n.name, n.restarts);
                      for (auto& c : n.children)
                        count(n.name + "/" + c.name, c.restarts);
                    }
                  },
                  [](caf::error&) {});
          self->request(self->state.services, 2s, children_atom::value)
              .then(
                  [count](std::vector<child_status>& children) {
                    for (auto& c : children)
                      count("head/" + c.name, c.restarts);
                  },
                  [](caf::error&) {});
        }
        self->delayed_send(self, 200ms, tick_atom::value);
      },
  };
}

} // namespace

caf::actor spawn_gateway(caf::local_actor* parent, const service_context& sc, const child_context& ctx) {
  return caf::actor_cast<caf::actor>(parent->spawn(gateway_impl, sc, ctx.supervisor));
}

metrics::serving_metrics& serving_metrics() {
  static metrics::serving_metrics instance(metrics::global_registry());
  return instance;
}

void count_group_tokens(const std::string& group, const char* kind, double tokens) {
  static auto& family = metrics::global_registry().add_counter(
      "petrel_group_tokens_total", "Tokens processed per group: input (prefilled) or output (decoded)",
      {"group", "kind"});
  family.with({group, kind}).inc(tokens);
}

std::vector<child_spec> service_children(const service_context& sc) {
  std::vector<child_spec> out;
  for (auto& g : sc.cfg->groups) {
    auto group = g;
    if (g.role == group_role::prefill)
      out.push_back(child_spec{prefill_scheduler_name(g.name), restart_type::permanent,
                               [sc, group](caf::local_actor* p, const child_context& ctx) {
                                 return spawn_prefill_scheduler(p, sc, group, ctx);
                               },
                               "prefill scheduler"});
    else
      out.push_back(child_spec{decode_scheduler_name(g.name), restart_type::permanent,
                               [sc, group](caf::local_actor* p, const child_context& ctx) {
                                 return spawn_decode_scheduler(p, sc, group, ctx);
                               },
                               "decode scheduler"});
  }
  for (auto& g : sc.cfg->groups)
    if (g.ep_size > 1) {
      auto group = g;
      out.push_back(child_spec{eplb_rebalancer_name(g.name), restart_type::permanent,
                               [sc, group](caf::local_actor* p, const child_context& ctx) {
                                 return spawn_eplb_rebalancer(p, sc, group, ctx);
                               },
                               "EPLB rebalancer"});
    }
  out.push_back(child_spec{router_name, restart_type::permanent,
                           [sc](caf::local_actor* p, const child_context& ctx) { return spawn_router(p, sc, ctx); },
                           "router"});
  out.push_back(child_spec{gateway_name, restart_type::permanent,
                           [sc](caf::local_actor* p, const child_context& ctx) { return spawn_gateway(p, sc, ctx); },
                           "gateway (HTTP)"});
  return out;
}

} // namespace petrel
