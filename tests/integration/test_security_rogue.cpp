// Who may join: a real cluster (head + two node processes, TLS with a per-launch cluster secret) and
// rogue processes that try its head's port and a node's port without the secret: plain CAF, raw
// bytes, TLS with a certificate of another secret, and a real `petrel node` holding a wrong secret.
// Each is refused, the refusal is logged and counted, and the cluster keeps serving.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <future>
#include <regex>
#include <thread>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "actors/cluster.hpp"
#include "actors/cluster_tls.hpp"
#include "actors/interfaces.hpp"
#include "actors/system.hpp"
#include "tests/support/launched_cluster.hpp"

using namespace petrel;
using namespace petrel::test;
using json = nlohmann::json;
using namespace std::chrono_literals;

namespace {

/// An unused loopback port (bound to 0, then released).
int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

std::string file_text(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

size_t count_of(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (auto p = text.find(needle); p != std::string::npos; p = text.find(needle, p + 1))
    ++n;
  return n;
}

double metric(int gateway_port, const std::string& name) {
  auto m = http_get(gateway_port, "/metrics");
  std::smatch match;
  std::regex re("(^|\\n)" + name + "(\\{\\})? ([0-9.e+]+)");
  if (!std::regex_search(m.body, match, re))
    return -1;
  return std::stod(match[3]);
}

/// Runs `f` (a connection attempt) with a deadline, so that a rogue that is silently ignored
/// rather than refused fails the test instead of hanging it.
template <class F>
auto within(std::chrono::seconds limit, F f) {
  auto fut = std::async(std::launch::async, f);
  REQUIRE_MESSAGE(fut.wait_for(limit) == std::future_status::ready, "the attempt neither failed nor succeeded");
  return fut.get();
}

/// Plain CAF (no TLS): the middleman's own handshake against a TLS port.
std::string plain_caf_attempt(int port) {
  petrel_config cfg;
  caf::actor_system sys{cfg};
  auto h = sys.middleman().remote_actor<supervisor_actor>("127.0.0.1", static_cast<uint16_t>(port));
  if (!h)
    return "refused: " + sys.render(h.error());
  // Had it connected, it would send a message: ask for the children (it must never answer).
  caf::scoped_actor self{sys};
  std::string out = "CONNECTED";
  self->request(*h, 3s, children_atom::value)
      .receive([&](std::vector<child_status>&) { out = "CONNECTED and answered"; }, [](caf::error&) {});
  return out;
}

/// TLS, with a certificate of a CA derived from another secret (the rogue knows the cluster's name).
std::string wrong_secret_attempt(int port, const std::string& cluster) {
  auto id = tls_identity::make("not-the-cluster-secret-0123456789", cluster, "rogue");
  petrel_config cfg;
  cfg.use_tls(*id);
  caf::actor_system sys{cfg};
  auto h = caf::openssl::remote_actor<supervisor_actor>(sys, "127.0.0.1", static_cast<uint16_t>(port));
  if (!h)
    return "refused: " + sys.render(h.error());
  caf::scoped_actor self{sys};
  std::string out = "CONNECTED";
  self->request(*h, 3s, children_atom::value)
      .receive([&](std::vector<child_status>&) { out = "CONNECTED and answered"; }, [](caf::error&) {});
  return out;
}

/// Raw bytes that look like the start of a CAF (BASP) exchange: the peer must hang up on them.
bool raw_bytes_hang_up(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return false;
  }
  timeval tv{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  std::string junk(64, '\0');
  junk[0] = 0x00; // BASP header: operation "server handshake", then garbage
  for (size_t i = 1; i < junk.size(); ++i)
    junk[i] = static_cast<char>(i * 37);
  (void)::send(fd, junk.data(), junk.size(), MSG_NOSIGNAL);
  char buf[256];
  bool hung_up = false;
  for (int i = 0; i < 20; ++i) {
    auto n = ::recv(fd, buf, sizeof(buf), 0);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
      hung_up = true;
      break;
    }
    if (n < 0)
      break; // timed out: the peer neither answered nor hung up
    // A TLS alert may come first; keep reading until the close.
  }
  ::close(fd);
  return hung_up;
}

} // namespace

