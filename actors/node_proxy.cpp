// node_proxy: the head-side stand-in of one node process. The cluster_supervisor supervises proxies
// like any other child; a proxy lives exactly as long as its process and that process's connection,
// so "restart the child" means "start a new process with a new epoch".
#include "actors/node_proxy.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <thread>

#include <caf/all.hpp>

namespace petrel {

namespace {

struct node_proxy_state {
  static inline const char* name = "petrel.node_proxy";

  node_proxy_config config;
  uint64_t epoch = 0;
  pid_t pid = 0;
  bool exited = false;
  bool stopping = false;
  std::string state = "starting";
  caf::actor node_supervisor;
  caf::error exit_reason_on_process_exit;
  int missed_beats = 0;
};

using proxy_pointer = node_proxy_actor::stateful_pointer<node_proxy_state>;

std::string self_exe() {
  std::error_code ec;
  auto p = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string("petrel") : p.string();
}

/// fork + exec of `petrel node ...`, with output appended to the node's log and the child killed
/// if the head dies (PR_SET_PDEATHSIG), so that no node process outlives its head.
pid_t spawn_node_process(const node_proxy_config& cfg, uint64_t epoch) {
  std::vector<std::string> args{self_exe(), "node", "--config", cfg.config_path, "--node", cfg.node,
                                "--head", cfg.head_host + ":" + std::to_string(cfg.head_port),
                                "--epoch", std::to_string(epoch)};
  std::vector<char*> argv;
  for (auto& a : args)
    argv.push_back(a.data());
  argv.push_back(nullptr);
  int log_fd = ::open(cfg.log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) {
    if (log_fd >= 0)
      ::close(log_fd);
    throw std::runtime_error("fork failed for node '" + cfg.node + "'");
  }
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent)
      ::_exit(127);
    ::setpgid(0, 0); // signals aimed at the head's terminal group do not hit nodes directly
    if (log_fd >= 0) {
      ::dup2(log_fd, 1);
      ::dup2(log_fd, 2);
    }
    int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0)
      ::dup2(devnull, 0);
    // Inherit nothing else: without this the node would hold the head's sockets (the gateway's
    // listener, CAF and UCX connections) open, and a restarted gateway could not bind its port again.
    if (::close_range(3, ~0U, 0) != 0)
      for (int fd = 3; fd < 65536; ++fd)
        ::close(fd);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  if (log_fd >= 0)
    ::close(log_fd);
  return pid;
}

std::string describe_wait_status(int status) {
  if (WIFEXITED(status))
    return "exited with code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return std::string("killed by signal ") + strsignal(WTERMSIG(status));
  return "ended (status " + std::to_string(status) + ")";
}

void kill_process(proxy_pointer self, int sig) {
  if (self->state.pid > 0 && !self->state.exited)
    ::kill(self->state.pid, sig);
}

