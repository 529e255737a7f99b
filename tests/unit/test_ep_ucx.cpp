// The expert all-to-all over UCX (tcp on loopback): two ranks, each with its own UCX context and worker, driven by
// its own thread, serve one model as an EP group and generate what the single-rank model generates. A rank that
// fails aborts the other through the transport.
#include <doctest/doctest.h>

#include <filesystem>
#include <thread>

#include "runtime/ep.hpp"
#include "runtime/generation.hpp"
#include "runtime/sampling.hpp"
#include "transport/ep_ucx.hpp"

using namespace petrel;
using namespace petrel::ep;
namespace fs = std::filesystem;

namespace {

const fs::path kTiny = fs::path(PETREL_SOURCE_DIR) / "tests/data/golden/tiny_fp32";

std::vector<std::unique_ptr<transport::ep_ucx_transport>> connected_group(int n) {
  transport::ep_ucx_options o;
  o.transports = "tcp";
  o.net_devices = "lo";
  o.wait_timeout = std::chrono::milliseconds(20'000);
  std::vector<std::unique_ptr<transport::ep_ucx_transport>> ts;
  std::vector<std::vector<uint8_t>> addrs;
  for (int r = 0; r < n; ++r) {
    ts.push_back(transport::ep_ucx_transport::create(r, n, o));
    addrs.push_back(ts.back()->address());
  }
  for (auto& t : ts) t->connect(addrs);
  return ts;
}

} // namespace

TEST_CASE("EP over UCX: two ranks with their own workers generate what one rank generates") {
  if (!fs::exists(kTiny / "golden.json")) return;
  const std::vector<std::vector<int32_t>> prompts = {{10, 20, 30, 40, 50, 60}, {7, 8, 9}};
  const int64_t max_new = 8;
  std::vector<std::vector<int32_t>> want;
  {
    auto be = make_backend("cpu");
    auto m = deepseek_model::load(kTiny, *be);
    kv_pool kv(*be, m->config(), 16, 16);
    generate_options o;
    o.max_new_tokens = max_new;
    for (const auto& p : prompts) want.push_back(generate(*m, kv, p, o).output_ids);
  }
  auto ts = connected_group(2);
  std::vector<std::vector<int32_t>> got(2);
  std::vector<std::string> errors(2);
  std::vector<int64_t> rebalances(2, 0);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      try {
        auto be = make_backend("cpu");
        const model_config cfg = model_config::load(kTiny);
        ep_options opt;
        opt.two_batch_overlap = true; // on both ranks: the step header checks that they agree
        ep_rank rank(deepseek_model::load(kTiny, *be), initial_placement(cfg, 2, 2), *ts[size_t(r)], opt);
        kv_pool kv(*be, cfg, 8, 16);
        kv_page_table t;
        REQUIRE(kv.reserve(t, int64_t(prompts[size_t(r)].size()) + max_new));
        // Rank r owns prompt r; both ranks take the same number of steps (prefill, then max_new - 1 decodes).
        step_result out;
        sequence_step s{prompts[size_t(r)], 0, t.pages, false};
        rank.step({&s, 1}, kv, out);
        int32_t next = argmax(out.last(0));
        got[size_t(r)].push_back(next);
        int64_t pos = int64_t(prompts[size_t(r)].size());
        for (int64_t i = 1; i < max_new; ++i) {
          if (i == 3) rank.request_rebalance(); // a live rebalance over UCX too
          sequence_step d{std::span<const int32_t>(&next, 1), pos++, t.pages, false};
          rank.step({&d, 1}, kv, out);
          next = argmax(out.last(0));
          got[size_t(r)].push_back(next);
        }
        rank.step({}, kv, out); // a zero-token step: both ranks still meet
        rebalances[size_t(r)] = rank.stats().rebalances;
      } catch (const std::exception& e) {
        errors[size_t(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  CHECK(errors[0].empty());
  CHECK(errors[1].empty());
  CHECK(got[0] == want[0]);
  CHECK(got[1] == want[1]);
  CHECK(rebalances == std::vector<int64_t>{1, 1}); // expert weights moved between the workers
}

TEST_CASE("EP over UCX: a failing rank aborts its peer instead of leaving it waiting") {
  if (!fs::exists(kTiny / "golden.json")) return;
  auto ts = connected_group(2);
  std::vector<std::string> errors(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      try {
        auto be = make_backend("cpu");
        const model_config cfg = model_config::load(kTiny);
        ep_rank rank(deepseek_model::load(kTiny, *be), initial_placement(cfg, 2, 0), *ts[size_t(r)], {});
        kv_pool kv(*be, cfg, 4, 16);
        kv_page_table t;
        REQUIRE(kv.reserve(t, 8));
        std::vector<int32_t> ids = {1, 2, r == 1 ? int32_t(cfg.vocab_size) : 3}; // rank 1: a bad token id
        sequence_step s{ids, 0, t.pages, false};
        step_result out;
        rank.step({&s, 1}, kv, out);
      } catch (const std::exception& e) {
        errors[size_t(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  CHECK(errors[1].find("outside the vocabulary") != std::string::npos);
  CHECK(errors[0].find("aborted") != std::string::npos);
  CHECK(errors[0].find("outside the vocabulary") != std::string::npos); // the reason travelled
}

TEST_CASE("EP over UCX: poll() hears a peer's abort or its loss while the rank waits elsewhere, and calls the hook once") {
  // What a rank waiting on its GPU relies on (the backend's wait hook calls poll): no all-to-all is pending.
  auto poll_until_throw = [](transport::ep_ucx_transport& t) -> std::string {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < until) {
      try {
        t.poll();
      } catch (const transport_error& e) {
        return e.what();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return "no failure heard within 10 s";
  };
  SUBCASE("a peer's abort message") {
    auto ts = connected_group(2);
    std::vector<std::string> heard;
    ts[0]->on_abort([&](const std::string& why) { heard.push_back(why); });
    ts[0]->poll(); // nothing yet: no throw
    ts[1]->abort("rank 1 lost its GPU (test)");
    const std::string e = poll_until_throw(*ts[0]);
    CHECK(e.find("rank 1 lost its GPU (test)") != std::string::npos);
    REQUIRE(heard.size() == 1);
    CHECK(heard[0].find("rank 1 lost its GPU (test)") != std::string::npos);
    CHECK_THROWS_AS(ts[0]->poll(), transport_error); // stays failed, the hook is not called again
    CHECK(heard.size() == 1);
  }
  SUBCASE("a peer that is gone (its worker and connections closed)") {
    auto ts = connected_group(2);
    // One exchange first, so that the tcp connections exist.
    std::vector<std::thread> th;
    for (int r = 0; r < 2; ++r)
      th.emplace_back([&, r] {
        const std::byte b{1};
        std::vector<std::span<const std::byte>> parts(2, std::span<const std::byte>(&b, 1));
        ts[size_t(r)]->start_all_to_all(7, parts);
        std::vector<byte_buffer> got;
        ts[size_t(r)]->wait_all_to_all(7, got);
      });
    for (auto& t : th) t.join();
    std::vector<std::string> heard;
    ts[0]->on_abort([&](const std::string& why) { heard.push_back(why); });
    ts[1].reset(); // no abort message: what a killed process leaves behind is a closed connection
    const auto t0 = std::chrono::steady_clock::now();
    const std::string e = poll_until_throw(*ts[0]);
    MESSAGE("rank 0 heard after " << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()
                                  << " s: " << e);
    CHECK(e.find("lost EP peer rank 1") != std::string::npos);
    CHECK(heard.size() == 1);
  }
}
