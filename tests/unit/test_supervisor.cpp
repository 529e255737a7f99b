// Supervisor semantics under CAF's deterministic test coordinator: strategies, restart types,
// intensity with escalation, and epoch fencing.
#include <doctest/doctest.h>

#include <map>

#include <caf/all.hpp>

#include "actors/supervisor.hpp"
#include "actors/system.hpp"

using namespace petrel;
using namespace std::chrono_literals;

namespace {

using finish_atom = caf::atom_constant<caf::atom("finish")>;
using crash_atom = caf::atom_constant<caf::atom("crash")>;

/// A supervised worker: answers ping with its epoch, accepts epoch-stamped work, and can be told to
/// exit normally or to crash.
caf::behavior worker(caf::event_based_actor* self, uint64_t epoch) {
  return {
      [=](ping_atom) { return caf::make_message(pong_atom::value, epoch); },
      [=](epoch_atom, uint64_t stamped, int value) -> caf::result<int> {
        if (auto err = epoch_fence{epoch}.check(stamped))
          return err;
        return value * 2;
      },
      [=](finish_atom) { self->quit(); },
      [=](crash_atom) { self->quit(make_error(petrel_errc::rank_failed, "injected crash")); },
  };
}

child_spec worker_spec(std::string name, restart_type type = restart_type::permanent) {
  return child_spec{std::move(name), type,
                    [](caf::local_actor* parent, const child_context& ctx) {
                      return parent->spawn(worker, ctx.epoch);
                    },
                    {}};
}

struct fixture {
  petrel_config cfg{true};
  caf::actor_system sys{cfg};
  caf::scheduler::test_coordinator& sched = dynamic_cast<caf::scheduler::test_coordinator&>(sys.scheduler());
  caf::scoped_actor self{sys, true};

  supervisor_actor start(restart_strategy strategy, std::vector<child_spec> children, int intensity = 10,
                         std::chrono::milliseconds period = 10s) {
    supervisor_spec spec;
    spec.name = "test_supervisor";
    spec.strategy = strategy;
    spec.intensity = intensity;
    spec.period = period;
    spec.children = std::move(children);
    auto sup = spawn_supervisor(sys, std::move(spec));
    sched.run();
    return sup;
  }

  std::map<std::string, child_status> children(const supervisor_actor& sup) {
    self->send(sup, children_atom::value);
    sched.run();
    std::map<std::string, child_status> out;
    self->receive([&](std::vector<child_status>& xs) {
      for (auto& x : xs)
        out[x.name] = x;
    }, caf::after(0s) >> [] { FAIL("supervisor did not answer"); });
    return out;
  }

  std::pair<caf::actor, uint64_t> whereis(const supervisor_actor& sup, const std::string& name) {
    self->send(sup, whereis_atom::value, name);
    sched.run();
    std::pair<caf::actor, uint64_t> out;
    self->receive([&](caf::actor& a, uint64_t e) { out = {a, e}; },
                  [&](caf::error& err) { FAIL("whereis failed: " << describe(err)); },
                  caf::after(0s) >> [] { FAIL("supervisor did not answer"); });
    return out;
  }

  void kill(const supervisor_actor& sup, const std::string& name) {
    self->send(sup, kill_atom::value, name);
    sched.run();
    self->receive([](uint64_t) {}, [](caf::error& err) { FAIL("kill failed: " << describe(err)); },
                  caf::after(0s) >> [] { FAIL("supervisor did not answer"); });
  }

  template <class Msg>
  void tell(const std::pair<caf::actor, uint64_t>& child, Msg msg) {
    caf::anon_send(child.first, msg);
    sched.run();
  }
};

std::map<std::string, uint64_t> epochs(const std::map<std::string, child_status>& cs) {
  std::map<std::string, uint64_t> out;
  for (auto& [k, v] : cs)
    out[k] = v.epoch;
  return out;
}

} // namespace

