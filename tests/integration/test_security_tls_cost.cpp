// What TLS costs a CAF link: request/response round trips between two actor systems over loopback, with
// and without the cluster TLS of actors/cluster_tls.hpp, for a step-sized message and a 64 KiB one.
// docs/benchmarks.md ("Cluster TLS and KV checksums") reports the figures this prints.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "actors/cluster_tls.hpp"
#include "actors/messages.hpp"
#include "actors/system.hpp"

using namespace petrel;
using namespace std::chrono_literals;

namespace {

struct round_trips {
  double p50_us = 0;
  double mean_us = 0;
  bool ok = false;
};

round_trips measure(bool tls, size_t crc_entries, int n) {
  const std::string secret = "0123456789abcdef0123456789abcdef";
  std::unique_ptr<tls_identity> server_id, client_id;
  petrel_config server_cfg, client_cfg;
  if (tls) {
    server_id = tls_identity::make(secret, "tlscost", "server");
    client_id = tls_identity::make(secret, "tlscost", "client");
    server_cfg.use_tls(*server_id);
    client_cfg.use_tls(*client_id);
  }
  caf::actor_system server{server_cfg};
  caf::actor_system client{client_cfg};
  auto echo = server.spawn([]() -> caf::behavior { return {[](kv_digest& d) { return d; }}; });
  auto port = publish_cluster_port(echo, 0, "127.0.0.1");
  REQUIRE(port);
  auto remote = connect_cluster_port<caf::actor>(client, "127.0.0.1", *port);
  REQUIRE_MESSAGE(remote, client.render(remote.error()));
  kv_digest msg{1, 2, {3}, 20480, std::vector<uint32_t>(crc_entries, 0xabcdef01u)};
  caf::scoped_actor self{client};
  round_trips out;
  std::vector<double> us;
  for (int i = 0; i < n + 50; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    bool got = false;
    self->request(*remote, 10s, msg).receive([&](kv_digest& d) { got = d.crc.size() == crc_entries; },
                                             [&](caf::error&) {});
    if (!got)
      return out;
    if (i >= 50) // warm-up done
      us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(us.begin(), us.end());
  out.p50_us = us[us.size() / 2];
  double sum = 0;
  for (auto v : us)
    sum += v;
  out.mean_us = sum / static_cast<double>(us.size());
  out.ok = true;
  anon_send_exit(echo, caf::exit_reason::user_shutdown);
  return out;
}

} // namespace

TEST_CASE("security: TLS round trips on a CAF link (cost)") {
  for (size_t entries : {size_t(16), size_t(16384)}) {
    size_t bytes = entries * 4;
    auto plain = measure(false, entries, 1000);
    auto tls = measure(true, entries, 1000);
    REQUIRE(plain.ok);
    REQUIRE(tls.ok);
    std::printf("tls cost: %zu-byte payload, 1000 sequential round trips over loopback: plain p50 %.1f us (mean %.1f), "
                "TLS p50 %.1f us (mean %.1f); ratio p50 %.2f\n",
                bytes, plain.p50_us, plain.mean_us, tls.p50_us, tls.mean_us, tls.p50_us / plain.p50_us);
  }
}
