#include "actors/kv_agent.hpp"

#include <chrono>
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <random>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

#include <caf/all.hpp>

#include "kernels/device_memory.hpp"
#include "runtime/metrics.hpp"
#include "transport/kv_transfer.hpp"

namespace petrel {

// -- CRC32C ------------------------------------------------------------------------------------------

namespace {

/// Byte-at-a-time table of the reflected Castagnoli polynomial 0x82F63B78.
struct crc32c_table {
  uint32_t t[256];
  crc32c_table() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k)
        c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
      t[i] = c;
    }
  }
};

uint32_t crc32c_portable(uint32_t crc, const uint8_t* p, size_t n) {
  static const crc32c_table table;
  for (size_t i = 0; i < n; ++i)
    crc = table.t[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
// One crc32 instruction per 8 bytes (latency 3, so about 8 bytes per 3 cycles). KV pages move over
// the network at a few GB/s; this runs well above that, so one stream is enough.
__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t c = crc;
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    n -= 8;
  }
  crc = static_cast<uint32_t>(c);
  while (n--)
    crc = _mm_crc32_u8(crc, *p++);
  return crc;
}
#endif

} // namespace

uint32_t kv_page_crc32c(const void* data, size_t bytes, uint32_t crc) {
  auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
#if defined(__x86_64__)
  static const bool hw = __builtin_cpu_supports("sse4.2");
  crc = hw ? crc32c_sse42(crc, p, bytes) : crc32c_portable(crc, p, bytes);
#else
  crc = crc32c_portable(crc, p, bytes);
#endif
  return ~crc;
}

namespace {

using transport::kv_transfer_engine;

/// A KV pool of one of this node's ranks, as mapped in this process.
struct local_pool {
  uint8_t* base = nullptr;
  uint64_t size = 0;
  bool device = false; // a GPU pool: base is device memory, read and written through device copies
};

/// CRC32C of `bytes` at `at`, copied to the host first when the pool is on a GPU.
uint32_t pool_crc32c(const uint8_t* at, uint64_t bytes, bool device) {
  if (!device)
    return kv_page_crc32c(at, bytes);
  std::vector<uint8_t> host(bytes);
  device_memory::copy(host.data(), at, bytes);
  return kv_page_crc32c(host.data(), bytes);
}

/// CRC32C of each of `pages` of a pool: on the GPU for GPU pools (kernels/cuda/kv_crc32c.cu), else on the host.
/// Throws std::exception on a CUDA error.
std::vector<uint32_t> pool_page_crcs(const uint8_t* base, bool device, const std::vector<int32_t>& pages,
                                     uint64_t page_bytes) {
  if (device && device_memory::crc32c_on_device_fits(page_bytes))
    return device_memory::crc32c_pages(base, pages, page_bytes);
  std::vector<uint32_t> out;
  out.reserve(pages.size());
  for (auto p : pages)
    out.push_back(pool_crc32c(base + uint64_t(p) * page_bytes, page_bytes, device));
  return out;
}

/// Inverts the bits of `mask` in the byte at `at` (injected corruption and its undo), on the GPU when there.
void flip_pool_byte(uint8_t* at, uint8_t mask, bool device) {
  if (!device) {
    *at ^= mask;
    return;
  }
  uint8_t b = 0;
  device_memory::copy(&b, at, 1);
  b ^= mask;
  device_memory::copy(at, &b, 1);
}

metrics::counter& kv_corrupt_counter() {
  static auto& c = metrics::global_registry()
                       .add_counter("petrel_kv_pages_corrupt_total",
                                    "KV pages whose CRC32C on arrival differed from the sender's", {})
                       .with({});
  return c;
}

struct kv_agent_state {
  static inline const char* name = "petrel.kv_agent";

