// decode_scheduler: reserves KV pages before the transfer (so a transferred request always fits),
// then continuous batching: every step sends each rank its running requests (DP attention), and
// requests join and leave at every step.
#include <map>

#include <caf/all.hpp>

#include "actors/rank_slots.hpp"
#include "actors/serving.hpp"
#include "runtime/metrics.hpp"

namespace petrel {

namespace {

using namespace std::chrono_literals;

struct decode_entry {
  decode_admission admission;
  size_t rank = 0;
  uint64_t rank_epoch = 0;
  std::vector<int32_t> pages;
  bool running = false;     // KV arrived
  bool in_step = false;     // part of the step in flight
  bool aborted = false;
  int64_t pos = 0;          // tokens in the cache
  int32_t last_token = 0;   // next input token
  int32_t generated = 0;    // output position of the next token
  caf::actor_clock::time_point reserved_at;
  caf::actor_addr owner;    // the router incarnation that placed it
  uint64_t placement = 0;   // tells this reservation from a later one of the same request id
  bool verifying = false;   // KV arrived; its pages are being checked against the sender's CRCs
};

struct decode_state {
  static inline const char* name = "petrel.decode_scheduler";

  service_context sc;
  group_section group;
  std::vector<rank_slot> slots;
  std::map<uint64_t, decode_entry> requests;
  ep_lockstep ep;
  router_actor router;
  caf::timespan reservation_timeout = std::chrono::seconds(60);
  // Pages reserved for a request whose KV never arrived may still be written by a transfer in
  // flight (or one that timed out on the sender): they rest here until no transfer can touch them.
  struct quarantined {
    size_t rank;
    uint64_t rank_epoch;
    std::vector<int32_t> pages;
    caf::actor_clock::time_point until;
  };
  std::vector<quarantined> quarantine;
  // The sender's page checksums by request id (transport.kv_checksum), waiting for the kv_ready.
  struct received_digest {
    kv_digest digest;
    caf::actor_clock::time_point at;
  };
  std::map<uint64_t, received_digest> digests;
  uint64_t next_placement = 1;
};

using decode_pointer = decode_scheduler_actor::stateful_pointer<decode_state>;

void free_entry(decode_pointer self, std::map<uint64_t, decode_entry>::iterator it) {
  auto& st = self->state;
  auto& e = it->second;
  auto& slot = st.slots[e.rank];
  if (slot.pages && slot.epoch() == e.rank_epoch && !e.pages.empty()) {
    if (e.running)
      slot.pages->free(e.pages);
    else
      st.quarantine.push_back({e.rank, e.rank_epoch, std::move(e.pages),
                               self->clock().now() + st.sc.cfg->transport.kv_timeout + std::chrono::seconds(1)});
  }
  st.requests.erase(it);
}

void release_quarantine(decode_pointer self) {
  auto& st = self->state;
  auto now = self->clock().now();
  auto keep = st.quarantine.begin();
  for (auto& q : st.quarantine) {
    if (q.until > now) {
      *keep++ = std::move(q);
      continue;
    }
    auto& slot = st.slots[q.rank];
    if (slot.pages && slot.epoch() == q.rank_epoch)
      slot.pages->free(q.pages);
  }
  st.quarantine.erase(keep, st.quarantine.end());
}

void fail(decode_pointer self, uint64_t rid, const std::string& where, const std::string& reason) {
  auto& st = self->state;
  auto it = st.requests.find(rid);
  if (it == st.requests.end())
    return;
  bool aborted = it->second.aborted;
  free_entry(self, it);
  if (!aborted && st.router)
    self->anon_send(st.router, failed_atom::value, request_failure{rid, where, reason, true});
}

/// Drops a request without telling the router (it asked, or it is gone). Pages a step in flight may
/// still write are freed when that step returns.
void abort_request(decode_pointer self, uint64_t rid) {
  auto& st = self->state;
  auto it = st.requests.find(rid);
  if (it == st.requests.end())
    return;
  if (it->second.in_step)
    it->second.aborted = true;
  else
    free_entry(self, it);
}

/// Emits `token` for the request; true when the request is finished.
bool emit(decode_pointer self, decode_entry& e, int32_t token);

void update_gauges(decode_pointer self);
void schedule(decode_pointer self);

/// Counts the checks of arrived KV against the sender's checksums, by result (ok, mismatch, missing).
metrics::counter& kv_checks(const char* result) {
  static auto& family = metrics::global_registry().add_counter(
      "petrel_kv_checksum_checks_total",
      "Checks of arrived KV pages against the sender's CRC32C: ok, mismatch, missing or error (the last three are re-prefilled)", {"result"});
  return family.with({result});
}

/// The request's KV is in place (and checked): it joins the running batch with its first token.
void start_running(decode_pointer self, std::map<uint64_t, decode_entry>::iterator it, int32_t first_token) {
  auto& e = it->second;
  e.running = true;
  e.pos = static_cast<int64_t>(e.admission.tokens.size());
  e.last_token = first_token;
  e.generated = e.admission.generated;
  if (emit(self, e, first_token))
    free_entry(self, it);
  update_gauges(self);
  schedule(self);
}

/// Emits `token` for the request; true when the request is finished.
bool emit(decode_pointer self, decode_entry& e, int32_t token) {
  auto& a = e.admission;
  ++e.generated;
  bool stop = std::find(a.stop_ids.begin(), a.stop_ids.end(), token) != a.stop_ids.end();
  bool finished = stop || e.generated >= a.generated + a.max_new_tokens;
  count_group_tokens(self->state.group.name, "output", 1);
  if (self->state.router)
    self->anon_send(self->state.router, tokens_atom::value, token_event{a.rid, {token}, finished, {}});
  return finished;
}

void update_gauges(decode_pointer self) {
  auto& st = self->state;
  int running = 0;
  for (auto& [rid, e] : st.requests)
    running += e.running;
  serving_metrics().running_requests.with({st.group.name}).set(running);
  serving_metrics().queue_depth.with({st.group.name}).set(static_cast<double>(st.requests.size()) - running);
}

void schedule(decode_pointer self) {
  auto& st = self->state;
  if (!ep_can_step(self, [self] { schedule(self); }))
    return;
  // One step per idle rank. An expert-parallel group steps all its ranks together (empty steps included) or none.
  std::vector<std::pair<forward_step, std::vector<uint64_t>>> plan(st.slots.size());
  bool any = false;
  for (size_t r = 0; r < st.slots.size(); ++r) {
    auto& slot = st.slots[r];
    if (!slot.up() || slot.in_flight)
      continue;
    auto& [step, rids] = plan[r];
    step.epoch = slot.epoch();
    for (auto& [rid, e] : st.requests) {
      if (e.rank != r || !e.running || e.aborted || e.rank_epoch != slot.epoch())
        continue;
      step_item item;
      item.rid = rid;
      item.tokens = {e.last_token};
      item.start_pos = e.pos;
      item.pages = e.pages;
      item.sample = true;
      item.position = e.generated;
      item.sampling = e.admission.sampling;
      step.items.push_back(std::move(item));
      rids.push_back(rid);
    }
    any = any || !rids.empty();
  }
  if (!any)
    return;
  for (size_t r = 0; r < st.slots.size(); ++r) {
    auto& slot = st.slots[r];
    auto& [step, rids] = plan[r];
    if (!slot.up() || slot.in_flight || (rids.empty() && !st.ep.enabled))
      continue;
    for (auto rid : rids)
      st.requests[rid].in_step = true;
    slot.in_flight = true;
    auto epoch = slot.epoch();
    self->request(slot.handle, 60s, forward_atom::value, std::move(step))
        .then(
            [self, r, rids](step_output& out) {
              auto& st = self->state;
              st.slots[r].in_flight = false;
              for (size_t i = 0; i < rids.size(); ++i) {
                auto it = st.requests.find(rids[i]);
                if (it == st.requests.end())
                  continue;
                auto& e = it->second;
                if (!e.in_step)
                  continue; // a newer placement of the same request id, not part of this step
                e.in_step = false;
                if (e.aborted) {
                  free_entry(self, it);
                  continue;
                }
                e.pos += 1;
                e.last_token = out.tokens[i];
                if (emit(self, e, out.tokens[i]))
                  free_entry(self, it);
              }
              update_gauges(self);
              schedule(self);
            },
            [self, r, rids, epoch](caf::error& err) {
              auto& st = self->state;
              if (st.slots[r].epoch() == epoch)
                st.slots[r].in_flight = false;
              if (st.ep.enabled)
                st.ep.broken = true; // the group re-forms before its next step
              for (auto rid : rids)
                fail(self, rid, st.slots[r].label(), "decode step failed: " + describe(err));
              schedule(self);
            });
  }
}

decode_scheduler_actor::behavior_type decode_impl(decode_pointer self, service_context sc, group_section group) {
  auto& st = self->state;
  st.sc = std::move(sc);
  st.group = std::move(group);
  st.slots = make_rank_slots(*st.sc.cfg, st.group);
  st.ep.enabled = st.group.ep_size > 1;
  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    if (auto r = rank_went_down(self, dm.source)) {
      std::vector<uint64_t> lost;
      for (auto& [rid, e] : st.requests)
        if (e.rank == *r)
          lost.push_back(rid);
      for (auto rid : lost)
        fail(self, rid, st.slots[*r].label(), "rank went down: " + describe(dm.reason));
      update_gauges(self);
    } else {
      // A router died: its request table is gone, so are its requests here (the gateway resubmits
      // them to the next router, which places them afresh).
      std::vector<uint64_t> orphans;
      for (auto& [rid, e] : st.requests)
        if (e.owner == dm.source)
          orphans.push_back(rid);
      for (auto rid : orphans)
        abort_request(self, rid);
      if (st.router && dm.source == st.router.address())
        st.router = nullptr;
      update_gauges(self);
    }
  });
  self->send(self, tick_atom::value);
  return {
      [self](admit_atom, decode_admission& a) -> caf::result<kv_destination> {
        auto& st = self->state;
        // Tokens go to the router that placed the latest request (a restarted router replaces the old one).
        auto sender = caf::actor_cast<router_actor>(self->current_sender());
        if (sender && sender != st.router) {
          st.router = sender;
          self->monitor(sender);
        }
        auto t0 = std::chrono::steady_clock::now();
        int64_t total = static_cast<int64_t>(a.tokens.size()) + a.max_new_tokens;
        // DP attention: the request lives on one rank; pick the one with the most free pages.
        std::optional<size_t> best;
        std::vector<int> per_rank(st.slots.size(), 0);
        for (auto& [rid, e] : st.requests)
          per_rank[e.rank]++;
        for (size_t r = 0; r < st.slots.size(); ++r) {
          auto& s = st.slots[r];
          if (!s.up())
            continue;
          if (total > s.info.max_context)
            return make_error(petrel_errc::bad_request, "prompt + max_tokens = " + std::to_string(total) +
                                                            " exceeds the context of " +
                                                            std::to_string(s.info.max_context));
          if (pages_for_tokens(total, s.info.page_size) > s.info.num_pages)
            return make_error(petrel_errc::bad_request,
                              "prompt + max_tokens = " + std::to_string(total) + " tokens needs " +
                                  std::to_string(pages_for_tokens(total, s.info.page_size)) +
                                  " KV pages; a decode rank has " + std::to_string(s.info.num_pages));
          if (per_rank[r] >= st.group.max_running ||
              s.pages->free_count() < pages_for_tokens(total, s.info.page_size))
            continue;
          if (!best || s.pages->free_count() > st.slots[*best].pages->free_count())
            best = r;
        }
        if (!best)
          return make_error(petrel_errc::overloaded, "decode group '" + st.group.name + "' has no room");
        auto& s = st.slots[*best];
        auto pages = s.pages->allocate(pages_for_tokens(total, s.info.page_size));
        if (auto old = st.requests.find(a.rid); old != st.requests.end()) {
          // An earlier placement of the same request, by a router that died. Its pages may still be
          // written by a step or a transfer in flight, so they rest in quarantine rather than being reused.
          old->second.running = false;
          free_entry(self, old);
        }
        decode_entry e;
        e.owner = caf::actor_cast<caf::actor_addr>(self->current_sender());
        e.admission = std::move(a);
        e.rank = *best;
        e.rank_epoch = s.epoch();
        e.pages = std::move(*pages);
        e.reserved_at = self->clock().now();
        e.placement = st.next_placement++;
        kv_destination dest{e.admission.rid, st.group.name, s.node, static_cast<uint32_t>(*best), s.epoch(), e.pages,
                            s.info.pool, s.info.page_bytes, caf::actor_cast<caf::actor>(self),
                            st.sc.cfg->transport.kv_checksum};
        st.requests[e.admission.rid] = std::move(e);
        serving_metrics().kv_transfer.with({"allocation"}).observe(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        update_gauges(self);
        return dest;
      },
      [self](ready_atom, kv_ready& ready) {
        auto& st = self->state;
        auto it = st.requests.find(ready.rid);
        if (it == st.requests.end())
          return; // aborted meanwhile; its pages are already free
        auto& e = it->second;
        if (ready.rank_epoch != e.rank_epoch || st.slots[e.rank].epoch() != e.rank_epoch) {
          // The pages belong to an incarnation that is gone: never read them.
          fail(self, ready.rid, st.slots[e.rank].label(), "KV arrived for a stale incarnation");
          return;
        }
        if (e.aborted) {
          free_entry(self, it);
          return;
        }
        if (!st.sc.cfg->transport.kv_checksum) {
          start_running(self, it, ready.first_token);
          return;
        }
        if (e.verifying)
          return; // a duplicate kv_ready
        // The pages are read only after they match the sender's checksums; a mismatch (or no digest)
        // is a failure the router turns into a re-prefill, never garbage in the batch.
        auto d = st.digests.find(ready.rid);
        bool matches = d != st.digests.end() && d->second.digest.rank_epoch == e.rank_epoch &&
                       d->second.digest.pages.size() <= e.pages.size() &&
                       std::equal(d->second.digest.pages.begin(), d->second.digest.pages.end(), e.pages.begin());
        if (!matches) {
          kv_checks("missing").inc();
          fail(self, ready.rid, st.slots[e.rank].label(), "KV arrived without the sender's page checksums");
          return;
        }
        auto& slot = st.slots[e.rank];
        if (!slot.agent) {
          fail(self, ready.rid, slot.label(), "no kv_agent on node " + slot.node + " to check the KV pages");
          return;
        }
        kv_check check{slot.info.pool, d->second.digest.page_bytes, std::move(d->second.digest.pages),
                       std::move(d->second.digest.crc)};
        st.digests.erase(d);
        e.verifying = true;
        auto placement = e.placement;
        auto rid = ready.rid;
        auto first_token = ready.first_token;
        self->request(slot.agent, 10s, verify_atom::value, std::move(check))
            .then(
                [self, rid, placement, first_token](caf::ok_atom) {
                  auto& st = self->state;
                  auto it = st.requests.find(rid);
                  if (it == st.requests.end() || it->second.placement != placement)
                    return;
                  it->second.verifying = false;
                  kv_checks("ok").inc();
                  if (it->second.aborted || st.slots[it->second.rank].epoch() != it->second.rank_epoch) {
                    fail(self, rid, st.slots[it->second.rank].label(), "the rank changed while its KV was checked");
                    return;
                  }
                  start_running(self, it, first_token);
                },
                [self, rid, placement](caf::error& err) {
                  auto& st = self->state;
                  auto it = st.requests.find(rid);
                  if (it == st.requests.end() || it->second.placement != placement)
                    return;
                  it->second.verifying = false;
                  kv_checks(err.category() == caf::atom("petrel") &&
                                    err.code() == static_cast<uint8_t>(petrel_errc::kv_corrupt)
                                ? "mismatch"
                                : "error")
                      .inc();
                  fail(self, rid, st.slots[it->second.rank].label() + "/kv_agent",
                       "KV check failed: " + describe(err));
                });
      },
      [self](digest_atom, kv_digest& digest) {
        auto& st = self->state;
        auto rid = digest.rid;
        st.digests[rid] = {std::move(digest), self->clock().now()};
      },
      [self](abort_atom, uint64_t rid) {
        abort_request(self, rid);
        update_gauges(self);
      },
      [self](rebalance_atom, bool trigger) { return ep_request_rebalance(self, trigger); },
      [self](load_atom) {
        auto& st = self->state;
        group_load l{st.group.name, 0, 0, 0, 0, 0, static_cast<int32_t>(st.slots.size())};
        for (auto& [rid, e] : st.requests)
          (e.running ? l.running : l.queued)++;
        // Quarantined pages count as free: they come back by themselves, no request holds them.
        for (auto& q : st.quarantine)
          if (st.slots[q.rank].up() && st.slots[q.rank].epoch() == q.rank_epoch)
            l.free_pages += static_cast<int32_t>(q.pages.size());
        count_rank_capacity(st.slots, l);
        return l;
      },
      [self](tick_atom) {
        auto& st = self->state;
        resolve_ranks(self, st.sc.head, [self](size_t) { schedule(self); });
        // A reservation whose KV never came (prefill side died, message lost) is released.
        auto now = self->clock().now();
        std::vector<uint64_t> expired;
        for (auto& [rid, e] : st.requests)
          if (!e.running && now - e.reserved_at > st.reservation_timeout)
            expired.push_back(rid);
        for (auto rid : expired)
          fail(self, rid, st.group.name, "the KV transfer did not arrive in time");
        // Digests of shipments that never led to a kv_ready (request aborted or failed meanwhile).
        for (auto d = st.digests.begin(); d != st.digests.end();)
          d = now - d->second.at > st.reservation_timeout ? st.digests.erase(d) : std::next(d);
        release_quarantine(self);
        self->delayed_send(self, 200ms, tick_atom::value);
      },
  };
}

} // namespace

caf::actor spawn_decode_scheduler(caf::local_actor* parent, const service_context& sc, const group_section& group,
                                  const child_context&) {
  return caf::actor_cast<caf::actor>(parent->spawn(decode_impl, sc, group));
}

} // namespace petrel