TEST_CASE_FIXTURE(fixture, "one_for_one restarts only the crashed child with a new epoch") {
  auto sup = start(restart_strategy::one_for_one, {worker_spec("a"), worker_spec("b"), worker_spec("c")});
  auto before = epochs(children(sup));
  CHECK(before.size() == 3);
  kill(sup, "b");
  auto after = children(sup);
  CHECK(after["a"].epoch == before["a"]);
  CHECK(after["c"].epoch == before["c"]);
  CHECK(after["b"].epoch > before["b"]);
  CHECK(after["b"].restarts == 1);
  CHECK(after["b"].state == "running");
  // The name resolves to the new incarnation, which answers with its own epoch.
  auto b = whereis(sup, "b");
  CHECK(b.second == after["b"].epoch);
}

TEST_CASE_FIXTURE(fixture, "one_for_all restarts every child") {
  auto sup = start(restart_strategy::one_for_all, {worker_spec("a"), worker_spec("b"), worker_spec("c")});
  auto before = epochs(children(sup));
  kill(sup, "b");
  auto after = children(sup);
  for (auto& name : {"a", "b", "c"}) {
    CHECK(after[name].epoch > before[name]);
    CHECK(after[name].state == "running");
    CHECK(after[name].restarts == 1);
  }
}

TEST_CASE_FIXTURE(fixture, "rest_for_one restarts the crashed child and those started after it") {
  auto sup = start(restart_strategy::rest_for_one, {worker_spec("a"), worker_spec("b"), worker_spec("c")});
  auto before = epochs(children(sup));
  kill(sup, "b");
  auto after = children(sup);
  CHECK(after["a"].epoch == before["a"]);
  CHECK(after["b"].epoch > before["b"]);
  CHECK(after["c"].epoch > before["c"]);
  CHECK(after["a"].restarts == 0);
}

TEST_CASE_FIXTURE(fixture, "restart types: permanent, transient and temporary") {
  auto sup = start(restart_strategy::one_for_one,
                   {worker_spec("perm", restart_type::permanent), worker_spec("trans", restart_type::transient),
                    worker_spec("temp", restart_type::temporary)});
  auto before = epochs(children(sup));
  SUBCASE("a normal exit restarts permanent children only") {
    tell(whereis(sup, "perm"), finish_atom::value);
    tell(whereis(sup, "trans"), finish_atom::value);
    auto after = children(sup);
    CHECK(after["perm"].epoch > before["perm"]);
    CHECK(after["perm"].state == "running");
    CHECK(after["trans"].state == "stopped");
    CHECK(after["trans"].epoch == before["trans"]);
  }
  SUBCASE("a crash restarts transient children, and removes temporary ones") {
    tell(whereis(sup, "trans"), crash_atom::value);
    tell(whereis(sup, "temp"), crash_atom::value);
    auto after = children(sup);
    CHECK(after["trans"].epoch > before["trans"]);
    CHECK(after["trans"].state == "running");
    CHECK(after.count("temp") == 0);
  }
}

TEST_CASE_FIXTURE(fixture, "exceeding the restart intensity escalates to the parent") {
  auto sup = start(restart_strategy::one_for_one, {worker_spec("a"), worker_spec("b")}, 2, 10s);
  self->monitor(sup);
  auto a_handle = whereis(sup, "a").first;
  kill(sup, "b");
  kill(sup, "b");
  // Two restarts within the window are allowed; outside the window they are forgotten.
  sched.advance_time(11s);
  sched.run();
  kill(sup, "b");
  kill(sup, "b");
  CHECK(children(sup)["b"].state == "running");
  // The third restart within 10 s exceeds the intensity of 2.
  self->send(sup, kill_atom::value, std::string("b"));
  sched.run();
  bool escalated = false;
  bool a_stopped = false;
  self->monitor(a_handle); // already dead: the down message comes at once
  sched.run();
  for (int i = 0; i < 3; ++i)
    self->receive([](uint64_t) {},
                  [&](caf::down_msg& dm) {
                    if (dm.source == sup.address())
                      escalated = dm.reason.category() == caf::atom("petrel") &&
                                  dm.reason.code() == static_cast<uint8_t>(petrel_errc::escalated);
                    else if (dm.source == a_handle.address())
                      a_stopped = true;
                  },
                  caf::after(0s) >> [] {});
  CHECK(escalated);
  CHECK(a_stopped); // the supervisor terminated its other children before giving up
}

