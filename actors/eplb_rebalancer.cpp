// eplb_rebalancer: one per expert-parallel group, in the head. Once a second it reads the group's EP
// statistics through the group's scheduler, exports the group's balancedness, and starts a live EPLB
// rebalance when balancedness falls below the group's `rebalance_below` (at most once per `min_steps` steps),
// or when asked (`petrel rebalance`). The ranks then carry the rebalance out among themselves at their next
// step boundary (runtime/ep.hpp): gather loads, compute the placement, move weights, switch.
#include <caf/all.hpp>
#include <nlohmann/json.hpp>

#include "actors/serving.hpp"
#include "runtime/metrics.hpp"

namespace petrel {

namespace {

using namespace std::chrono_literals;

struct rebalancer_state {
  static inline const char* name = "petrel.eplb_rebalancer";

  service_context sc;
  group_section group;
  supervisor_actor services;
  int64_t steps_at_last_trigger = -1; // the group's step count when it last started a rebalance
  bool asking = false;
};

using rebalancer_pointer = eplb_rebalancer_actor::stateful_pointer<rebalancer_state>;

metrics::gauge_family& balancedness_gauge() {
  static auto& family = metrics::global_registry().add_gauge(
      "petrel_eplb_balancedness",
      "Mean over an EP group's ranks of mean/max expert load per rank, for the routing each rank's tokens asked for "
      "(1 = balanced)",
      {"group"});
  return family;
}

metrics::counter_family& rebalances_counter() {
  static auto& family = metrics::global_registry().add_counter(
      "petrel_eplb_rebalances_total", "Live EPLB rebalances started, by trigger (manual or balancedness)",
      {"group", "trigger"});
  return family;
}

/// Asks the group's scheduler for its ranks' statistics (and, with `trigger`, for a rebalance); `then` gets the
/// JSON array text, `failed` the error.
template <class Then, class Failed>
void ask_scheduler(rebalancer_pointer self, bool trigger, Then then, Failed failed) {
  auto& st = self->state;
  bool prefill = st.group.role == group_role::prefill;
  auto name = prefill ? prefill_scheduler_name(st.group.name) : decode_scheduler_name(st.group.name);
  self->request(st.services, 2s, whereis_atom::value, name)
      .then(
          [self, prefill, trigger, then, failed](caf::actor& scheduler, uint64_t) {
            if (prefill)
              self->request(caf::actor_cast<prefill_scheduler_actor>(scheduler), 35s, rebalance_atom::value, trigger)
                  .then(then, failed);
            else
              self->request(caf::actor_cast<decode_scheduler_actor>(scheduler), 35s, rebalance_atom::value, trigger)
                  .then(then, failed);
          },
          failed);
}

/// (mean balancedness over the ranks that report one, the group's step count) from the ranks' statistics.
std::pair<double, int64_t> summarize(const std::string& stats) {
  auto ranks = nlohmann::json::parse(stats, nullptr, false);
  double sum = 0;
  int n = 0;
  int64_t steps = 0;
  if (ranks.is_array())
    for (auto& r : ranks) {
      if (r.contains("balancedness") && r["balancedness"].is_number())
        sum += r["balancedness"].get<double>(), ++n;
      steps = std::max<int64_t>(steps, r.value("steps", int64_t{0}));
    }
  return {n > 0 ? sum / n : -1.0, steps};
}

eplb_rebalancer_actor::behavior_type rebalancer_impl(rebalancer_pointer self, service_context sc, group_section group,
                                                     supervisor_actor services) {
  auto& st = self->state;
  st.sc = std::move(sc);
  st.group = std::move(group);
  st.services = std::move(services);
  self->send(self, tick_atom::value);
  return {
      [self](rebalance_atom) -> caf::result<std::string> {
        auto rp = self->make_response_promise<std::string>();
        ask_scheduler(
            self, true,
            [self, rp](std::string& stats) mutable {
              rebalances_counter().with({self->state.group.name, "manual"}).inc();
              self->state.steps_at_last_trigger = summarize(stats).second;
              rp.deliver(std::move(stats));
            },
            [rp](caf::error& err) mutable { rp.deliver(err); });
        return rp;
      },
      [self](tick_atom) {
        auto& st = self->state;
        self->delayed_send(self, 1s, tick_atom::value);
        if (st.asking)
          return;
        st.asking = true;
        ask_scheduler(
            self, false,
            [self](std::string& stats) {
              auto& st = self->state;
              st.asking = false;
              auto [balancedness, steps] = summarize(stats);
              if (balancedness < 0)
                return; // no rank has routed a token yet
              balancedness_gauge().with({st.group.name}).set(balancedness);
              bool due = st.steps_at_last_trigger < 0 || steps - st.steps_at_last_trigger >= st.group.rebalance_min_steps;
              if (st.group.rebalance_below > 0 && balancedness < st.group.rebalance_below && due) {
                st.steps_at_last_trigger = steps;
                rebalances_counter().with({st.group.name, "balancedness"}).inc();
                ask_scheduler(self, true, [](std::string&) {}, [](caf::error&) {});
              }
            },
            [self](caf::error&) { self->state.asking = false; }); // group not formed yet, or restarting
      },
  };
}

} // namespace

caf::actor spawn_eplb_rebalancer(caf::local_actor* parent, const service_context& sc, const group_section& group,
                                 const child_context& ctx) {
  return caf::actor_cast<caf::actor>(parent->spawn(rebalancer_impl, sc, group, ctx.supervisor));
}

} // namespace petrel
