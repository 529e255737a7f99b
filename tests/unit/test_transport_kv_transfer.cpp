// KV transfer engine, in one process: two real UCX engines over loopback tcp, plus the memcpy path.
#include <doctest/doctest.h>

#include "transport/kv_transfer.hpp"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

using namespace petrel::transport;
using namespace std::chrono_literals;

namespace {

/// Collects callbacks from the progress threads; the test thread waits on it.
template <class T>
class inbox {
public:
  void push(const T& v) {
    std::lock_guard<std::mutex> lock(mutex_);
    items_.push_back(v);
    cv_.notify_all();
  }
  bool wait_for_count(size_t n, std::chrono::milliseconds limit) {
    std::unique_lock<std::mutex> lock(mutex_);
    return cv_.wait_for(lock, limit, [&] { return items_.size() >= n; });
  }
  std::vector<T> items() {
    std::lock_guard<std::mutex> lock(mutex_);
    return items_;
  }

private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<T> items_;
};

kv_transfer_options loopback_tcp(bool local_copy = false) {
  kv_transfer_options o;
  o.transports = "tcp";
  o.net_devices = "lo";
  o.allow_local_copy = local_copy;
  o.transfer_deadline = 5s;
  return o;
}

std::unique_ptr<kv_transfer_engine> make_engine(kv_transfer_options o) {
  auto e = kv_transfer_engine::create(std::move(o));
  REQUIRE_MESSAGE(e.has_value(), e.error());
  return std::move(e.value());
}

void fill_pattern(std::vector<uint8_t>& v, uint32_t seed) {
  for (size_t i = 0; i < v.size(); ++i) v[i] = uint8_t((i * 2654435761u + seed) >> 7);
}

constexpr uint64_t page = 4096;

/// Scattered pages: source page -> destination page. 3,4,5 -> 10,11,12 coalesce into one put.
std::vector<kv_page_range> scattered_ranges() {
  std::vector<std::pair<uint64_t, uint64_t>> map = {{3, 10}, {4, 11}, {5, 12}, {9, 2}, {17, 40}, {30, 0}, {31, 63}};
  std::vector<kv_page_range> r;
  for (auto [s, d] : map) r.push_back({s * page, d * page, page});
  return r;
}

} // namespace

TEST_CASE("kv descriptor: round trip, corruption and hex are caught") {
  auto engine = make_engine(loopback_tcp());
  std::vector<uint8_t> pool(64 * page);
  auto d = engine->register_pool(pool.data(), pool.size());
  REQUIRE_MESSAGE(d.has_value(), d.error());
  CHECK(d->validate().has_value());
  CHECK(d->size == pool.size());
  CHECK(d->remote_base == reinterpret_cast<uint64_t>(pool.data()));
  CHECK(d->engine_id == engine->engine_id());

  auto bytes = d->to_bytes();
  auto back = kv_pool_descriptor::from_bytes(bytes);
  REQUIRE_MESSAGE(back.has_value(), back.error());
  CHECK(back->rkey == d->rkey);
  CHECK(back->worker_address == d->worker_address);
  CHECK(back->checksum == d->checksum);

  auto hex = from_hex(to_hex(bytes));
  REQUIRE(hex.has_value());
  CHECK(*hex == bytes);
  CHECK_FALSE(from_hex("abc").has_value());
  CHECK_FALSE(from_hex("zz").has_value());

  auto flipped = bytes;
  flipped[flipped.size() / 2] ^= 0x40;
  auto bad = kv_pool_descriptor::from_bytes(flipped);
  CHECK_FALSE(bad.has_value());
  CHECK(bad.error().find("kv pool descriptor") != std::string::npos);
  auto truncated = std::vector<uint8_t>(bytes.begin(), bytes.begin() + 20);
  CHECK(kv_pool_descriptor::from_bytes(truncated).error().find("truncated") != std::string::npos);

  auto edited = *d;
  edited.size *= 2; // a hand-edited size must not pass
  CHECK(edited.validate().error().find("checksum") != std::string::npos);

  // connect() refuses garbage instead of handing it to UCX.
  auto c = engine->connect(std::vector<uint8_t>{1, 2, 3, 4, 5});
  CHECK_FALSE(c.has_value());
  CHECK(c.error().find("worker address") != std::string::npos);
  auto addr = engine->worker_address();
  addr.back() ^= 1;
  CHECK(engine->connect(addr).error().find("checksum") != std::string::npos);

  CHECK_FALSE(engine->register_pool(nullptr, 10).has_value());
  CHECK(engine->deregister_pool(d->pool_id).has_value());
  CHECK_FALSE(engine->deregister_pool(d->pool_id).has_value());
}

