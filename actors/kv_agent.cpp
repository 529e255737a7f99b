#include "actors/kv_agent.hpp"

#include <chrono>
#include <map>
#include <random>

#include <caf/all.hpp>

#include "transport/kv_transfer.hpp"

namespace petrel {

namespace {

using transport::kv_transfer_engine;

struct kv_agent_state {
  static inline const char* name = "petrel.kv_agent";

  std::shared_ptr<kv_transfer_engine> engine;
  uint64_t epoch = 0;
  std::map<std::vector<uint8_t>, transport::kv_peer_id> peers; // by worker address
  std::map<uint64_t, caf::response_promise> pending;           // by transfer id
  std::map<uint64_t, std::vector<uint8_t>> pending_peer;       // transfer id -> peer address
  // Fault injection (petrel chaos), per destination node.
  struct link_fault {
    fault_spec spec;
    std::chrono::steady_clock::time_point until;
  };
  std::map<std::string, link_fault> faults;
  std::map<uint64_t, int64_t> delayed; // transfer id -> extra delay (ms) before answering
  std::mt19937_64 rng{42};

  /// The fault active on the link to `node`, if any.
  const fault_spec* fault_to(const std::string& node) {
    auto it = faults.find(node);
    if (it == faults.end())
      return nullptr;
    if (std::chrono::steady_clock::now() >= it->second.until) {
      faults.erase(it);
      return nullptr;
    }
    return &it->second.spec;
  }
};

using agent_pointer = kv_agent_actor::stateful_pointer<kv_agent_state>;

kv_agent_actor::behavior_type kv_agent_impl(agent_pointer self, std::shared_ptr<kv_transfer_engine> engine,
                                            uint64_t epoch) {
  self->state.engine = std::move(engine);
  self->state.epoch = epoch;
  return {
      [self](ping_atom) { return caf::make_result(pong_atom::value, self->state.epoch); },
      [self](ship_atom, kv_shipment& job) -> caf::result<kv_receipt> {
        auto& st = self->state;
        auto desc = transport::kv_pool_descriptor::from_bytes(job.destination.pool);
        if (!desc)
          return make_error(petrel_errc::kv_transfer_failed, "bad destination descriptor: " + desc.error());
        if (auto* f = st.fault_to(job.destination.node)) {
          if (f->kind == "partition")
            return make_error(petrel_errc::kv_transfer_failed, "injected partition to node " + f->peer);
          if (f->kind == "drop" && std::uniform_real_distribution<double>(0, 1)(st.rng) < f->prob)
            return make_error(petrel_errc::kv_transfer_failed, "injected drop on the link to node " + f->peer);
          if (f->kind == "delay")
            st.delayed[job.transfer_id] = f->delay_ms;
        }
        if (job.src_pages.size() > job.destination.pages.size())
          return make_error(petrel_errc::kv_transfer_failed,
                            "destination has " + std::to_string(job.destination.pages.size()) + " pages, " +
                                std::to_string(job.src_pages.size()) + " needed");
        // Bootstrap: connect once per destination engine; a lost peer is forgotten and reconnected.
        auto t0 = std::chrono::steady_clock::now();
        auto it = st.peers.find(desc->worker_address);
        if (it == st.peers.end()) {
          auto peer = st.engine->connect(desc->worker_address);
          if (!peer)
            return make_error(petrel_errc::kv_transfer_failed, "cannot connect to the destination: " + peer.error());
          it = st.peers.emplace(desc->worker_address, *peer).first;
        }
        double bootstrap = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        transport::kv_transfer_request req;
        req.peer = it->second;
        req.local_pool = job.src_pool_id;
        req.remote = *desc;
        req.transfer_id = job.transfer_id;
        req.epoch = job.epoch;
        for (size_t i = 0; i < job.src_pages.size(); ++i)
          req.ranges.push_back(transport::kv_page_range{uint64_t(job.src_pages[i]) * job.page_bytes,
                                                        uint64_t(job.destination.pages[i]) * job.page_bytes,
                                                        job.page_bytes});
        auto rp = self->make_response_promise<kv_receipt>();
        st.pending[job.transfer_id] = rp;
        st.pending_peer[job.transfer_id] = desc->worker_address;
        auto me = caf::actor_cast<kv_agent_actor>(self);
        st.engine->transfer(std::move(req), [me, bootstrap](const transport::kv_transfer_result& r) {
          kv_receipt receipt{r.transfer_id, r.bytes, bootstrap,
                             std::chrono::duration<double>(r.timing.total()).count(), r.local_copy};
          std::string error = r.ok() ? std::string{} : std::string(to_string(r.status)) + ": " + r.error;
          caf::anon_send(me, ship_atom::value, r.transfer_id, receipt, error);
        });
        return rp;
      },
      [self](ship_atom, uint64_t id, kv_receipt& receipt, std::string& error) {
        auto& st = self->state;
        auto it = st.pending.find(id);
        if (it == st.pending.end())
          return;
        if (auto d = st.delayed.find(id); d != st.delayed.end()) {
          // Injected link delay: the answer (and so the admission on the decode side) comes late.
          auto ms = d->second;
          st.delayed.erase(d);
          self->delayed_send(self, std::chrono::milliseconds(ms), ship_atom::value, id, receipt, error);
          return;
        }
        if (error.empty()) {
          it->second.deliver(receipt);
        } else {
          it->second.deliver(make_error(petrel_errc::kv_transfer_failed, error));
          st.peers.erase(st.pending_peer[id]); // reconnect next time
        }
        st.pending.erase(it);
        st.pending_peer.erase(id);
      },
      [self](fault_atom, fault_spec& f) -> caf::result<caf::ok_atom> {
        auto& st = self->state;
        if (f.kind != "delay" && f.kind != "drop" && f.kind != "partition")
          return make_error(petrel_errc::bad_request, "a kv_agent takes delay, drop or partition faults, not '" +
                                                          f.kind + "'");
        if (f.seed)
          st.rng.seed(f.seed);
        st.faults[f.peer] = {f, std::chrono::steady_clock::now() + std::chrono::milliseconds(f.duration_ms)};
        return caf::ok_atom::value;
      },
  };
}

} // namespace

caf::actor spawn_kv_agent(caf::local_actor* parent, std::shared_ptr<kv_transfer_engine> engine,
                          const child_context& ctx) {
  return caf::actor_cast<caf::actor>(parent->spawn(kv_agent_impl, std::move(engine), ctx.epoch));
}

} // namespace petrel