  std::shared_ptr<kv_transfer_engine> engine;
  uint64_t epoch = 0;
  supervisor_actor supervisor;                      // the node's: finds this node's ranks
  std::map<uint64_t, local_pool> local_pools;       // pool id -> memory, for the ranks of this node
  struct flipped_byte {
    uint8_t* at;
    uint8_t mask;
    bool device;
  };
  std::map<uint64_t, std::vector<flipped_byte>> flips; // transfer id -> injected corruption to undo
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
using namespace std::chrono_literals;

std::string hex32(uint32_t v) {
  char buf[11];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

/// Calls `k` with the memory of local pool `pool_id` (nullptr when no rank of this node owns it).
/// Unknown ids are looked up afresh from the ranks (a restarted rank registers a new pool).
void with_local_pool(agent_pointer self, uint64_t pool_id, std::function<void(const local_pool*)> k) {
  auto& st = self->state;
  if (auto it = st.local_pools.find(pool_id); it != st.local_pools.end())
    return k(&it->second);
  if (!st.supervisor)
    return k(nullptr);
  self->request(st.supervisor, 2s, children_atom::value)
      .then(
          [self, pool_id, k](std::vector<child_status>& children) {
            std::vector<std::string> ranks;
            for (auto& c : children)
              if (c.name.rfind("rank", 0) == 0)
                ranks.push_back(c.name);
            if (ranks.empty())
              return k(nullptr);
            auto found = std::make_shared<std::map<uint64_t, local_pool>>();
            auto left = std::make_shared<size_t>(ranks.size());
            auto done = [self, pool_id, k, found, left] {
              if (--*left > 0)
                return;
              auto& st = self->state;
              st.local_pools = *found;
              auto it = st.local_pools.find(pool_id);
              k(it == st.local_pools.end() ? nullptr : &it->second);
            };
            for (auto& name : ranks)
              self->request(self->state.supervisor, 2s, whereis_atom::value, name)
                  .then(
                      [self, done, found](caf::actor& rank, uint64_t) {
                        self->request(caf::actor_cast<rank_actor>(rank), 5s, info_atom::value)
                            .then(
                                [self, done, found](rank_info& info) {
                                  auto desc = transport::kv_pool_descriptor::from_bytes(info.pool);
                                  // Only a pool registered with this process's engine is memory we may read.
                                  if (desc && desc->engine_id == self->state.engine->engine_id())
                                    (*found)[desc->pool_id] = {reinterpret_cast<uint8_t*>(desc->data_base()),
                                                               desc->size, desc->on_device()};
                                  done();
                                },
                                [done](caf::error&) { done(); });
                      },
                      [done](caf::error&) { done(); });
          },
          [k](caf::error&) { k(nullptr); });
}

/// Checksums (when asked), fault injection, then the transfer. `pool`: the source pool's memory.
void start_shipment(agent_pointer self, kv_shipment job, caf::response_promise rp, const local_pool* pool) {
  auto& st = self->state;
  auto desc = transport::kv_pool_descriptor::from_bytes(job.destination.pool);
  if (!desc)
    return rp.deliver(make_error(petrel_errc::kv_transfer_failed, "bad destination descriptor: " + desc.error()));
  const fault_spec* fault = st.fault_to(job.destination.node);
  if (fault) {
    if (fault->kind == "partition")
      return rp.deliver(make_error(petrel_errc::kv_transfer_failed, "injected partition to node " + fault->peer));
    if (fault->kind == "drop" && std::uniform_real_distribution<double>(0, 1)(st.rng) < fault->prob)
      return rp.deliver(
          make_error(petrel_errc::kv_transfer_failed, "injected drop on the link to node " + fault->peer));
    if (fault->kind == "delay")
      st.delayed[job.transfer_id] = fault->delay_ms;
  }
  if (job.src_pages.size() > job.destination.pages.size())
    return rp.deliver(make_error(petrel_errc::kv_transfer_failed,
                                 "destination has " + std::to_string(job.destination.pages.size()) + " pages, " +
                                     std::to_string(job.src_pages.size()) + " needed"));
  bool corrupt = fault && fault->kind == "corrupt" && std::uniform_real_distribution<double>(0, 1)(st.rng) < fault->prob;
  if (job.destination.checksum || corrupt) {
    if (!pool)
      return rp.deliver(make_error(petrel_errc::kv_transfer_failed,
                                   "source pool " + std::to_string(job.src_pool_id) +
                                       " is not a KV pool of this node's ranks (rank restarted?)"));
    for (auto p : job.src_pages)
      if (p < 0 || (uint64_t(p) + 1) * job.page_bytes > pool->size)
        return rp.deliver(make_error(petrel_errc::kv_transfer_failed,
                                     "source page " + std::to_string(p) + " lies outside its pool"));
  }
  if (job.destination.checksum) {
    // The digest leaves before the transfer starts, on the link that later carries the receipt, so
    // the decode scheduler has it before the kv_ready that the receipt triggers.
    kv_digest digest{job.destination.rid, job.destination.rank_epoch, {}, job.page_bytes, {}};
    digest.pages.assign(job.destination.pages.begin(), job.destination.pages.begin() + long(job.src_pages.size()));
    try {
      digest.crc = pool_page_crcs(pool->base, pool->device, job.src_pages, job.page_bytes);
    } catch (const std::exception& e) {
      return rp.deliver(make_error(petrel_errc::kv_transfer_failed, std::string("checksum of the source pages: ") +
                                                                        e.what()));
    }
    self->send(caf::actor_cast<decode_scheduler_actor>(job.destination.decode_scheduler), digest_atom::value,
               std::move(digest));
  }
  if (corrupt && !job.src_pages.empty() && job.page_bytes > 0) {
    // Injected corruption on the link: flip a few bytes of one page after its checksum was taken, so
    // that the receiver gets bytes the sender never had. Undone when the transfer ends (the source
    // pages are the prefill rank's).
    // Every page of the shipment loses 8 bytes (inverted), so that the damage reaches tokens that
    // attention reads and changes outputs when nothing checks (the negative control in
    // docs/reliability.md).
    auto& flips = st.flips[job.transfer_id];
    for (auto page : job.src_pages)
      for (int i = 0; i < 8; ++i) {
        auto off = std::uniform_int_distribution<uint64_t>(0, job.page_bytes - 1)(st.rng);
        uint8_t* at = pool->base + uint64_t(page) * job.page_bytes + off;
        flip_pool_byte(at, 0xff, pool->device);
        flips.push_back({at, 0xff, pool->device});
      }
    std::cerr << "petrel kv_agent: injected corruption into transfer " << job.transfer_id << " to node "
              << job.destination.node << " (" << flips.size() << " bytes in " << job.src_pages.size()
              << " pages)\n";
  }
  // Bootstrap: connect once per destination engine; a lost peer is forgotten and reconnected.
  auto t0 = std::chrono::steady_clock::now();
  auto it = st.peers.find(desc->worker_address);
  if (it == st.peers.end()) {
    auto peer = st.engine->connect(desc->worker_address);
    if (!peer) {
      if (auto f = st.flips.find(job.transfer_id); f != st.flips.end()) {
        for (auto& b : f->second)
          flip_pool_byte(b.at, b.mask, b.device);
        st.flips.erase(f);
      }
      return rp.deliver(
          make_error(petrel_errc::kv_transfer_failed, "cannot connect to the destination: " + peer.error()));
    }
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
  st.pending[job.transfer_id] = rp;
  st.pending_peer[job.transfer_id] = desc->worker_address;
  auto me = caf::actor_cast<kv_agent_actor>(self);
  st.engine->transfer(std::move(req), [me, bootstrap](const transport::kv_transfer_result& r) {
    kv_receipt receipt{r.transfer_id, r.bytes, bootstrap, std::chrono::duration<double>(r.timing.total()).count(),
                       r.local_copy,
                       r.local_copy ? "local" : r.cuda_ipc ? "cuda_ipc" : r.staged ? "staged" : "ucx"};
    std::string error = r.ok() ? std::string{} : std::string(to_string(r.status)) + ": " + r.error;
    caf::anon_send(me, ship_atom::value, r.transfer_id, receipt, error);
  });
}

kv_agent_actor::behavior_type kv_agent_impl(agent_pointer self, std::shared_ptr<kv_transfer_engine> engine,
                                            uint64_t epoch, supervisor_actor supervisor) {
  self->state.engine = std::move(engine);
  self->state.epoch = epoch;
  self->state.supervisor = std::move(supervisor);
  return {
      [self](ping_atom) { return caf::make_result(pong_atom::value, self->state.epoch); },
      [self](ship_atom, kv_shipment& job) -> caf::result<kv_receipt> {
        auto& st = self->state;
        auto rp = self->make_response_promise<kv_receipt>();
        auto* fault = st.fault_to(job.destination.node);
        if (!job.destination.checksum && !(fault && fault->kind == "corrupt")) {
          start_shipment(self, std::move(job), rp, nullptr);
          return rp;
        }
        auto pool_id = job.src_pool_id;
        with_local_pool(self, pool_id, [self, job = std::move(job), rp](const local_pool* pool) mutable {
          start_shipment(self, std::move(job), rp, pool);
        });
        return rp;
      },
      [self](ship_atom, uint64_t id, kv_receipt& receipt, std::string& error) {
        auto& st = self->state;
        if (auto f = st.flips.find(id); f != st.flips.end()) {
          for (auto& b : f->second) // the bytes have left: give the prefill rank its pages back intact
            flip_pool_byte(b.at, b.mask, b.device);
          st.flips.erase(f);
        }
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
      [self](verify_atom, kv_check& check) -> caf::result<caf::ok_atom> {
        auto& st = self->state;
        auto desc = transport::kv_pool_descriptor::from_bytes(check.pool);
        if (!desc)
          return make_error(petrel_errc::bad_request, "bad pool descriptor: " + desc.error());
        // Only a pool registered with this process's engine is memory this process may read.
        if (desc->engine_id != st.engine->engine_id())
          return make_error(petrel_errc::bad_request, "the pool to check is not on this node");
        if (check.pages.size() != check.crc.size() || check.page_bytes == 0)
          return make_error(petrel_errc::bad_request, "a check needs one CRC per page and a page size");
        auto* base = reinterpret_cast<const uint8_t*>(desc->data_base());
        for (auto page : check.pages)
          if (page < 0 || (uint64_t(page) + 1) * check.page_bytes > desc->size)
            return make_error(petrel_errc::bad_request, "page " + std::to_string(page) + " lies outside the pool");
        std::vector<uint32_t> crcs;
        try {
          crcs = pool_page_crcs(base, desc->on_device(), check.pages, check.page_bytes);
        } catch (const std::exception& e) {
          return make_error(petrel_errc::kv_corrupt, std::string("cannot checksum the arrived pages: ") + e.what());
        }
        for (size_t i = 0; i < check.pages.size(); ++i) {
          auto page = check.pages[i];
          auto crc = crcs[i];
          if (crc != check.crc[i]) {
            kv_corrupt_counter().inc();
            auto what = "KV page " + std::to_string(page) + " (" + std::to_string(i + 1) + " of " +
                        std::to_string(check.pages.size()) + ") arrived with CRC32C " + hex32(crc) +
                        ", the sender's was " + hex32(check.crc[i]);
            std::cerr << "petrel kv_agent: " << what << "; the request is re-prefilled\n";
            return make_error(petrel_errc::kv_corrupt, what);
          }
        }
        return caf::ok_atom::value;
      },
      [self](fault_atom, fault_spec& f) -> caf::result<caf::ok_atom> {
        auto& st = self->state;
        if (f.kind != "delay" && f.kind != "drop" && f.kind != "partition" && f.kind != "corrupt")
          return make_error(petrel_errc::bad_request, "a kv_agent takes delay, drop, partition or corrupt faults, not '" +
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
  return caf::actor_cast<caf::actor>(parent->spawn(kv_agent_impl, std::move(engine), ctx.epoch, ctx.supervisor));
}

} // namespace petrel
