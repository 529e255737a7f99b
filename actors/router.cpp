// router: picks a decode group (which reserves the KV pages) and then a prefill group for every
// request, tracks it until done, streams its tokens to the submitter, and migrates it when a part
// of its path fails: re-prefill from prompt + tokens already emitted, so the stream goes on and
// greedy output is the same as without the fault.
#include <deque>
#include <map>

#include <caf/all.hpp>

#include "actors/serving.hpp"
#include "runtime/metrics.hpp"

namespace petrel {

namespace {

using namespace std::chrono_literals;

struct routed_request {
  serve_request request;
  gateway_actor submitter;
  std::vector<int32_t> emitted;
  int migrations = 0;
  std::string decode_group;  // where its KV is reserved ("" while waiting)
  std::string prefill_group;
  bool dispatching = false;
  bool streaming = false; // a token arrived in this attempt: its prefill is done
  caf::actor_clock::time_point not_before{}; // migration backoff
};

struct router_state {
  static inline const char* name = "petrel.router";

  service_context sc;
  supervisor_actor services;
  std::map<uint64_t, routed_request> requests;
  std::deque<uint64_t> waiting; // admitted by nobody yet
  std::map<std::string, decode_scheduler_actor> decoders;
  std::map<std::string, prefill_scheduler_actor> prefillers;
  std::map<std::string, int> active; // requests per group, for least-loaded choices
  int max_queued = 256;
  int max_migrations = 5;
};

using router_pointer = router_actor::stateful_pointer<router_state>;

void dispatch_waiting(router_pointer self);

void finish(router_pointer self, uint64_t rid, const std::string& error) {
  auto& st = self->state;
  auto it = st.requests.find(rid);
  if (it == st.requests.end())
    return;
  auto& r = it->second;
  if (!error.empty())
    self->anon_send(r.submitter, tokens_atom::value, token_event{rid, {}, true, error});
  if (!r.decode_group.empty())
    st.active[r.decode_group]--;
  if (!r.prefill_group.empty())
    st.active[r.prefill_group]--;
  st.requests.erase(it);
}

/// Group names ordered by fewest active requests.
std::vector<std::string> least_loaded(router_pointer self, group_role role) {
  auto& st = self->state;
  std::vector<std::string> names;
  for (auto* g : st.sc.cfg->groups_with(role))
    names.push_back(g->name);
  std::stable_sort(names.begin(), names.end(),
                   [&](auto& a, auto& b) { return st.active[a] < st.active[b]; });
  return names;
}

void try_decode_groups(router_pointer self, uint64_t rid, std::vector<std::string> candidates, size_t next);

void send_prefill(router_pointer self, uint64_t rid, kv_destination dest) {
  auto& st = self->state;
  auto it = st.requests.find(rid);
  if (it == st.requests.end()) {
    // Aborted while the decode side reserved pages: give them back.
    if (auto d = st.decoders.find(dest.decode_group); d != st.decoders.end())
      self->anon_send(d->second, abort_atom::value, rid);
    return;
  }
  auto& r = it->second;
  r.decode_group = dest.decode_group;
  st.active[r.decode_group]++;
  auto pgroup = least_loaded(self, group_role::prefill).front();
  auto p = st.prefillers.find(pgroup);
  if (p == st.prefillers.end()) {
    r.dispatching = false;
    self->anon_send(caf::actor_cast<router_actor>(self), failed_atom::value,
                    request_failure{rid, pgroup, "prefill scheduler not resolved yet", true});
    return;
  }
  r.prefill_group = pgroup;
  st.active[pgroup]++;
  std::vector<int32_t> tokens = r.request.prompt;
  tokens.insert(tokens.end(), r.emitted.begin(), r.emitted.end());
  prefill_job job{rid, std::move(tokens), static_cast<int32_t>(r.emitted.size()), r.request.sampling, std::move(dest)};
  self->request(p->second, 10s, prefill_atom::value, std::move(job))
      .then([self, rid](caf::ok_atom) {
              if (auto it = self->state.requests.find(rid); it != self->state.requests.end())
                it->second.dispatching = false;
            },
            [self, rid, pgroup](caf::error& err) {
              self->anon_send(caf::actor_cast<router_actor>(self), failed_atom::value,
                              request_failure{rid, pgroup, describe(err), true});
            });
}

void try_decode_groups(router_pointer self, uint64_t rid, std::vector<std::string> candidates, size_t next) {
  auto& st = self->state;
  auto it = st.requests.find(rid);
  if (it == st.requests.end())
    return;
  auto& r = it->second;
  if (next >= candidates.size()) {
    // Nobody has room now: wait (admission control), in arrival order.
    r.dispatching = false;
    st.waiting.push_back(rid);
    return;
  }
  auto d = st.decoders.find(candidates[next]);
  if (d == st.decoders.end()) {
    try_decode_groups(self, rid, std::move(candidates), next + 1);
    return;
  }
  decode_admission a;
  a.rid = rid;
  a.tokens = r.request.prompt;
  a.tokens.insert(a.tokens.end(), r.emitted.begin(), r.emitted.end());
  a.generated = static_cast<int32_t>(r.emitted.size());
  a.max_new_tokens = r.request.max_new_tokens - a.generated;
  a.sampling = r.request.sampling;
  a.stop_ids = r.request.stop_ids;
  self->request(d->second, 10s, admit_atom::value, std::move(a))
      .then([self, rid](kv_destination& dest) { send_prefill(self, rid, std::move(dest)); },
            [self, rid, candidates, next](caf::error& err) {
              if (err.category() == caf::atom("petrel") &&
                  err.code() == static_cast<uint8_t>(petrel_errc::bad_request)) {
                finish(self, rid, describe(err));
                return;
              }
              try_decode_groups(self, rid, candidates, next + 1);
            });
}

void dispatch(router_pointer self, uint64_t rid) {
  auto it = self->state.requests.find(rid);
  if (it == self->state.requests.end() || it->second.dispatching)
    return;
  it->second.dispatching = true;
  try_decode_groups(self, rid, least_loaded(self, group_role::decode), 0);
}

void dispatch_waiting(router_pointer self) {
  auto& st = self->state;
  auto now = self->clock().now();
  std::deque<uint64_t> later;
  auto waiting = std::move(st.waiting);
  st.waiting.clear();
  for (auto rid : waiting) {
    auto it = st.requests.find(rid);
    if (it == st.requests.end())
      continue;
    if (it->second.not_before > now)
      later.push_back(rid);
    else
      dispatch(self, rid);
  }
  for (auto rid : later)
    st.waiting.push_back(rid);
}

/// Resolves the schedulers by name through the service supervisor (again after they restart).
void resolve_schedulers(router_pointer self) {
  auto& st = self->state;
  for (auto& g : st.sc.cfg->groups) {
    bool prefill = g.role == group_role::prefill;
    if (prefill ? st.prefillers.count(g.name) : st.decoders.count(g.name))
      continue;
    auto name = prefill ? prefill_scheduler_name(g.name) : decode_scheduler_name(g.name);
    self->request(st.services, 2s, whereis_atom::value, name)
        .then(
            [self, prefill, group = g.name](caf::actor& handle, uint64_t) {
              auto& st = self->state;
              self->monitor(handle);
              if (prefill)
                st.prefillers[group] = caf::actor_cast<prefill_scheduler_actor>(handle);
              else
                st.decoders[group] = caf::actor_cast<decode_scheduler_actor>(handle);
            },
            [](caf::error&) {});
  }
}

router_actor::behavior_type router_impl(router_pointer self, service_context sc, supervisor_actor services) {
  auto& st = self->state;
  st.sc = std::move(sc);
  st.services = std::move(services);
  st.max_queued = st.sc.cfg->gateway.max_queued;
  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    // A scheduler that died took its queue with it: every request it held starts over (a migration),
    // on a restarted incarnation or another group. A prefill scheduler's death only matters to
    // requests still in prefill; a decode scheduler's to every request placed on its group.
    auto migrate = [self](const std::string& group, bool prefill) {
      std::vector<uint64_t> lost;
      for (auto& [rid, r] : self->state.requests)
        if (prefill ? (r.prefill_group == group && !r.streaming) : r.decode_group == group)
          lost.push_back(rid);
      for (auto rid : lost)
        self->anon_send(caf::actor_cast<router_actor>(self), failed_atom::value,
                        request_failure{rid, group, std::string(prefill ? "prefill" : "decode") +
                                                        " scheduler went down", true});
    };
    for (auto it = st.prefillers.begin(); it != st.prefillers.end(); ++it)
      if (it->second.address() == dm.source) {
        auto group = it->first;
        st.prefillers.erase(it);
        migrate(group, true);
        break;
      }
    for (auto it = st.decoders.begin(); it != st.decoders.end(); ++it)
      if (it->second.address() == dm.source) {
        auto group = it->first;
        st.decoders.erase(it);
        migrate(group, false);
        break;
      }
  });
  resolve_schedulers(self);
  self->send(self, tick_atom::value);
  return {
      [self](submit_atom, serve_request& req) -> caf::result<caf::ok_atom> {
        auto& st = self->state;
        if (static_cast<int>(st.waiting.size()) >= st.max_queued)
          return make_error(petrel_errc::overloaded, std::to_string(st.waiting.size()) +
                                                         " requests are already waiting for capacity");
        auto rid = req.rid;
        if (st.requests.count(rid))
          return make_error(petrel_errc::bad_request, "request id " + std::to_string(rid) + " is in use");
        routed_request r;
        r.emitted = std::move(req.emitted); // a resubmission after a router restart continues from here
        r.request = std::move(req);
        r.submitter = caf::actor_cast<gateway_actor>(self->current_sender());
        st.requests.emplace(rid, std::move(r));
        dispatch(self, rid);
        return caf::ok_atom::value;
      },
      [self](tokens_atom, token_event& ev) {
        auto& st = self->state;
        auto it = st.requests.find(ev.rid);
        if (it == st.requests.end())
          return;
        auto& r = it->second;
        r.streaming = true;
        r.emitted.insert(r.emitted.end(), ev.ids.begin(), ev.ids.end());
        self->anon_send(r.submitter, tokens_atom::value, ev);
        if (ev.finished) {
          finish(self, ev.rid, {});
          dispatch_waiting(self);
        }
      },
      [self](failed_atom, request_failure& f) {
        auto& st = self->state;
        auto it = st.requests.find(f.rid);
        if (it == st.requests.end())
          return;
        auto& r = it->second;
        // Release whatever the request holds, then start it over from prompt + emitted tokens.
        if (auto d = st.decoders.find(r.decode_group); d != st.decoders.end())
          self->anon_send(d->second, abort_atom::value, f.rid);
        if (auto p = st.prefillers.find(r.prefill_group); p != st.prefillers.end())
          self->anon_send(p->second, abort_atom::value, f.rid);
        if (!r.decode_group.empty())
          st.active[r.decode_group]--;
        if (!r.prefill_group.empty())
          st.active[r.prefill_group]--;
        r.decode_group.clear();
        r.prefill_group.clear();
        r.dispatching = false;
        r.streaming = false;
        if (!f.retryable || ++r.migrations > st.max_migrations) {
          finish(self, f.rid,
                 "request failed after " + std::to_string(r.migrations) + " migrations: " + f.where + ": " + f.reason);
          return;
        }
        // Give supervisors a moment to restart what failed before trying again.
        // Exponential backoff (100 ms, 200 ms, 400 ms, ...) rides out partitions and restarts.
        r.not_before = self->clock().now() + std::chrono::milliseconds(100 << std::min(r.migrations - 1, 6));
        st.waiting.push_back(f.rid);
      },
      [self](abort_atom, uint64_t rid) {
        auto& st = self->state;
        auto it = st.requests.find(rid);
        if (it == st.requests.end())
          return;
        if (auto d = st.decoders.find(it->second.decode_group); d != st.decoders.end())
          self->anon_send(d->second, abort_atom::value, rid);
        if (auto p = st.prefillers.find(it->second.prefill_group); p != st.prefillers.end())
          self->anon_send(p->second, abort_atom::value, rid);
        finish(self, rid, {});
        dispatch_waiting(self);
      },
      [self](load_atom) -> caf::result<std::vector<group_load>> {
        auto& st = self->state;
        auto rp = self->make_response_promise<std::vector<group_load>>();
        auto acc = std::make_shared<std::vector<group_load>>();
        auto remaining = std::make_shared<size_t>(st.prefillers.size() + st.decoders.size());
        if (*remaining == 0) {
          rp.deliver(*acc);
          return rp;
        }
        auto collect = [rp, acc, remaining](group_load l) mutable {
          acc->push_back(std::move(l));
          if (--*remaining == 0)
            rp.deliver(*acc);
        };
        auto skip = [rp, acc, remaining](caf::error&) mutable {
          if (--*remaining == 0)
            rp.deliver(*acc);
        };
        for (auto& [name, p] : st.prefillers)
          self->request(p, 2s, load_atom::value).then(collect, skip);
        for (auto& [name, d] : st.decoders)
          self->request(d, 2s, load_atom::value).then(collect, skip);
        return rp;
      },
      [self](tick_atom) {
        resolve_schedulers(self);
        dispatch_waiting(self);
        self->delayed_send(self, 50ms, tick_atom::value);
      },
  };
}

} // namespace

caf::actor spawn_router(caf::local_actor* parent, const service_context& sc, const child_context& ctx) {
  return caf::actor_cast<caf::actor>(parent->spawn(router_impl, sc, ctx.supervisor));
}

} // namespace petrel
