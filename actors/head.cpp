// The head process: cluster_supervisor over node proxies, the head actor, the run file, and the
// client side of `petrel status` / `petrel stop`.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <thread>

#include <caf/all.hpp>
#include <caf/io/all.hpp>
#include <caf/openssl/manager.hpp>
#include <nlohmann/json.hpp>

#include "actors/cluster.hpp"
#include "actors/cluster_tls.hpp"
#include "actors/node_proxy.hpp"
#include "actors/process_signals.hpp"
#include "actors/serving.hpp"
#include "actors/supervisor.hpp"
#include "actors/system.hpp"

namespace petrel {

namespace fs = std::filesystem;
using json = nlohmann::json;

// -- run file ----------------------------------------------------------------------------------

std::string run_file_path(const cluster_config& cfg) {
  return (fs::path(cfg.cluster.run_dir) / cfg.cluster.name / "head.json").string();
}

std::optional<run_file> read_run_file(const std::string& path) {
  std::ifstream in(path);
  if (!in)
    return std::nullopt;
  try {
    auto j = json::parse(in);
    run_file r;
    r.cluster = j.at("cluster");
    r.head_pid = j.at("head_pid");
    r.head_host = j.at("head_host");
    r.head_port = j.at("head_port");
    r.gateway_host = j.value("gateway_host", "127.0.0.1");
    r.gateway_port = j.value("gateway_port", 0);
    r.config = j.value("config", "");
    r.tls = j.value("tls", false);
    r.secret_file = j.value("secret_file", "");
    return r;
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

namespace {

void write_run_file(const std::string& path, const run_file& r) {
  fs::create_directories(fs::path(path).parent_path());
  json j{{"cluster", r.cluster},       {"head_pid", r.head_pid},         {"head_host", r.head_host},
         {"head_port", r.head_port},   {"gateway_host", r.gateway_host}, {"gateway_port", r.gateway_port},
         {"config", r.config},         {"tls", r.tls},                   {"secret_file", r.secret_file}};
  auto tmp = path + ".tmp";
  std::ofstream(tmp) << j.dump(2) << "\n";
  fs::rename(tmp, path);
}

/// An unused loopback port, found by binding to port 0.
uint16_t pick_free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    if (fd >= 0)
      ::close(fd);
    throw std::runtime_error("cannot find a free port for the head");
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

/// True while `pid` runs; a zombie (exited, not yet reaped by its parent) counts as gone.
bool process_alive(int pid) {
  if (pid <= 0 || (::kill(pid, 0) != 0 && errno != EPERM))
    return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!stat || !std::getline(stat, line))
    return false;
  auto close = line.rfind(')');
  return close == std::string::npos || close + 2 >= line.size() || line[close + 2] != 'Z';
}

// -- the head actor ------------------------------------------------------------------------------

struct head_state {
  static inline const char* name = "petrel.head";

  cluster_config cfg;
  supervisor_actor cluster_supervisor;
  supervisor_actor service_supervisor; // gateway, router, schedulers
  std::string state = "running";
  uint16_t gateway_port = 0;
  std::vector<caf::response_promise> on_stopped;
};

using head_pointer = head_actor::stateful_pointer<head_state>;

head_actor::behavior_type head_impl(head_pointer self, cluster_config cfg, std::string config_path,
                                    uint16_t head_port, std::shared_ptr<std::atomic<uint16_t>> gateway_port) {
  auto& st = self->state;
  st.cfg = std::move(cfg);
  supervisor_spec spec;
  spec.name = "cluster_supervisor";
  spec.strategy = restart_strategy::one_for_one; // node processes fail independently
  spec.intensity = st.cfg.supervision.node_intensity;
  spec.period = st.cfg.supervision.node_period;
  spec.retry_delay = std::chrono::milliseconds(500);
  auto log_dir = fs::path(st.cfg.cluster.run_dir) / st.cfg.cluster.name;
  fs::create_directories(log_dir);
  for (auto& node : st.cfg.nodes) {
    node_proxy_config pc;
    pc.node = node.name;
    pc.group = st.cfg.group_of(node.name)->name;
    pc.config_path = config_path;
    pc.head_host = "127.0.0.1";
    pc.head_port = head_port;
    pc.log_path = (log_dir / (node.name + ".log")).string();
    pc.heartbeat = st.cfg.supervision.heartbeat;
    spec.children.push_back(child_spec{node.name, restart_type::permanent,
                                       [pc](caf::local_actor* parent, const child_context& ctx) {
                                         return spawn_node_proxy(parent, pc, ctx.epoch);
                                       },
                                       {}});
  }
  st.cluster_supervisor = spawn_supervisor(self->home_system(), std::move(spec));
  self->monitor(st.cluster_supervisor);
  // The serving actors run here, in the head, so their queues and request tables survive the
  // crash of any node process (docs/architecture.md).
  supervisor_spec services;
  services.name = "service_supervisor";
  services.strategy = restart_strategy::one_for_one;
  services.intensity = st.cfg.supervision.intensity;
  services.period = st.cfg.supervision.period;
  services.children = service_children(
      service_context{std::make_shared<const cluster_config>(st.cfg), caf::actor_cast<head_actor>(self), gateway_port});
  st.service_supervisor = spawn_supervisor(self->home_system(), std::move(services));
  self->monitor(st.service_supervisor);
  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    if (dm.source == st.service_supervisor.address() && st.state != "stopping") {
      st.state = "escalated";
      std::cerr << "petrel head: the serving actors gave up: " << describe(dm.reason) << "; stopping the cluster\n";
      self->anon_send(st.cluster_supervisor, stop_atom::value);
      return;
    }
    if (dm.source != st.cluster_supervisor.address())
      return;
    if (st.service_supervisor)
      self->send_exit(st.service_supervisor, caf::exit_reason::user_shutdown);
    if ((dm.reason && dm.reason != caf::exit_reason::user_shutdown) || st.state == "escalated") {
      st.state = "escalated";
      std::cerr << "petrel head: cluster supervisor gave up: " << describe(dm.reason)
                << "; every node process is stopped\n";
      self->quit(dm.reason ? dm.reason : make_error(petrel_errc::escalated, "serving actors"));
      return;
    }
    for (auto& rp : st.on_stopped)
      rp.deliver(caf::ok_atom::value);
    self->quit();
  });
  return {
      [self](hello_atom, node_hello& hello) -> caf::result<caf::ok_atom> {
        auto rp = self->make_response_promise<caf::ok_atom>();
        self->request(self->state.cluster_supervisor, std::chrono::seconds(5), whereis_atom::value, hello.node)
            .then(
                [self, rp, hello](caf::actor& proxy, uint64_t epoch) mutable {
                  if (epoch != hello.epoch) {
                    rp.deliver(make_error(petrel_errc::stale_epoch, "node '" + hello.node + "' epoch " +
                                                                        std::to_string(hello.epoch) +
                                                                        " was replaced by epoch " +
                                                                        std::to_string(epoch)));
                    return;
                  }
                  self->request(caf::actor_cast<node_proxy_actor>(proxy), std::chrono::seconds(5), hello_atom::value,
                                hello)
                      .then([rp](caf::ok_atom) mutable { rp.deliver(caf::ok_atom::value); },
                            [rp](caf::error& err) mutable { rp.deliver(err); });
                },
                [rp](caf::error& err) mutable { rp.deliver(err); });
        return rp;
      },
      [self](status_atom) -> caf::result<cluster_status> {
        auto rp = self->make_response_promise<cluster_status>();
        auto& st = self->state;
        cluster_status base{st.cfg.cluster.name, st.state, static_cast<int32_t>(::getpid()), st.gateway_port, {}};
        self->request(st.cluster_supervisor, std::chrono::seconds(5), children_atom::value)
            .then(
                [self, rp, base](std::vector<child_status>& nodes) mutable {
                  auto acc = std::make_shared<cluster_status>(base);
                  auto remaining = std::make_shared<size_t>(nodes.size());
                  acc->nodes.resize(nodes.size());
                  if (nodes.empty()) {
                    rp.deliver(*acc);
                    return;
                  }
                  for (size_t i = 0; i < nodes.size(); ++i) {
                    auto& n = nodes[i];
                    auto* grp = self->state.cfg.group_of(n.name);
                    acc->nodes[i] = node_status{n.name, grp ? grp->name : "", n.state, n.epoch, n.restarts, 0, {}};
                    auto done = [rp, acc, remaining]() mutable {
                      if (--*remaining == 0)
                        rp.deliver(*acc);
                    };
                    self->request(self->state.cluster_supervisor, std::chrono::seconds(2), whereis_atom::value,
                                  n.name)
                        .then(
                            [self, acc, i, done](caf::actor& proxy, uint64_t) mutable {
                              self->request(caf::actor_cast<node_proxy_actor>(proxy), std::chrono::seconds(3),
                                            status_atom::value)
                                  .then(
                                      [acc, i, done](node_status& ns) mutable {
                                        auto& slot = acc->nodes[i];
                                        slot.state = ns.state;
                                        slot.pid = ns.pid;
                                        slot.children = std::move(ns.children);
                                        done();
                                      },
                                      [done](caf::error&) mutable { done(); });
                            },
                            [done](caf::error&) mutable { done(); });
                  }
                },
                [rp](caf::error& err) mutable { rp.deliver(err); });
        return rp;
      },
      [self](kill_atom, const std::string& node) -> caf::result<int32_t> {
        auto rp = self->make_response_promise<int32_t>();
        self->request(self->state.cluster_supervisor, std::chrono::seconds(5), whereis_atom::value, node)
            .then(
                [self, rp](caf::actor& proxy, uint64_t) mutable {
                  self->request(caf::actor_cast<node_proxy_actor>(proxy), std::chrono::seconds(5), kill_atom::value)
                      .then([rp](int32_t pid) mutable { rp.deliver(pid); },
                            [rp](caf::error& err) mutable { rp.deliver(err); });
                },
                [rp](caf::error& err) mutable { rp.deliver(err); });
        return rp;
      },
      [self](whereis_atom, const std::string& node, const std::string& child) -> caf::result<caf::actor, uint64_t> {
        auto rp = self->make_response_promise<caf::actor, uint64_t>();
        self->request(self->state.cluster_supervisor, std::chrono::seconds(2), whereis_atom::value, node)
            .then(
                [self, rp, child](caf::actor& proxy, uint64_t) mutable {
                  self->request(caf::actor_cast<node_proxy_actor>(proxy), std::chrono::seconds(2), whereis_atom::value,
                                child)
                      .then([rp](caf::actor& a, uint64_t e) mutable { rp.deliver(a, e); },
                            [rp](caf::error& err) mutable { rp.deliver(err); });
                },
                [rp](caf::error& err) mutable { rp.deliver(err); });
        return rp;
      },
      [self](kill_atom, const std::string& node, const std::string& child) -> caf::result<uint64_t> {
        auto rp = self->make_response_promise<uint64_t>();
        if (node == "head") {
          // One of the head's serving actors (router, gateway, a scheduler): its supervisor restarts it.
          self->request(self->state.service_supervisor, std::chrono::seconds(2), whereis_atom::value, child)
              .then(
                  [self, rp](caf::actor& target, uint64_t epoch) mutable {
                    self->send_exit(target, caf::exit_reason::kill);
                    rp.deliver(epoch);
                  },
                  [rp](caf::error& err) mutable { rp.deliver(err); });
          return rp;
        }
        self->request(self->state.cluster_supervisor, std::chrono::seconds(2), whereis_atom::value, node)
            .then(
                [self, rp, child](caf::actor& proxy, uint64_t) mutable {
                  self->request(caf::actor_cast<node_proxy_actor>(proxy), std::chrono::seconds(3), kill_atom::value,
                                child)
                      .then([rp](uint64_t e) mutable { rp.deliver(e); },
                            [rp](caf::error& err) mutable { rp.deliver(err); });
                },
                [rp](caf::error& err) mutable { rp.deliver(err); });
        return rp;
      },
      [self](fault_atom, const std::string& node, const std::string& child,
             fault_spec& spec) -> caf::result<caf::ok_atom> {
        auto rp = self->make_response_promise<caf::ok_atom>();
        self->request(self->state.cluster_supervisor, std::chrono::seconds(2), whereis_atom::value, node)
            .then(
                [self, rp, child, spec](caf::actor& proxy, uint64_t) mutable {
                  self->request(caf::actor_cast<node_proxy_actor>(proxy), std::chrono::seconds(3),
                                whereis_atom::value, child)
                      .then(
                          [self, rp, spec](caf::actor& target, uint64_t) mutable {
                            self->request(target, std::chrono::seconds(3), fault_atom::value, spec)
                                .then([rp](caf::ok_atom) mutable { rp.deliver(caf::ok_atom::value); },
                                      [rp](caf::error& err) mutable { rp.deliver(err); });
                          },
                          [rp](caf::error& err) mutable { rp.deliver(err); });
                },
                [rp](caf::error& err) mutable { rp.deliver(err); });
        return rp;
      },
      [self](rebalance_atom, const std::string& group) -> caf::result<std::string> {
        // The group's eplb_rebalancer owns rebalancing: it asks the group's ranks and counts what it did.
        auto* g = self->state.cfg.find_group(group);
        if (!g)
          return make_error(petrel_errc::bad_request, "no group named '" + group + "'");
        if (g->ep_size <= 1)
          return make_error(petrel_errc::bad_request,
                            "group '" + group + "' is not expert-parallel (it has one rank; ep_size 1)");
        auto rp = self->make_response_promise<std::string>();
        self->request(self->state.service_supervisor, std::chrono::seconds(2), whereis_atom::value,
                      eplb_rebalancer_name(group))
            .then(
                [self, rp](caf::actor& rebalancer, uint64_t) mutable {
                  self->request(caf::actor_cast<eplb_rebalancer_actor>(rebalancer), std::chrono::seconds(40),
                                rebalance_atom::value)
                      .then([rp](std::string& stats) mutable { rp.deliver(std::move(stats)); },
                            [rp](caf::error& err) mutable { rp.deliver(err); });
                },
                [rp](caf::error& err) mutable { rp.deliver(err); });
        return rp;
      },
      [self](stop_atom) -> caf::result<caf::ok_atom> {
        auto rp = self->make_response_promise<caf::ok_atom>();
        auto& st = self->state;
        st.on_stopped.push_back(rp);
        if (st.state != "stopping") {
          st.state = "stopping";
          if (st.service_supervisor)
            self->send_exit(st.service_supervisor, caf::exit_reason::user_shutdown);
          // The supervisor's own answer is not needed: its exit (down_msg) completes the stop.
          self->request(st.cluster_supervisor, caf::infinite, stop_atom::value).then([](caf::ok_atom) {});
        }
        return rp;
      },
  };
}

} // namespace