TEST_CASE("kv page ranges: adjacent pages coalesce, overlaps and empty ranges are refused") {
  auto merged = coalesce_page_ranges(scattered_ranges());
  REQUIRE(merged.has_value());
  CHECK(merged->size() == 5); // 3 adjacent pages became one range
  bool found = false;
  for (auto& r : *merged)
    if (r.src_offset == 3 * page) {
      CHECK(r.dst_offset == 10 * page);
      CHECK(r.length == 3 * page);
      found = true;
    }
  CHECK(found);
  // Adjacent at the destination but not at the source: two puts.
  auto two = coalesce_page_ranges({{0, 0, page}, {5 * page, page, page}});
  REQUIRE(two.has_value());
  CHECK(two->size() == 2);
  CHECK_FALSE(coalesce_page_ranges({{0, 0, 2 * page}, {8 * page, page, page}}).has_value());
  CHECK_FALSE(coalesce_page_ranges({{0, 0, 0}}).has_value());
}

TEST_CASE("kv transfer over loopback tcp: scattered pages arrive exactly, notice carries id and epoch") {
  auto sender = make_engine(loopback_tcp());
  auto receiver = make_engine(loopback_tcp());
  std::vector<uint8_t> src(64 * page), dst(64 * page, 0);
  fill_pattern(src, 7);
  auto src_desc = sender->register_pool(src.data(), src.size());
  auto dst_desc = receiver->register_pool(dst.data(), dst.size());
  REQUIRE(src_desc.has_value());
  REQUIRE(dst_desc.has_value());

  inbox<kv_transfer_notice> notices;
  receiver->on_notify([&](const kv_transfer_notice& n) { notices.push(n); });
  auto peer = sender->connect(dst_desc->worker_address);
  REQUIRE_MESSAGE(peer.has_value(), peer.error());
  // Connecting twice to the same engine reuses the endpoint.
  CHECK(*sender->connect(dst_desc->worker_address) == *peer);

  inbox<kv_transfer_result> results;
  auto ranges = scattered_ranges();
  sender->transfer(*peer, src_desc->pool_id, *dst_desc, ranges, 4242, 7,
                   [&](const kv_transfer_result& r) { results.push(r); });
  REQUIRE(results.wait_for_count(1, 5s));
  auto r = results.items()[0];
  CHECK_MESSAGE(r.ok(), r.error);
  CHECK(r.transfer_id == 4242);
  CHECK(r.epoch == 7);
  CHECK(r.bytes == ranges.size() * page);
  CHECK(r.puts == 5);
  CHECK_FALSE(r.local_copy);
  CHECK(r.timing.total() > 0ns);

  REQUIRE(notices.wait_for_count(1, 5s));
  auto n = notices.items()[0];
  CHECK(n.transfer_id == 4242);
  CHECK(n.epoch == 7);
  CHECK(n.bytes == ranges.size() * page);
  CHECK(n.pool_id == dst_desc->pool_id);
  CHECK(n.sender_engine_id == sender->engine_id());

  // Bytes exact; every page not named stays zero.
  std::vector<uint8_t> expect(dst.size(), 0);
  for (auto& x : ranges) std::memcpy(expect.data() + x.dst_offset, src.data() + x.src_offset, x.length);
  CHECK(dst == expect);

  auto cs = sender->counters();
  CHECK(cs.transfers_ok == 1);
  CHECK(cs.transfers_failed == 0);
  CHECK(cs.bytes_sent == r.bytes);
  CHECK(cs.puts_issued == 5);
  auto cr = receiver->counters();
  CHECK(cr.notices_received == 1);
  CHECK(cr.bytes_received == r.bytes);

  // Many transfers at once, from several threads: every callback fires once, every byte lands.
  std::fill(dst.begin(), dst.end(), 0);
  constexpr int threads = 4, per_thread = 40;
  inbox<kv_transfer_result> many;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i) {
        uint64_t pg = uint64_t(t * 16 + (i % 16));
        sender->transfer(*peer, src_desc->pool_id, *dst_desc, {{(63 - pg) * page, pg * page, page}},
                         uint64_t(t * 1000 + i), 1, [&](const kv_transfer_result& x) { many.push(x); });
      }
    });
  for (auto& th : pool) th.join();
  REQUIRE(many.wait_for_count(threads * per_thread, 10s));
  for (auto& x : many.items()) CHECK_MESSAGE(x.ok(), x.error);
  REQUIRE(notices.wait_for_count(1 + threads * per_thread, 5s));
  for (uint64_t pg = 0; pg < 64; ++pg)
    CHECK(std::memcmp(dst.data() + pg * page, src.data() + (63 - pg) * page, page) == 0);
  CHECK(sender->in_flight() == 0);
}