node_proxy_actor::behavior_type node_proxy_impl(proxy_pointer self, node_proxy_config cfg, uint64_t epoch) {
  auto& st = self->state;
  st.config = std::move(cfg);
  st.epoch = epoch;
  st.pid = spawn_node_process(st.config, epoch);
  // The reaper: one thread per process, blocked in waitpid, reports the exit as a message.
  std::thread([pid = st.pid, proxy = caf::actor_cast<node_proxy_actor>(self)] {
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    caf::anon_send(proxy, exited_atom::value, static_cast<int32_t>(pid), static_cast<int32_t>(status));
  }).detach();
  // A node that does not register in time is killed, which counts as a crash.
  self->delayed_send(self, st.config.register_timeout, tick_atom::value);
  self->set_down_handler([self](caf::down_msg& dm) {
    auto& st = self->state;
    if (dm.source != st.node_supervisor.address())
      return;
    st.node_supervisor = nullptr;
    if (st.stopping)
      return;
    // The node's supervisor ended (escalated) or its connection broke: the process is gone or
    // useless. Make sure it is gone and report it as a crash.
    st.exit_reason_on_process_exit =
        make_error(petrel_errc::node_unreachable, "node '" + st.config.node + "' lost: " + describe(dm.reason));
    st.state = "failed";
    kill_process(self, SIGKILL);
  });
  self->set_exit_handler([self](caf::exit_msg& em) {
    auto& st = self->state;
    if (st.stopping)
      return;
    st.stopping = true;
    st.state = "stopping";
    if (em.reason == caf::exit_reason::kill) {
      kill_process(self, SIGKILL);
    } else {
      // Orderly: ask the node to stop its actors, then SIGTERM; SIGKILL if it lingers.
      if (st.node_supervisor)
        self->request(caf::actor_cast<supervisor_actor>(st.node_supervisor), st.config.stop_timeout, stop_atom::value)
            .then([](caf::ok_atom) {}, [](caf::error&) {});
      kill_process(self, SIGTERM);
      self->delayed_send(self, st.config.stop_timeout, tick_atom::value);
    }
    if (st.exited)
      self->quit();
  });
  return {
      [self](hello_atom, node_hello& hello) -> caf::result<caf::ok_atom> {
        auto& st = self->state;
        if (hello.epoch != st.epoch || hello.pid != st.pid)
          return make_error(petrel_errc::stale_epoch, "node '" + hello.node + "' epoch " +
                                                          std::to_string(hello.epoch) + " is not the running epoch " +
                                                          std::to_string(st.epoch));
        st.node_supervisor = hello.supervisor;
        self->monitor(st.node_supervisor);
        st.state = "running";
        self->delayed_send(self, st.config.heartbeat, beat_atom::value);
        return caf::ok_atom::value;
      },
      [self](status_atom) -> caf::result<node_status> {
        auto& st = self->state;
        node_status ns{st.config.node, st.config.group, st.state, st.epoch, 0, static_cast<int32_t>(st.pid), {}};
        if (!st.node_supervisor)
          return ns;
        auto rp = self->make_response_promise<node_status>();
        self->request(caf::actor_cast<supervisor_actor>(st.node_supervisor), std::chrono::seconds(2),
                      children_atom::value)
            .then(
                [rp, ns](std::vector<child_status>& children) mutable {
                  ns.children = std::move(children);
                  rp.deliver(ns);
                },
                [rp, ns](caf::error& err) mutable {
                  ns.state = "unresponsive (" + describe(err) + ")";
                  rp.deliver(ns);
                });
        return rp;
      },
      [self](whereis_atom, const std::string& child) -> caf::result<caf::actor, uint64_t> {
        auto& st = self->state;
        if (!st.node_supervisor)
          return make_error(petrel_errc::node_unreachable, "node '" + st.config.node + "' is " + st.state);
        auto rp = self->make_response_promise<caf::actor, uint64_t>();
        self->request(caf::actor_cast<supervisor_actor>(st.node_supervisor), std::chrono::seconds(2),
                      whereis_atom::value, child)
            .then([rp](caf::actor& a, uint64_t e) mutable { rp.deliver(a, e); },
                  [rp](caf::error& err) mutable { rp.deliver(err); });
        return rp;
      },
      [self](kill_atom, const std::string& child) -> caf::result<uint64_t> {
        auto& st = self->state;
        if (!st.node_supervisor)
          return make_error(petrel_errc::node_unreachable, "node '" + st.config.node + "' is " + st.state);
        auto rp = self->make_response_promise<uint64_t>();
        self->request(caf::actor_cast<supervisor_actor>(st.node_supervisor), std::chrono::seconds(2), kill_atom::value,
                      child)
            .then([rp](uint64_t e) mutable { rp.deliver(e); }, [rp](caf::error& err) mutable { rp.deliver(err); });
        return rp;
      },
      [self](beat_atom) {
        auto& st = self->state;
        if (st.exited || st.stopping || !st.node_supervisor)
          return;
        self->request(caf::actor_cast<supervisor_actor>(st.node_supervisor), st.config.heartbeat * 3,
                      children_atom::value)
            .then(
                [self](std::vector<child_status>&) {
                  self->state.missed_beats = 0;
                  self->delayed_send(self, self->state.config.heartbeat, beat_atom::value);
                },
                [self](caf::error& err) {
                  auto& st = self->state;
                  if (st.exited || st.stopping)
                    return;
                  if (++st.missed_beats >= 2) {
                    st.exit_reason_on_process_exit = make_error(
                        petrel_errc::node_unreachable,
                        "node '" + st.config.node + "' missed " + std::to_string(st.missed_beats) +
                            " heartbeats (" + describe(err) + ")");
                    st.state = "unresponsive";
                    kill_process(self, SIGKILL);
                    return;
                  }
                  self->send(self, beat_atom::value);
                });
      },
      [self](kill_atom) -> int32_t {
        kill_process(self, SIGKILL);
        return static_cast<int32_t>(self->state.pid);
      },
      [self](exited_atom, int32_t pid, int32_t status) {
        auto& st = self->state;
        if (pid != st.pid)
          return;
        st.exited = true;
        if (st.stopping) {
          self->quit();
          return;
        }
        auto reason = st.exit_reason_on_process_exit
                          ? st.exit_reason_on_process_exit
                          : make_error(petrel_errc::node_exited,
                                       "node '" + st.config.node + "' (pid " + std::to_string(pid) + ") " +
                                           describe_wait_status(status));
        self->quit(reason);
      },
      [self](tick_atom) {
        auto& st = self->state;
        if (st.exited)
          return;
        if (st.stopping) { // stop_timeout passed
          kill_process(self, SIGKILL);
          return;
        }
        if (!st.node_supervisor) { // register_timeout passed
          st.exit_reason_on_process_exit = make_error(
              petrel_errc::node_unreachable, "node '" + st.config.node + "' did not register within " +
                                                 std::to_string(st.config.register_timeout.count()) + " ms");
          kill_process(self, SIGKILL);
        }
      },
  };
}

} // namespace

caf::actor spawn_node_proxy(caf::local_actor* parent, node_proxy_config cfg, uint64_t epoch) {
  return caf::actor_cast<caf::actor>(parent->spawn(node_proxy_impl, std::move(cfg), epoch));
}

} // namespace petrel
