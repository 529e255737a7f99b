// The ranks a scheduler drives: resolved by name through the head, monitored, and resolved again
// when an incarnation ends. Each slot keeps the page allocator of its rank's KV pool, so page
// bookkeeping lives with the scheduler and dies with the incarnation it describes.
#pragma once

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <caf/all.hpp>

#include "actors/interfaces.hpp"
#include "runtime/cluster_config.hpp"
#include "runtime/kv_cache.hpp"

namespace petrel {

struct rank_slot {
  std::string node;
  std::string child; // "rank0", ...
  rank_actor handle;
  rank_info info;
  std::unique_ptr<kv_page_allocator> pages;
  kv_agent_actor agent; // the kv_agent of the rank's node
  bool in_flight = false;
  bool resolving = false;

  bool up() const { return static_cast<bool>(handle); }
  uint64_t epoch() const { return info.epoch; }
  std::string label() const { return node + "/" + child; }
};

/// Lockstep state of an expert-parallel group (ep_size > 1). Every MoE layer is an all-to-all among the
/// group's ranks, so they step together: each gets a step (an empty one when it has no work) or none does.
/// The group is (re)formed at a new generation whenever a rank's incarnation changed or a step failed.
struct ep_lockstep {
  bool enabled = false;
  bool forming = false;
  bool broken = false;
  uint64_t generation = 0;
  std::vector<uint64_t> epochs; // the ranks' epochs when `generation` formed
};

/// True when the scheduler may send steps now. Groups that are not expert-parallel: always. EP groups: when
/// every rank is up, idle and part of the current generation. Otherwise, once every rank is up and idle, it
/// sends rebuild(new generation) to all of them and returns false; `resume` runs when they have answered.
template <class Self, class Resume>
bool ep_can_step(Self* self, Resume resume) {
  auto& st = self->state;
  auto& ep = st.ep;
  if (!ep.enabled)
    return true;
  for (auto& s : st.slots)
    if (!s.up() || s.in_flight)
      return false;
  bool current = !ep.broken && ep.generation != 0 && ep.epochs.size() == st.slots.size();
  for (size_t i = 0; current && i < st.slots.size(); ++i)
    current = ep.epochs[i] == st.slots[i].epoch();
  if (current)
    return true;
  if (ep.forming)
    return false;
  ep.forming = true;
  // Generations only grow, also across scheduler restarts: nanoseconds of the wall clock.
  auto now = static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
  uint64_t generation = std::max(now, ep.generation + 1);
  std::vector<uint64_t> epochs;
  for (auto& s : st.slots)
    epochs.push_back(s.epoch());
  // Phase 1: every rank opens its endpoint of this generation and answers its address; phase 2: every rank
  // gets all addresses, connects and splits its model. Any failure leaves the group broken (formed again on the
  // next schedule).
  struct forming {
    size_t remaining = 0;
    bool ok = true;
    ep_peers peers;
  };
  auto f = std::make_shared<forming>();
  f->remaining = st.slots.size();
  f->peers.generation = generation;
  f->peers.addresses.resize(st.slots.size());
  auto finish = [self, generation, epochs, resume](bool ok) {
    auto& ep = self->state.ep;
    ep.forming = false;
    ep.broken = !ok;
    if (ok) {
      ep.generation = generation;
      ep.epochs = epochs;
    }
    resume();
  };
  auto connected = [f, finish](bool fine) {
    f->ok = f->ok && fine;
    if (--f->remaining == 0)
      finish(f->ok);
  };
  auto opened = [self, f, finish, connected](bool fine) {
    f->ok = f->ok && fine;
    if (--f->remaining > 0)
      return;
    if (!f->ok) {
      finish(false);
      return;
    }
    auto& slots = self->state.slots;
    f->remaining = slots.size();
    for (auto& s : slots) {
      if (!s.up()) {
        connected(false);
        continue;
      }
      self->request(s.handle, std::chrono::seconds(120), rebuild_atom::value, f->peers)
          .then([connected](caf::ok_atom) { connected(true); }, [connected](caf::error&) { connected(false); });
    }
  };
  for (size_t i = 0; i < st.slots.size(); ++i)
    self->request(st.slots[i].handle, std::chrono::seconds(120), rebuild_atom::value, generation)
        .then(
            [f, i, opened](ep_endpoint& e) {
              f->peers.addresses[i] = std::move(e.address);
              if (i == 0)
                f->peers.bootstrap = std::move(e.bootstrap); // rank 0's NCCL unique id, for every rank
              opened(true);
            },
            [opened](caf::error&) { opened(false); });
  return false;
}

/// Collects the EP statistics of every rank of an expert-parallel group as one JSON array (ranks that do not
/// answer are left out); with `trigger`, each is first asked for a live rebalance at its next step.
template <class Self>
caf::result<std::string> ep_request_rebalance(Self* self, bool trigger) {
  auto& st = self->state;
  if (!st.ep.enabled)
    return make_error(petrel_errc::bad_request,
                      "group '" + st.group.name + "' is not expert-parallel (it has one rank; ep_size 1)");
  auto rp = self->template make_response_promise<std::string>();
  auto parts = std::make_shared<std::vector<std::string>>();
  auto remaining = std::make_shared<size_t>(st.slots.size());
  auto done = [rp, parts, remaining]() mutable {
    if (--*remaining > 0)
      return;
    std::string out = "[";
    for (size_t i = 0; i < parts->size(); ++i)
      out += (i ? "," : "") + (*parts)[i];
    rp.deliver(out + "]");
  };
  for (auto& s : st.slots) {
    if (!s.up()) {
      done();
      continue;
    }
    self->request(s.handle, std::chrono::seconds(30), rebalance_atom::value, trigger)
        .then([parts, done](std::string& stats) mutable { parts->push_back(std::move(stats)), done(); },
              [done](caf::error&) mutable { done(); });
  }
  return rp;
}

/// One slot per rank of `group`, in node order.
inline std::vector<rank_slot> make_rank_slots(const cluster_config& cfg, const group_section& group) {
  std::vector<rank_slot> out;
  for (auto& node_name : group.nodes) {
    auto* node = cfg.find_node(node_name);
    for (size_t i = 0; node && i < node->ranks.size(); ++i) {
      rank_slot s;
      s.node = node_name;
      s.child = "rank" + std::to_string(i);
      out.push_back(std::move(s));
    }
  }
  return out;
}

/// Adds the ranks that run, and their KV pages, to a group's load report.
inline void count_rank_capacity(const std::vector<rank_slot>& slots, group_load& l) {
  l.ranks = static_cast<int32_t>(slots.size());
  for (auto& s : slots)
    if (s.up()) {
      ++l.ranks_up;
      l.free_pages += s.pages->free_count();
      l.total_pages += s.info.num_pages;
    }
}

/// Resolves every slot that is down and not being resolved: head whereis -> rank info -> monitor.
/// `on_up(i)` runs when slot i has a live incarnation. Call it periodically (on a tick).
template <class Self, class OnUp>
void resolve_ranks(Self* self, const head_actor& head, OnUp on_up) {
  auto& slots = self->state.slots;
  for (size_t i = 0; i < slots.size(); ++i) {
    auto& s = slots[i];
    if (s.up() || s.resolving)
      continue;
    s.resolving = true;
    self->request(head, std::chrono::seconds(2), whereis_atom::value, s.node, s.child)
        .then(
            [self, i, on_up](caf::actor& handle, uint64_t) {
              auto rank = caf::actor_cast<rank_actor>(handle);
              self->request(rank, std::chrono::seconds(30), info_atom::value)
                  .then(
                      [self, i, rank, on_up](rank_info& info) {
                        auto& s = self->state.slots[i];
                        s.resolving = false;
                        s.handle = rank;
                        s.info = std::move(info);
                        s.pages = std::make_unique<kv_page_allocator>(s.info.num_pages);
                        s.in_flight = false;
                        self->monitor(rank);
                        on_up(i);
                      },
                      [self, i](caf::error&) { self->state.slots[i].resolving = false; });
            },
            [self, i](caf::error&) { self->state.slots[i].resolving = false; });
    self->request(head, std::chrono::seconds(2), whereis_atom::value, s.node, std::string("kv_agent"))
        .then([self, i](caf::actor& handle, uint64_t) { self->state.slots[i].agent = caf::actor_cast<kv_agent_actor>(handle); },
              [](caf::error&) {});
  }
}

/// The slot whose incarnation `addr` was, if any; marks it down.
template <class Self>
std::optional<size_t> rank_went_down(Self* self, const caf::actor_addr& addr) {
  auto& slots = self->state.slots;
  for (size_t i = 0; i < slots.size(); ++i)
    if (slots[i].handle && slots[i].handle.address() == addr) {
      slots[i].handle = nullptr;
      slots[i].pages.reset();
      slots[i].in_flight = false;
      return i;
    }
  return std::nullopt;
}

} // namespace petrel
