#include "runtime/ep_transport.hpp"

#include <algorithm>
#include <thread>

namespace petrel::ep {

class inprocess_exchange::endpoint final : public ep_transport {
public:
  endpoint(inprocess_exchange& x, int rank) : x_(x), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return x_.size_; }
  void start_all_to_all(uint64_t tag, std::span<const std::span<const std::byte>> send) override {
    if (int(send.size()) != x_.size_)
      throw std::invalid_argument("start_all_to_all: " + std::to_string(send.size()) + " parts for a group of " +
                                  std::to_string(x_.size_));
    for (int d = 0; d < x_.size_; ++d) x_.deliver(rank_, d, tag, send[size_t(d)]);
  }
  void wait_all_to_all(uint64_t tag, std::vector<byte_buffer>& recv) override { x_.collect(rank_, tag, recv); }
  void abort(const std::string& reason) override { x_.fail(reason); }
  void on_abort(std::function<void(const std::string&)> hook) override { x_.set_hook(rank_, std::move(hook)); }

private:
  inprocess_exchange& x_;
  int rank_;
};

inprocess_exchange::inprocess_exchange(int size, std::chrono::microseconds delay)
    : size_(size), boxes_(size_t(std::max(size, 0))), delay_(delay) {
  if (size <= 0) throw std::invalid_argument("inprocess_exchange: the group needs at least one rank");
}

inprocess_exchange::~inprocess_exchange() = default;

std::unique_ptr<ep_transport> inprocess_exchange::make_rank(int rank) {
  if (rank < 0 || rank >= size_)
    throw std::invalid_argument("inprocess_exchange: rank " + std::to_string(rank) + " outside the group of " +
                                std::to_string(size_));
  return std::make_unique<endpoint>(*this, rank);
}

void inprocess_exchange::set_delay(std::chrono::microseconds d) {
  std::lock_guard lock(mu_);
  delay_ = d;
}

uint64_t inprocess_exchange::bytes_sent() const {
  std::lock_guard lock(mu_);
  return bytes_;
}

void inprocess_exchange::deliver(int from, int to, uint64_t tag, std::span<const std::byte> bytes) {
  byte_buffer copy(bytes.begin(), bytes.end()); // outside the lock
  std::lock_guard lock(mu_);
  if (aborted_) return; // the waits report it
  arrival& a = boxes_[size_t(to)].by_tag[tag];
  if (a.parts.empty()) {
    a.parts.resize(size_t(size_));
    a.present.assign(size_t(size_), false);
    a.ready = std::chrono::steady_clock::now();
  }
  if (a.present[size_t(from)])
    throw std::logic_error("inprocess_exchange: rank " + std::to_string(from) + " sent tag " + std::to_string(tag) +
                           " twice to rank " + std::to_string(to));
  a.parts[size_t(from)] = std::move(copy);
  a.present[size_t(from)] = true;
  a.ready = std::max(a.ready, std::chrono::steady_clock::now() + delay_);
  bytes_ += bytes.size();
  if (++a.count == size_) cv_.notify_all();
}

void inprocess_exchange::collect(int rank, uint64_t tag, std::vector<byte_buffer>& recv) {
  std::chrono::steady_clock::time_point ready;
  {
    std::unique_lock lock(mu_);
    mailbox& box = boxes_[size_t(rank)];
    cv_.wait(lock, [&] {
      if (aborted_) return true;
      auto it = box.by_tag.find(tag);
      return it != box.by_tag.end() && it->second.count == size_;
    });
    if (aborted_) throw transport_error("expert all-to-all aborted: " + abort_reason_);
    auto it = box.by_tag.find(tag);
    recv = std::move(it->second.parts);
    ready = it->second.ready;
    box.by_tag.erase(it);
  }
  // The simulated wire time: the data is here, but not before `delay` after the last part left its sender.
  std::this_thread::sleep_until(ready);
}

void inprocess_exchange::fail(const std::string& reason) {
  std::lock_guard lock(mu_);
  if (!aborted_) {
    aborted_ = true;
    abort_reason_ = reason;
    // Under the lock, so that a hook is never called after its rank removed it.
    for (auto& h : hooks_)
      if (h) h(reason);
  }
  cv_.notify_all();
}

void inprocess_exchange::set_hook(int rank, std::function<void(const std::string&)> hook) {
  std::lock_guard lock(mu_);
  if (hooks_.size() < size_t(size_)) hooks_.resize(size_t(size_));
  hooks_.at(size_t(rank)) = std::move(hook);
  if (aborted_ && hooks_[size_t(rank)]) hooks_[size_t(rank)](abort_reason_);
}

} // namespace petrel::ep