TEST_CASE_FIXTURE(fixture, "messages stamped with a stale epoch are refused") {
  auto sup = start(restart_strategy::one_for_one, {worker_spec("rank0")});
  auto first = whereis(sup, "rank0");
  // The current incarnation accepts work for its epoch and refuses any other.
  self->send(first.first, epoch_atom::value, first.second, 21);
  sched.run();
  self->receive([](int x) { CHECK(x == 42); }, [](caf::error& e) { FAIL(describe(e)); },
                caf::after(0s) >> [] { FAIL("no answer"); });
  kill(sup, "rank0");
  auto second = whereis(sup, "rank0");
  REQUIRE(second.second != first.second);
  // A client that still holds the old epoch is refused by the new incarnation.
  self->send(second.first, epoch_atom::value, first.second, 21);
  sched.run();
  bool refused = false;
  self->receive([](int) { FAIL("stale message accepted"); },
                [&](caf::error& e) {
                  refused = e.code() == static_cast<uint8_t>(petrel_errc::stale_epoch);
                },
                caf::after(0s) >> [] { FAIL("no answer"); });
  CHECK(refused);
  // The supervisor refuses a restart aimed at an incarnation that is already gone.
  self->send(sup, restart_atom::value, std::string("rank0"), first.second);
  sched.run();
  bool restart_refused = false;
  self->receive([](uint64_t) { FAIL("stale restart accepted"); },
                [&](caf::error& e) {
                  restart_refused = e.code() == static_cast<uint8_t>(petrel_errc::stale_epoch);
                },
                caf::after(0s) >> [] { FAIL("no answer"); });
  CHECK(restart_refused);
  // ... and performs one aimed at the live incarnation, answering the new epoch.
  self->send(sup, restart_atom::value, std::string("rank0"), second.second);
  sched.run();
  self->receive([&](uint64_t e) { CHECK(e > second.second); }, [](caf::error& e) { FAIL(describe(e)); },
                caf::after(0s) >> [] { FAIL("no answer"); });
}

TEST_CASE_FIXTURE(fixture, "a child whose start fails is retried and escalates when it keeps failing") {
  supervisor_spec spec;
  spec.intensity = 2;
  spec.retry_delay = 100ms;
  spec.children.push_back(child_spec{"broken", restart_type::permanent,
                                     [](caf::local_actor*, const child_context&) -> caf::actor {
                                       throw std::runtime_error("no device");
                                     },
                                     {}});
  auto sup = spawn_supervisor(sys, std::move(spec));
  self->monitor(sup);
  sched.run();
  for (int i = 0; i < 5; ++i) {
    sched.advance_time(100ms);
    sched.run();
  }
  bool escalated = false;
  self->receive([&](caf::down_msg& dm) {
    escalated = dm.reason.code() == static_cast<uint8_t>(petrel_errc::escalated);
  }, caf::after(0s) >> [] {});
  CHECK(escalated);
}

TEST_CASE_FIXTURE(fixture, "stop terminates the children and then the supervisor") {
  auto sup = start(restart_strategy::one_for_one, {worker_spec("a"), worker_spec("b")});
  auto a = whereis(sup, "a").first;
  self->monitor(a);
  self->monitor(sup);
  self->send(sup, stop_atom::value);
  sched.run();
  int downs = 0;
  bool ok = false;
  for (int i = 0; i < 3; ++i)
    self->receive([&](caf::ok_atom) { ok = true; }, [&](caf::down_msg&) { ++downs; }, caf::after(0s) >> [] {});
  CHECK(ok);
  CHECK(downs == 2);
}