TEST_CASE("kv transfer: bad requests are refused before any put, with a clear error") {
  auto sender = make_engine(loopback_tcp());
  auto receiver = make_engine(loopback_tcp());
  auto other = make_engine(loopback_tcp());
  std::vector<uint8_t> src(16 * page), dst(16 * page, 0), other_pool(16 * page);
  fill_pattern(src, 3);
  auto sd = sender->register_pool(src.data(), src.size());
  auto dd = receiver->register_pool(dst.data(), dst.size());
  auto od = other->register_pool(other_pool.data(), other_pool.size());
  REQUIRE((sd.has_value() && dd.has_value() && od.has_value()));
  inbox<kv_transfer_notice> notices;
  receiver->on_notify([&](const kv_transfer_notice& n) { notices.push(n); });
  auto peer = sender->connect(dd->worker_address);
  REQUIRE(peer.has_value());

  auto run = [&](kv_transfer_request req) {
    inbox<kv_transfer_result> box;
    sender->transfer(std::move(req), [&](const kv_transfer_result& r) { box.push(r); });
    REQUIRE(box.wait_for_count(1, 5s));
    return box.items()[0];
  };
  kv_transfer_request base;
  base.peer = *peer;
  base.local_pool = sd->pool_id;
  base.remote = *dd;
  base.transfer_id = 1;

  SUBCASE("destination past the end of the remote pool") {
    auto req = base;
    req.ranges = {{0, 0, page}, {page, 15 * page, 2 * page}}; // the second crosses the end
    auto r = run(req);
    CHECK(r.status == kv_transfer_status::out_of_bounds);
    CHECK(r.error.find("remote pool") != std::string::npos);
    CHECK(r.puts == 0);
  }
  SUBCASE("offset + length overflows") {
    auto req = base;
    req.ranges = {{0, UINT64_MAX - 10, page}};
    CHECK(run(req).status == kv_transfer_status::out_of_bounds);
  }
  SUBCASE("source past the end of the local pool") {
    auto req = base;
    req.ranges = {{16 * page, 0, page}};
    auto r = run(req);
    CHECK(r.status == kv_transfer_status::out_of_bounds);
    CHECK(r.error.find("local pool") != std::string::npos);
  }
  SUBCASE("descriptor edited without resealing") {
    auto req = base;
    req.remote.size = 1ull << 40; // claims a bigger pool than registered
    req.ranges = {{0, 1ull << 30, page}};
    auto r = run(req);
    CHECK(r.status == kv_transfer_status::bad_descriptor);
    CHECK(r.error.find("checksum") != std::string::npos);
  }
  SUBCASE("descriptor of another engine than the peer") {
    auto req = base;
    req.remote = *od;
    req.ranges = {{0, 0, page}};
    auto r = run(req);
    CHECK(r.status == kv_transfer_status::bad_descriptor);
    CHECK(r.error.find("engine") != std::string::npos);
  }
  SUBCASE("descriptor without an rkey, even when resealed") {
    // Over tcp UCX emulates RMA and does not check the rkey at the target, so the descriptor's own checks
    // (checksum, bounds) are what keeps a put inside the registered pool.
    auto req = base;
    req.remote.rkey.clear();
    req.remote.seal();
    req.ranges = {{0, 0, page}};
    auto r = run(req);
    CHECK(r.status == kv_transfer_status::bad_descriptor);
    CHECK(r.error.find("rkey") != std::string::npos);
  }
  SUBCASE("overlapping destinations") {
    auto req = base;
    req.ranges = {{0, 0, 2 * page}, {4 * page, page, page}};
    CHECK(run(req).status == kv_transfer_status::bad_descriptor);
  }
  SUBCASE("unknown peer and unknown local pool") {
    auto req = base;
    req.peer = 999;
    req.ranges = {{0, 0, page}};
    CHECK(run(req).status == kv_transfer_status::unknown_peer);
    req = base;
    req.local_pool = 999;
    req.ranges = {{0, 0, page}};
    CHECK(run(req).status == kv_transfer_status::unknown_peer);
  }
  // Nothing moved and nothing was announced.
  CHECK(std::all_of(dst.begin(), dst.end(), [](uint8_t b) { return b == 0; }));
  std::this_thread::sleep_for(50ms);
  CHECK(notices.items().empty());
  CHECK(sender->counters().transfers_ok == 0);
  CHECK(sender->counters().transfers_failed >= 1);
}