bool cluster_running(const run_file& run) {
  return process_alive(run.head_pid);
}

int run_head(const cluster_config& cfg, const head_options& opts) {
  auto path = run_file_path(cfg);
  if (auto existing = read_run_file(path); existing && cluster_running(*existing))
    throw config_error(cfg.source + ": cluster '" + cfg.cluster.name + "' is already running (head pid " +
                       std::to_string(existing->head_pid) + "); run `petrel stop " + cfg.source +
                       "` first or give this one another cluster.name");
  signal_watcher signals; // blocks SIGINT/SIGTERM before CAF starts its threads
  petrel_config sys_cfg;
  // Who may join: every peer of the head (nodes, CLI clients) needs a certificate of the CA that the
  // cluster secret defines. Without security.secret_file the head makes a fresh secret per launch.
  std::unique_ptr<tls_identity> tls;
  bool generated_secret = cfg.security.tls && cfg.security.secret_file.empty();
  if (cfg.security.tls) {
    if (generated_secret)
      create_cluster_secret(cfg);
    tls = tls_identity::make(read_cluster_secret(cluster_secret_path(cfg), generated_secret), cfg.cluster.name,
                             "head");
    sys_cfg.use_tls(*tls);
    set_tls_endpoint_name("head");
  }
  caf::actor_system sys{sys_cfg};
  auto config_path = fs::absolute(opts.config_path).string();
  // The node proxies need the head's port before the head is published: pick it first.
  uint16_t port = cfg.transport.head.port != 0 ? cfg.transport.head.port : pick_free_port();
  auto gateway_port = std::make_shared<std::atomic<uint16_t>>(0);
  auto head = sys.spawn(head_impl, cfg, config_path, port, gateway_port);
  auto published = publish_cluster_port(head, port, cfg.transport.head.host);
  if (!published) {
    anon_send_exit(head, caf::exit_reason::kill);
    throw std::runtime_error("cannot publish the head on " + cfg.transport.head.host + ":" + std::to_string(port) +
                             ": " + sys.render(published.error()));
  }
  // The run file names the gateway's real port (it may have been 0 = any).
  for (int i = 0; i < 200 && gateway_port->load() == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  run_file rf{cfg.cluster.name, static_cast<int>(::getpid()), "127.0.0.1", *published,
              cfg.gateway.address.host, gateway_port->load(), config_path,
              cfg.security.tls, cfg.security.tls ? fs::absolute(cluster_secret_path(cfg)).string() : ""};
  write_run_file(path, rf);
  if (opts.on_ready)
    opts.on_ready(rf);
  signals.on_signal([head](int) { caf::anon_send(head, stop_atom::value); });
  caf::error reason;
  {
    caf::scoped_actor self{sys};
    self->monitor(head);
    self->receive([&](caf::down_msg& dm) { reason = dm.reason; });
  }
  std::error_code ec;
  fs::remove(path, ec);
  if (generated_secret) // every node process is gone by now: the secret of this launch has no use left
    fs::remove(cluster_secret_path(cfg), ec);
  if (sys.has_openssl_manager()) {
    // (caf/openssl/unpublish.hpp of 0.17.6 does not compile: ask its middleman actor directly.)
    caf::scoped_actor self{sys};
    self->request(sys.openssl_manager().actor_handle(), std::chrono::seconds(2), caf::unpublish_atom::value,
                  caf::actor_cast<caf::actor_addr>(head), *published)
        .receive([] {}, [](caf::error&) {});
  } else
    sys.middleman().unpublish(head, *published);
  return reason && reason != caf::exit_reason::user_shutdown ? 1 : 0;
}

// -- clients: status and stop --------------------------------------------------------------------

namespace {

std::string show_epoch(uint64_t epoch) {
  if (epoch >> 32)
    return std::to_string(epoch >> 32) + "." + std::to_string(epoch & 0xffffffffu);
  return std::to_string(epoch);
}

template <class F>
int with_head(const run_file& run, std::string& out, F f) {
  if (!process_alive(run.head_pid)) {
    out = "cluster '" + run.cluster + "' is not running (its head, pid " + std::to_string(run.head_pid) +
          ", is gone; the run file is stale)\n";
    return 1;
  }
  petrel_config sys_cfg;
  std::unique_ptr<tls_identity> tls;
  if (run.tls) {
    try {
      tls = tls_identity::make(read_cluster_secret(run.secret_file, false), run.cluster, "client");
    } catch (const std::exception& e) {
      out = "cannot join cluster '" + run.cluster + "': " + e.what() + "\n";
      return 1;
    }
    sys_cfg.use_tls(*tls);
  }
  caf::actor_system sys{sys_cfg};
  auto head = connect_cluster_port<head_actor>(sys, run.head_host, static_cast<uint16_t>(run.head_port));
  if (!head) {
    out = "cannot reach the head of cluster '" + run.cluster + "' at " + run.head_host + ":" +
          std::to_string(run.head_port) + ": " + sys.render(head.error()) + "\n";
    return 1;
  }
  return f(sys, *head);
}

} // namespace

int print_cluster_status(const run_file& run, bool as_json, std::string& out) {
  return with_head(run, out, [&](caf::actor_system& sys, head_actor head) {
    caf::scoped_actor self{sys};
    int rc = 1;
    self->request(head, std::chrono::seconds(10), status_atom::value)
        .receive(
            [&](cluster_status& cs) {
              rc = 0;
              std::ostringstream os;
              if (as_json) {
                json j{{"cluster", cs.cluster}, {"state", cs.state}, {"head_pid", cs.head_pid},
                       {"gateway_port", cs.gateway_port}, {"nodes", json::array()}};
                for (auto& n : cs.nodes) {
                  json jn{{"name", n.name}, {"group", n.group}, {"state", n.state}, {"epoch", n.epoch},
                          {"restarts", n.restarts}, {"pid", n.pid}, {"children", json::array()}};
                  for (auto& c : n.children)
                    jn["children"].push_back({{"name", c.name}, {"state", c.state}, {"epoch", c.epoch},
                                              {"restarts", c.restarts}, {"detail", c.detail}});
                  j["nodes"].push_back(jn);
                }
                os << j.dump(2) << "\n";
              } else {
                os << "cluster " << cs.cluster << "  state " << cs.state << "  head pid " << cs.head_pid << "\n";
                os << std::left << std::setw(10) << "NODE" << std::setw(10) << "GROUP" << std::setw(20) << "ACTOR"
                   << std::setw(12) << "STATE" << std::setw(8) << "EPOCH" << std::setw(10) << "RESTARTS"
                   << "PID\n";
                for (auto& n : cs.nodes) {
                  os << std::setw(10) << n.name << std::setw(10) << n.group << std::setw(20) << "(process)"
                     << std::setw(12) << n.state << std::setw(8) << show_epoch(n.epoch) << std::setw(10)
                     << n.restarts << n.pid << "\n";
                  for (auto& c : n.children)
                    os << std::setw(10) << "" << std::setw(10) << "" << std::setw(20) << c.name << std::setw(12)
                       << c.state << std::setw(8) << show_epoch(c.epoch) << std::setw(10) << c.restarts
                       << c.detail << "\n";
                }
              }
              out = os.str();
            },
            [&](caf::error& err) { out = "the head did not answer: " + describe(err) + "\n"; });
    return rc;
  });
}

int inject_fault(const run_file& run, const fault_request& f, std::string& out) {
  return with_head(run, out, [&](caf::actor_system& sys, head_actor head) {
    caf::scoped_actor self{sys};
    int rc = 1;
    auto on_error = [&](caf::error& err) { out = describe(err); };
    if (f.kind == "kill") {
      self->request(head, std::chrono::seconds(5), kill_atom::value, f.node, f.child)
          .receive([&](uint64_t epoch) { rc = 0, out = std::to_string(epoch); }, on_error);
    } else if (f.kind == "kill_node") {
      self->request(head, std::chrono::seconds(5), kill_atom::value, f.node)
          .receive([&](int32_t pid) { rc = 0, out = std::to_string(pid); }, on_error);
    } else {
      fault_spec spec{f.kind, f.peer, f.factor, f.prob, f.delay_ms, f.duration_ms, f.seed};
      auto child = f.kind == "slow" || f.kind == "gpu_fault" ? f.child : std::string("kv_agent");
      self->request(head, std::chrono::seconds(5), fault_atom::value, f.node, child, spec)
          .receive([&](caf::ok_atom) { rc = 0, out = "ok"; }, on_error);
    }
    return rc;
  });
}

int request_rebalance(const run_file& run, const std::string& group, std::string& out) {
  return with_head(run, out, [&](caf::actor_system& sys, head_actor head) {
    caf::scoped_actor self{sys};
    int rc = 1;
    self->request(head, std::chrono::seconds(45), rebalance_atom::value, group)
        .receive([&](std::string& stats) { rc = 0, out = std::move(stats); },
                 [&](caf::error& err) {
                   out = describe(err);
                   if (err.category() == caf::atom("petrel") && err.code() == static_cast<uint8_t>(petrel_errc::bad_request))
                     rc = 2;
                 });
    return rc;
  });
}

int stop_cluster(const run_file& run, std::chrono::milliseconds timeout, std::string& out) {
  return with_head(run, out, [&](caf::actor_system& sys, head_actor head) {
    caf::scoped_actor self{sys};
    int rc = 1;
    self->request(head, timeout, stop_atom::value)
        .receive([&](caf::ok_atom) { rc = 0; },
                 [&](caf::error& err) {
                   // The head may drop the connection as it exits: judge by its process below.
                   out = "stop: " + describe(err) + "\n";
                 });
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (process_alive(run.head_pid) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (process_alive(run.head_pid)) {
      out += "cluster '" + run.cluster + "' did not stop within " + std::to_string(timeout.count()) + " ms\n";
      return 1;
    }
    out = "cluster '" + run.cluster + "' stopped\n";
    (void)rc;
    return 0;
  });
}

} // namespace petrel