TEST_CASE("security: rogues without the cluster secret are refused and counted while serving goes on") {
  int d0_port = free_port();
  launched_cluster cluster("rogue", [&](const std::string& run_dir) {
    return "cluster: {name: rogue, run_dir: " + run_dir + "}\n" +
           "model: {path: " + fortune_model_dir() + "}\n"
           "gateway: {host: 127.0.0.1, port: 0}\n"
           "nodes:\n"
           "  - {name: p0, ranks: [cpu]}\n"
           "  - {name: d0, port: " + std::to_string(d0_port) + ", ranks: [cpu]}\n"
           "groups:\n"
           "  prefill: [{name: prefill0, nodes: [p0]}]\n"
           "  decode: [{name: decode0, nodes: [d0]}]\n";
  });
  auto run_dir = cluster.dir.path / "run" / "rogue";
  auto run = read_run_file((run_dir / "head.json").string());
  REQUIRE(run);
  CHECK(run->tls);
  // The per-launch secret: 0600, readable by this user only.
  auto secret = run_dir / "secret";
  REQUIRE(std::filesystem::exists(secret));
  CHECK((std::filesystem::status(secret).permissions() & std::filesystem::perms::all) ==
        (std::filesystem::perms::owner_read | std::filesystem::perms::owner_write));
  int head_port = run->head_port;
  REQUIRE(eventually(20s, [&] { return port_open(d0_port); }));
  auto refused_before = metric(cluster.port, "petrel_cluster_connections_refused_total");

  { // rogues on the head's port and on a node's port
    for (int port : {head_port, d0_port}) {
      CAPTURE(port);
      auto plain = within(30s, [&] { return plain_caf_attempt(port); });
      CHECK_MESSAGE(plain.rfind("refused", 0) == 0, plain);
      auto wrong = within(30s, [&] { return wrong_secret_attempt(port, "rogue"); });
      CHECK_MESSAGE(wrong.rfind("refused", 0) == 0, wrong);
      CHECK(within(30s, [&] { return raw_bytes_hang_up(port); }));
    }
    // Counted (the head's refusals are in its /metrics) and logged by the head and by the node,
    // with the peer's address and the reason.
    CHECK(eventually(10s, [&] {
      return metric(cluster.port, "petrel_cluster_connections_refused_total") >= std::max(0.0, refused_before) + 3;
    }));
    auto head_log = cluster.head->output();
    CHECK_MESSAGE(count_of(head_log, "petrel head: refused a cluster connection from 127.0.0.1") >= 3, head_log);
    auto node_log = file_text((run_dir / "d0.log").string());
    CHECK_MESSAGE(count_of(node_log, "petrel node d0: refused a cluster connection from 127.0.0.1") >= 3, node_log);
    // The rogue with TLS fails on the CA: the node refuses its certificate, or the rogue already
    // refuses the node's (TLS 1.3: the client checks the server first) and the node logs the alert.
    CHECK_MESSAGE((node_log.find("unknown ca") != std::string::npos ||
                   node_log.find("certificate") != std::string::npos),
                  node_log);
  }

  { // a real node process holding a wrong secret cannot join
    temp_dir rogue_dir;
    auto wrong = rogue_dir.file("secret", "0123456789abcdef0123456789abcdef-but-wrong\n");
    std::filesystem::permissions(wrong, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
    auto cfg = rogue_dir.file("cluster.yaml", "cluster: {name: rogue, run_dir: " + (rogue_dir.path / "run").string() +
                                                  "}\n" + "model: {path: " + fortune_model_dir() + "}\n" +
                                                  "security: {secret_file: " + wrong + "}\n"
                                                  "nodes:\n"
                                                  "  - {name: p0, ranks: [cpu]}\n"
                                                  "  - {name: d0, ranks: [cpu]}\n"
                                                  "groups:\n"
                                                  "  prefill: [{name: prefill0, nodes: [p0]}]\n"
                                                  "  decode: [{name: decode0, nodes: [d0]}]\n");
    auto r = run_petrel("node --config " + cfg + " --node d0 --head 127.0.0.1:" + std::to_string(head_port) +
                        " --epoch 1");
    // (1, or a crash while exiting after the refusal: rank.cpp's static pool list outlives the KV
    // engine; either way it never joined.)
    CHECK_MESSAGE(r.exit_code != 0, r.output);
    CHECK_MESSAGE(r.output.find("cannot reach the head") != std::string::npos, r.output);
    CHECK(eventually(10s, [&] {
      return count_of(cluster.head->output(), "petrel head: refused a cluster connection") >= 1;
    }));
  }

  // The cluster keeps serving: every node still runs its first incarnation, the operator's own
  // client (with the secret) still gets answers, and a request completes.
  auto status = run_petrel("status --json " + cluster.cfg);
  REQUIRE_MESSAGE(status.exit_code == 0, status.output);
  auto sj = json::parse(status.output);
  for (auto& n : sj["nodes"]) {
    CHECK(n["state"] == "running");
    CHECK(n["restarts"] == 0);
  }
  json body{{"input_ids", {72, 101, 108, 108, 111}}, {"sampling_params", {{"max_new_tokens", 8}, {"temperature", 0}}}};
  auto res = http_post(cluster.port, "/generate", body.dump());
  CHECK_MESSAGE(res.status == 200, res.body);
}

TEST_CASE("security: the cluster CA is the same for every holder of the secret and differs without it") {
  auto a = tls_identity::make("0123456789abcdef0123456789abcdef", "c1", "head");
  auto b = tls_identity::make("0123456789abcdef0123456789abcdef", "c1", "node d0");
  auto other_secret = tls_identity::make("0123456789abcdef0123456789abcdeX", "c1", "head");
  auto other_cluster = tls_identity::make("0123456789abcdef0123456789abcdef", "c2", "head");
  CHECK(a->ca_fingerprint() == b->ca_fingerprint());
  CHECK(a->ca_fingerprint() != other_secret->ca_fingerprint());
  CHECK(a->ca_fingerprint() != other_cluster->ca_fingerprint());
  CHECK(file_text(a->ca_path()) == file_text(b->ca_path()));
  // Each process gets a key of its own.
  CHECK(file_text(a->key_path()) != file_text(b->key_path()));
  CHECK(file_text(a->key_path()).find("PRIVATE KEY") != std::string::npos);
}

TEST_CASE("security: a secret file that others can read or that is short or missing is refused") {
  temp_dir dir;
  auto p = dir.file("secret", "0123456789abcdef0123456789abcdef\n");
  std::filesystem::permissions(p, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write |
                                      std::filesystem::perms::group_read);
  CHECK_THROWS_WITH_AS(read_cluster_secret(p, false), doctest::Contains("chmod 600"), config_error);
  std::filesystem::permissions(p, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  CHECK(read_cluster_secret(p, false) == "0123456789abcdef0123456789abcdef");
  auto short_one = dir.file("short", "tooshort\n");
  std::filesystem::permissions(short_one, std::filesystem::perms::owner_read);
  CHECK_THROWS_WITH_AS(read_cluster_secret(short_one, false), doctest::Contains("at least 16"), config_error);
  CHECK_THROWS_WITH_AS(read_cluster_secret((dir.path / "none").string(), false), doctest::Contains("none"),
                       config_error);
}
