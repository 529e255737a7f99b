// prefill_scheduler: chunked prefill with a token budget, batched across requests, one step per
// rank at a time; then the KV pages go to the decode side through the rank's node kv_agent.
#include <deque>
#include <map>

#include <caf/all.hpp>

#include "actors/rank_slots.hpp"
#include "actors/serving.hpp"
#include "runtime/metrics.hpp"

namespace petrel {

namespace {

using namespace std::chrono_literals;

struct prefill_entry {
  prefill_job job;
  uint64_t job_id = 0;       // unique per attempt: a late answer for an earlier attempt of the rid is ignored
  size_t rank = 0;
  std::vector<int32_t> pages;
  int64_t done = 0;          // tokens whose KV is computed
  bool shipping = false;
  bool aborted = false;
  caf::actor_clock::time_point queued;
  caf::actor_addr owner;     // the router incarnation that sent it
};

struct prefill_state {
  static inline const char* name = "petrel.prefill_scheduler";

  service_context sc;
  group_section group;
  std::vector<rank_slot> slots;
  std::map<uint64_t, prefill_entry> jobs;
  std::deque<uint64_t> order; // FIFO of rids
  ep_lockstep ep;
  router_actor router;
  uint64_t next_job_id = 1;
};

using prefill_pointer = prefill_scheduler_actor::stateful_pointer<prefill_state>;

void schedule(prefill_pointer self);

void fail(prefill_pointer self, uint64_t rid, const std::string& where, const std::string& reason) {
  auto& st = self->state;
  auto it = st.jobs.find(rid);
  if (it == st.jobs.end())
    return;
  auto& e = it->second;
  auto& slot = st.slots[e.rank];
  if (slot.pages && !e.pages.empty())
    slot.pages->free(e.pages);
  bool aborted = e.aborted;
  st.jobs.erase(it);
  if (!aborted && st.router)
    self->anon_send(st.router, failed_atom::value, request_failure{rid, where, reason, true});
}

void finish(prefill_pointer self, uint64_t rid);

/// Drops a job without telling the router. A step or shipment in flight may still write its pages:
/// they are freed when it returns.
void abort_job(prefill_pointer self, uint64_t rid) {
  auto& st = self->state;
  auto it = st.jobs.find(rid);
  if (it == st.jobs.end())
    return;
  auto& slot = st.slots[it->second.rank];
  if (slot.in_flight || it->second.shipping)
    it->second.aborted = true;
  else
    finish(self, rid);
}

void finish(prefill_pointer self, uint64_t rid) {
  auto& st = self->state;
  auto it = st.jobs.find(rid);
  if (it == st.jobs.end())
    return;
  auto& slot = st.slots[it->second.rank];
  if (slot.pages && !it->second.pages.empty())
    slot.pages->free(it->second.pages);
  st.jobs.erase(it);
}

/// The rank with the fewest queued tokens among those that run (any rank when none runs).
size_t pick_rank(prefill_pointer self) {
  auto& st = self->state;
  std::vector<int64_t> load(st.slots.size(), 0);
  for (auto& [rid, e] : st.jobs)
    load[e.rank] += static_cast<int64_t>(e.job.tokens.size()) - e.done;
  size_t best = 0;
  bool best_up = false;
  for (size_t i = 0; i < st.slots.size(); ++i) {
    bool up = st.slots[i].up();
    if ((up && !best_up) || (up == best_up && load[i] < load[best])) {
      best = i;
      best_up = up;
    }
  }
  return best;
}

void ship(prefill_pointer self, uint64_t rid, int32_t token) {
  auto& st = self->state;
  auto& e = st.jobs.at(rid);
  auto& slot = st.slots[e.rank];
  e.shipping = true;
  auto& dest = e.job.destination;
  if (!slot.agent) {
    fail(self, rid, slot.label(), "no kv_agent on node " + slot.node);
    return;
  }
  if (dest.page_bytes != slot.info.page_bytes) {
    fail(self, rid, slot.label(),
         "KV page size differs between prefill (" + std::to_string(slot.info.page_bytes) + " B) and decode (" +
             std::to_string(dest.page_bytes) + " B); use the same page_size in every group");
    return;
  }
  auto needed = pages_for_tokens(static_cast<int64_t>(e.job.tokens.size()), slot.info.page_size);
  kv_shipment shipment{rid, dest.rank_epoch, slot.info.pool_id,
                       std::vector<int32_t>(e.pages.begin(), e.pages.begin() + needed), slot.info.page_bytes, dest};
  auto job_id = e.job_id;
  self->request(slot.agent, 30s, ship_atom::value, shipment)
      .then(
          [self, rid, token, job_id](kv_receipt& receipt) {
            auto& st = self->state;
            auto it = st.jobs.find(rid);
            if (it == st.jobs.end() || it->second.job_id != job_id)
              return;
            auto& m = serving_metrics();
            m.kv_transfer.with({"bootstrap"}).observe(receipt.bootstrap);
            m.kv_transfer.with({"transfer"}).observe(receipt.transfer);
            m.kv_transfer_bytes.get().inc(static_cast<double>(receipt.bytes));
            m.kv_transfers.with({receipt.path.empty() ? "ucx" : receipt.path}).inc();
            count_group_tokens(st.group.name, "input", static_cast<double>(it->second.job.tokens.size()));
            auto dest = it->second.job.destination;
            bool aborted = it->second.aborted;
            finish(self, rid);
            if (!aborted)
              self->anon_send(caf::actor_cast<decode_scheduler_actor>(dest.decode_scheduler), ready_atom::value,
                              kv_ready{rid, token, dest.rank_epoch});
            schedule(self);
          },
          [self, rid, job_id](caf::error& err) {
            auto& st = self->state;
            auto it = st.jobs.find(rid);
            if (it == st.jobs.end() || it->second.job_id != job_id)
              return;
            fail(self, rid, st.slots[it->second.rank].label() + "/kv_agent", describe(err));
            schedule(self);
          });
}

struct chunk_ref {
  uint64_t rid;
  uint64_t job_id;
  int64_t tokens;
};

void on_step_done(prefill_pointer self, size_t r, const std::vector<chunk_ref>& chunks, const step_output& out) {
  auto& st = self->state;
  st.slots[r].in_flight = false;
  for (size_t i = 0; i < chunks.size(); ++i) {
    auto [rid, job_id, chunk] = chunks[i];
    auto it = st.jobs.find(rid);
    if (it == st.jobs.end() || it->second.job_id != job_id)
      continue;
    auto& e = it->second;
    if (e.aborted) {
      finish(self, rid);
      continue;
    }
    e.done += chunk;
    if (e.done == static_cast<int64_t>(e.job.tokens.size()))
      ship(self, rid, out.tokens[i]);
  }
}

void schedule(prefill_pointer self) {
  auto& st = self->state;
  // Requests leave the FIFO once finished or failed.
  while (!st.order.empty() && !st.jobs.count(st.order.front()))
    st.order.pop_front();
  if (!ep_can_step(self, [self] { schedule(self); }))
    return;
  // One step per idle rank. An expert-parallel group steps all its ranks together (empty steps included) or none.
  std::vector<std::pair<forward_step, std::vector<chunk_ref>>> plan(st.slots.size());
  bool any = false;
  for (size_t r = 0; r < st.slots.size(); ++r) {
    auto& slot = st.slots[r];
    if (!slot.up() || slot.in_flight)
      continue;
    auto& [step, chunks] = plan[r];
    step.epoch = slot.epoch();
    int64_t budget = st.group.max_batch_tokens;
    for (auto rid : st.order) {
      auto it = st.jobs.find(rid);
      if (it == st.jobs.end())
        continue;
      auto& e = it->second;
      if (e.rank != r || e.shipping || e.aborted || budget <= 0)
        continue;
      int64_t total = static_cast<int64_t>(e.job.tokens.size());
      if (e.pages.empty()) {
        auto pages = slot.pages->allocate(pages_for_tokens(total, slot.info.page_size));
        if (!pages)
          break; // wait for pages, keep FIFO order
        e.pages = std::move(*pages);
      }
      int64_t chunk = std::min<int64_t>({st.group.chunk_tokens, total - e.done, budget});
      step_item item;
      item.rid = rid;
      item.tokens.assign(e.job.tokens.begin() + e.done, e.job.tokens.begin() + e.done + chunk);
      item.start_pos = e.done;
      item.pages = e.pages;
      item.sample = e.done + chunk == total;
      item.position = e.job.generated;
      item.sampling = e.job.sampling;
      step.items.push_back(std::move(item));
      chunks.push_back(chunk_ref{rid, e.job_id, chunk});
      budget -= chunk;
    }
    any = any || !step.items.empty();
  }
  for (size_t r = 0; any && r < st.slots.size(); ++r) {
    auto& slot = st.slots[r];
    auto& [step, chunks] = plan[r];
    if (!slot.up() || slot.in_flight || (step.items.empty() && !st.ep.enabled))
      continue;
    slot.in_flight = true;
    auto epoch = slot.epoch();
    self->request(slot.handle, 120s, forward_atom::value, std::move(step))
        .then([self, r, chunks](step_output& out) { on_step_done(self, r, chunks, out); schedule(self); },
              [self, r, chunks, epoch](caf::error& err) {
                auto& st = self->state;
                if (st.slots[r].epoch() == epoch)
                  st.slots[r].in_flight = false;
                if (st.ep.enabled)
                  st.ep.broken = true; // the group re-forms before its next step
                for (auto& c : chunks)
                  if (auto it = st.jobs.find(c.rid); it != st.jobs.end() && it->second.job_id == c.job_id)
                    fail(self, c.rid, st.slots[r].label(), "prefill step failed: " + describe(err));
                schedule(self);
              });
  }
  serving_metrics().queue_depth.with({st.group.name}).set(static_cast<double>(st.jobs.size()));
}

prefill_scheduler_actor::behavior_type prefill_impl(prefill_pointer self, service_context sc, group_section group) {
  auto& st = self->state;
  st.sc = std::move(sc);
  st.group = std::move(group);
  st.slots = make_rank_slots(*st.sc.cfg, st.group);
  st.ep.enabled = st.group.ep_size > 1;
  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    if (auto r = rank_went_down(self, dm.source)) {
      // The incarnation and its pool are gone: every request on it starts over elsewhere.
      std::vector<uint64_t> lost;
      for (auto& [rid, e] : st.jobs)
        if (e.rank == *r)
          lost.push_back(rid);
      for (auto rid : lost) {
        st.jobs[rid].pages.clear(); // the allocator died with the incarnation
        fail(self, rid, st.slots[*r].label(), "rank went down: " + describe(dm.reason));
      }
    } else {
      // A router died, and with it its request table: its jobs here go too (the gateway resubmits
      // them to the next router).
      std::vector<uint64_t> orphans;
      for (auto& [rid, e] : st.jobs)
        if (e.owner == dm.source)
          orphans.push_back(rid);
      for (auto rid : orphans)
        abort_job(self, rid);
      if (st.router && dm.source == st.router.address())
        st.router = nullptr;
    }
  });
  self->send(self, tick_atom::value);
  return {
      [self](prefill_atom, prefill_job& job) -> caf::result<caf::ok_atom> {
        auto& st = self->state;
        // Failures go to the router that sent the latest job (a restarted router replaces the old one).
        auto sender = caf::actor_cast<router_actor>(self->current_sender());
        if (sender && sender != st.router) {
          st.router = sender;
          self->monitor(sender);
        }
        auto rid = job.rid;
        if (job.tokens.empty())
          return make_error(petrel_errc::bad_request, "empty prompt");
        if (auto old = st.jobs.find(rid); old != st.jobs.end()) {
          // A new attempt of a request whose earlier attempt is still draining: the earlier one's
          // pages go back (or stay reserved until its step returns, see abort) and its answers are
          // ignored by job id.
          if (!old->second.aborted && !st.slots[old->second.rank].in_flight && !old->second.shipping)
            finish(self, rid);
          else if (st.slots[old->second.rank].pages && !old->second.pages.empty())
            st.slots[old->second.rank].pages->free(old->second.pages), old->second.pages.clear();
          st.jobs.erase(rid);
        }
        auto& e = st.jobs[rid];
        e = prefill_entry{};
        e.job_id = st.next_job_id++;
        e.owner = caf::actor_cast<caf::actor_addr>(self->current_sender());
        e.job = std::move(job);
        e.rank = pick_rank(self);
        e.queued = self->clock().now();
        st.order.push_back(rid);
        schedule(self);
        return caf::ok_atom::value;
      },
      [self](abort_atom, uint64_t rid) { abort_job(self, rid); },
      [self](rebalance_atom, bool trigger) { return ep_request_rebalance(self, trigger); },
      [self](load_atom) {
        auto& st = self->state;
        group_load l{st.group.name, static_cast<int32_t>(st.jobs.size()), 0, 0, 0, 0,
                     static_cast<int32_t>(st.slots.size())};
        count_rank_capacity(st.slots, l);
        return l;
      },
      [self](tick_atom) {
        resolve_ranks(self, self->state.sc.head, [self](size_t) { schedule(self); });
        self->delayed_send(self, 200ms, tick_atom::value);
      },
  };
}

} // namespace

caf::actor spawn_prefill_scheduler(caf::local_actor* parent, const service_context& sc, const group_section& group,
                                   const child_context&) {
  return caf::actor_cast<caf::actor>(parent->spawn(prefill_impl, sc, group));
}

} // namespace petrel
