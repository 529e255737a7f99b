#include "actors/supervisor.hpp"

#include <deque>
#include <optional>

#include <caf/all.hpp>

namespace petrel {

const char* to_string(restart_type t) {
  switch (t) {
    case restart_type::permanent: return "permanent";
    case restart_type::transient: return "transient";
    case restart_type::temporary: return "temporary";
  }
  return "?";
}

caf::error epoch_fence::check(uint64_t stamped) const {
  if (stamped == epoch)
    return caf::none;
  return make_error(petrel_errc::stale_epoch,
                    "message for epoch " + std::to_string(stamped) + ", this incarnation is " +
                        std::to_string(epoch));
}

namespace {

using clock_type = caf::actor_clock;

struct child_entry {
  child_spec spec;
  caf::actor handle;
  uint64_t epoch = 0;
  uint32_t restarts = 0;
  std::string state = "starting";
  std::string last_exit;
  bool expected_exit = false; // we asked it to terminate; its down_msg is not a crash
  std::vector<caf::response_promise> on_started; // restart(name, epoch) callers
};

struct supervisor_state {
  static inline const char* name = "petrel.supervisor";

  supervisor_spec spec;
  std::vector<child_entry> children;
  std::deque<clock_type::time_point> restart_times;
  uint64_t epoch_counter = 0;
  size_t awaiting_down = 0;       // terminations still under way
  std::vector<size_t> pending;    // children to (re)start once awaiting_down reaches zero
  bool stopping = false;
  caf::error escalation;          // set when the intensity was exceeded
  std::vector<caf::response_promise> on_stopped;
};

using supervisor_pointer = supervisor_actor::stateful_pointer<supervisor_state>;

std::optional<size_t> find_child(supervisor_pointer self, const std::string& name) {
  auto& cs = self->state.children;
  for (size_t i = 0; i < cs.size(); ++i)
    if (cs[i].spec.name == name)
      return i;
  return std::nullopt;
}

std::optional<size_t> find_child(supervisor_pointer self, const caf::actor_addr& addr) {
  auto& cs = self->state.children;
  for (size_t i = 0; i < cs.size(); ++i)
    if (cs[i].handle && cs[i].handle.address() == addr)
      return i;
  return std::nullopt;
}

void start_pending(supervisor_pointer self);

void start_child(supervisor_pointer self, size_t i) {
  auto& st = self->state;
  auto& c = st.children[i];
  c.epoch = st.spec.epoch_base + ++st.epoch_counter;
  c.expected_exit = false;
  child_context ctx{c.spec.name, c.epoch, caf::actor_cast<supervisor_actor>(self)};
  caf::actor handle;
  std::string failure;
  try {
    handle = c.spec.start(self, ctx);
    if (!handle)
      failure = "start function returned no actor";
  } catch (const std::exception& e) {
    failure = e.what();
  }
  if (!handle) {
    // A failed start counts like a crash; retry after a pause so a persistent failure escalates
    // through the intensity limit rather than spinning.
    c.state = "failed";
    c.last_exit = "start failed: " + failure;
    c.handle = nullptr;
    caf::delayed_anon_send(caf::actor_cast<caf::actor>(self), st.spec.retry_delay, restart_atom::value, c.spec.name,
                       uint64_t{0});
    return;
  }
  c.handle = handle;
  c.state = "running";
  self->monitor(handle);
  for (auto& rp : c.on_started)
    rp.deliver(c.epoch);
  c.on_started.clear();
}

void terminate_child(supervisor_pointer self, size_t i) {
  auto& c = self->state.children[i];
  if (!c.handle || c.expected_exit)
    return; // not running, or already asked to terminate
  c.expected_exit = true;
  c.state = "stopping";
  ++self->state.awaiting_down;
  self->send_exit(c.handle, caf::exit_reason::user_shutdown);
}

void finish_stop(supervisor_pointer self) {
  auto& st = self->state;
  for (auto& rp : st.on_stopped)
    rp.deliver(caf::ok_atom::value);
  st.on_stopped.clear();
  if (st.escalation)
    self->quit(st.escalation);
  else
    self->quit();
}

void start_pending(supervisor_pointer self) {
  auto& st = self->state;
  if (st.awaiting_down > 0)
    return;
  if (st.stopping) {
    finish_stop(self);
    return;
  }
  auto pending = std::move(st.pending);
  st.pending.clear();
  for (auto i : pending)
    if (i < st.children.size() && !st.children[i].handle)
      start_child(self, i);
}

/// Terminates every child in reverse start order, then quits (with `reason` when set).
void shut_down(supervisor_pointer self, caf::error reason) {
  auto& st = self->state;
  if (reason && !st.escalation)
    st.escalation = std::move(reason);
  if (st.stopping)
    return; // already under way; finish_stop answers every waiting caller
  st.stopping = true;
  st.pending.clear();
  for (size_t i = st.children.size(); i-- > 0;)
    terminate_child(self, i);
  start_pending(self); // quits at once when nothing runs
}

/// Records one restart decision; false when the intensity is exceeded.
bool within_intensity(supervisor_pointer self) {
  auto& st = self->state;
  auto now = self->clock().now();
  st.restart_times.push_back(now);
  while (!st.restart_times.empty() && now - st.restart_times.front() > st.spec.period)
    st.restart_times.pop_front();
  return static_cast<int>(st.restart_times.size()) <= st.spec.intensity;
}

void on_child_down(supervisor_pointer self, size_t i, const caf::error& reason) {
  auto& st = self->state;
  auto& c = st.children[i];
  c.handle = nullptr;
  c.last_exit = reason ? describe(reason) : "normal";
  if (c.expected_exit) {
    c.state = "stopped";
    --st.awaiting_down;
    start_pending(self);
    return;
  }
  if (st.stopping)
    return;
  bool abnormal = reason && reason != caf::exit_reason::user_shutdown;
  bool restart = c.spec.restart == restart_type::permanent ||
                 (c.spec.restart == restart_type::transient && abnormal);
  if (!restart) {
    c.state = "stopped";
    if (c.spec.restart == restart_type::temporary)
      st.children.erase(st.children.begin() + static_cast<long>(i));
    return;
  }
  if (!within_intensity(self)) {
    c.state = "failed";
    shut_down(self, make_error(petrel_errc::escalated,
                               st.spec.name + ": child '" + c.spec.name + "' needed more than " +
                                   std::to_string(st.spec.intensity) + " restarts within " +
                                   std::to_string(st.spec.period.count()) + " ms (last exit: " + c.last_exit +
                                   ")"));
    return;
  }
  c.state = "restarting";
  switch (st.spec.strategy) {
    case restart_strategy::one_for_one:
      ++c.restarts;
      st.pending.push_back(i);
      break;
    case restart_strategy::one_for_all:
      for (size_t j = st.children.size(); j-- > 0;)
        if (j != i)
          terminate_child(self, j);
      for (size_t j = 0; j < st.children.size(); ++j) {
        ++st.children[j].restarts;
        st.pending.push_back(j);
      }
      break;
    case restart_strategy::rest_for_one:
      for (size_t j = st.children.size(); j-- > i + 1;)
        terminate_child(self, j);
      for (size_t j = i; j < st.children.size(); ++j) {
        ++st.children[j].restarts;
        st.pending.push_back(j);
      }
      break;
  }
  start_pending(self);
}

supervisor_actor::behavior_type supervisor_impl(supervisor_pointer self, supervisor_spec spec) {
  auto& st = self->state;
  st.spec = std::move(spec);
  for (auto& cs : st.spec.children)
    st.children.push_back(child_entry{cs, nullptr, 0, 0, "starting", {}, false, {}});
  st.spec.children.clear();
  self->set_down_handler([self](caf::down_msg& dm) {
    if (auto i = find_child(self, dm.source))
      on_child_down(self, *i, dm.reason);
  });
  // The supervisor traps exits: an exit from its parent (user_shutdown) is an orderly stop of the
  // subtree; any other linked exit is treated the same way.
  self->set_exit_handler([self](caf::exit_msg& em) { shut_down(self, caf::none); (void)em; });
  for (size_t i = 0; i < st.children.size(); ++i)
    start_child(self, i);
  return {
      [self](whereis_atom, const std::string& name) -> caf::result<caf::actor, uint64_t> {
        auto i = find_child(self, name);
        if (!i)
          return make_error(petrel_errc::no_such_child, self->state.spec.name + " has no child '" + name + "'");
        auto& c = self->state.children[*i];
        if (!c.handle)
          return make_error(petrel_errc::stale_epoch, "child '" + name + "' is " + c.state + " (not running)");
        return {c.handle, c.epoch};
      },
      [self](children_atom) -> std::vector<child_status> {
        std::vector<child_status> out;
        for (auto& c : self->state.children)
          out.push_back(child_status{c.spec.name, c.state, c.epoch, c.restarts,
                                     c.spec.detail.empty() ? c.last_exit : c.spec.detail});
        return out;
      },
      [self](restart_atom, const std::string& name, uint64_t epoch) -> caf::result<uint64_t> {
        auto& st = self->state;
        auto i = find_child(self, name);
        if (!i)
          return make_error(petrel_errc::no_such_child, st.spec.name + " has no child '" + name + "'");
        auto& c = st.children[*i];
        if (epoch == 0) { // internal retry of a failed start
          if (!c.handle && !st.stopping) {
            if (!within_intensity(self)) {
              shut_down(self, make_error(petrel_errc::escalated,
                                         st.spec.name + ": child '" + name + "' keeps failing to start (" +
                                             c.last_exit + ")"));
              return make_error(petrel_errc::escalated, name);
            }
            ++c.restarts;
            start_child(self, *i);
          }
          return c.epoch;
        }
        if (epoch != c.epoch || !c.handle)
          return make_error(petrel_errc::stale_epoch, "child '" + name + "' runs epoch " +
                                                          std::to_string(c.epoch) + ", not " +
                                                          std::to_string(epoch));
        auto rp = self->make_response_promise<uint64_t>();
        c.on_started.push_back(rp);
        ++c.restarts;
        terminate_child(self, *i);
        st.pending.push_back(*i);
        return rp;
      },
      [self](kill_atom, const std::string& name) -> caf::result<uint64_t> {
        auto i = find_child(self, name);
        if (!i)
          return make_error(petrel_errc::no_such_child, self->state.spec.name + " has no child '" + name + "'");
        auto& c = self->state.children[*i];
        if (!c.handle)
          return make_error(petrel_errc::stale_epoch, "child '" + name + "' is not running");
        self->send_exit(c.handle, caf::exit_reason::kill);
        return c.epoch;
      },
      [self](stop_atom) -> caf::result<caf::ok_atom> {
        auto rp = self->make_response_promise<caf::ok_atom>();
        self->state.on_stopped.push_back(rp);
        shut_down(self, caf::none);
        return rp;
      },
  };
}

} // namespace

supervisor_actor spawn_supervisor(caf::actor_system& sys, supervisor_spec spec) {
  return sys.spawn(supervisor_impl, std::move(spec));
}

} // namespace petrel