TEST_CASE("kv transfer: same-process pools take the memcpy path with the same semantics") {
  auto sender = make_engine(loopback_tcp(true));
  auto receiver = make_engine(loopback_tcp(true));
  std::vector<uint8_t> src(64 * page), dst(64 * page, 0);
  fill_pattern(src, 11);
  auto sd = sender->register_pool(src.data(), src.size());
  auto dd = receiver->register_pool(dst.data(), dst.size());
  REQUIRE((sd.has_value() && dd.has_value()));
  inbox<kv_transfer_notice> notices;
  receiver->on_notify([&](const kv_transfer_notice& n) { notices.push(n); });
  auto peer = sender->connect(dd->worker_address);
  REQUIRE(peer.has_value());
  inbox<kv_transfer_result> results;
  auto ranges = scattered_ranges();
  sender->transfer(*peer, sd->pool_id, *dd, ranges, 99, 3, [&](const kv_transfer_result& r) { results.push(r); });
  REQUIRE(results.wait_for_count(1, 5s));
  auto r = results.items()[0];
  CHECK_MESSAGE(r.ok(), r.error);
  CHECK(r.local_copy);
  REQUIRE(notices.wait_for_count(1, 5s));
  CHECK(notices.items()[0].transfer_id == 99);
  CHECK(notices.items()[0].epoch == 3);
  std::vector<uint8_t> expect(dst.size(), 0);
  for (auto& x : ranges) std::memcpy(expect.data() + x.dst_offset, src.data() + x.src_offset, x.length);
  CHECK(dst == expect);
  CHECK(sender->counters().local_copies == 1);

  // Bounds are still checked on the fast path.
  inbox<kv_transfer_result> bad;
  sender->transfer(*peer, sd->pool_id, *dd, {{0, 64 * page, page}}, 100, 3,
                   [&](const kv_transfer_result& x) { bad.push(x); });
  REQUIRE(bad.wait_for_count(1, 5s));
  CHECK(bad.items()[0].status == kv_transfer_status::out_of_bounds);
}

TEST_CASE("kv transfer: disconnect and engine shutdown end every transfer") {
  auto sender = make_engine(loopback_tcp());
  inbox<kv_transfer_result> results;
  {
    auto receiver = make_engine(loopback_tcp());
    std::vector<uint8_t> src(256 * page), dst(256 * page);
    auto sd = sender->register_pool(src.data(), src.size());
    auto dd = receiver->register_pool(dst.data(), dst.size());
    auto peer = sender->connect(dd->worker_address);
    REQUIRE(peer.has_value());
    sender->disconnect(*peer);
    sender->transfer(*peer, sd->pool_id, *dd, {{0, 0, page}}, 1, 1,
                     [&](const kv_transfer_result& r) { results.push(r); });
    REQUIRE(results.wait_for_count(1, 5s));
    CHECK(results.items()[0].status == kv_transfer_status::unknown_peer);
  }
  // Destroying an engine with transfers queued: each still gets exactly one callback.
  inbox<kv_transfer_result> late;
  {
    auto a = make_engine(loopback_tcp());
    auto b = make_engine(loopback_tcp());
    std::vector<uint8_t> src(256 * page), dst(256 * page);
    auto sd = a->register_pool(src.data(), src.size());
    auto dd = b->register_pool(dst.data(), dst.size());
    auto peer = a->connect(dd->worker_address);
    for (int i = 0; i < 20; ++i)
      a->transfer(*peer, sd->pool_id, *dd, {{0, 0, 256 * page}}, uint64_t(i), 1,
                  [&](const kv_transfer_result& r) { late.push(r); });
  }
  CHECK(late.items().size() == 20);
}
