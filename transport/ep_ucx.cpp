#include "transport/ep_ucx.hpp"

#include <cstring>
#include <map>
#include <stdexcept>

#include <ucp/api/ucp.h>

namespace petrel::transport {

using petrel::ep::byte_buffer;
using petrel::ep::transport_error;

namespace {

constexpr uint64_t k_abort_phase = 0xf;             // phases 1..5 are the group's; 15 carries an abort reason
constexpr uint64_t k_group_tag_mask = (uint64_t(1) << 56) - 1;

uint64_t ucx_tag(int src, uint64_t tag) { return (uint64_t(src) << 56) | (tag & k_group_tag_mask); }

std::string ucs_error(const std::string& what, ucs_status_t s) { return what + ": " + ucs_status_string(s); }

} // namespace

struct ep_ucx_transport::impl {
  int rank = 0, size = 1;
  ep_ucx_options opts;
  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  std::vector<uint8_t> address;
  std::vector<ucp_ep_h> eps;
  std::vector<int> ep_rank_of; // err-handler argument storage
  bool aborted = false;
  std::string abort_reason;
  std::function<void(const std::string&)> abort_hook; // ep_transport::on_abort; called once, on the rank's thread
  bool hook_called = false;
  std::map<uint64_t, std::vector<void*>> sends;                  // tag -> send requests in flight
  std::map<uint64_t, std::vector<byte_buffer>> self_parts;       // tag -> this rank's part to itself
  std::vector<std::pair<impl*, int>> err_args;
  static constexpr char k_dummy = 0;

  ~impl() {
    std::vector<void*> closing;
    for (ucp_ep_h ep : eps) {
      if (!ep) continue;
      // A group that ends normally closes gracefully: the endpoint flushes what it still sends, so a peer that
      // is still reading this rank's last parts gets them (a forced close resets the tcp connection, and a slower
      // peer then fails its last wait). An aborted group has nothing worth delivering: force.
      ucp_request_param_t param{};
      param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      param.flags = aborted ? UCP_EP_CLOSE_FLAG_FORCE : 0;
      void* req = ucp_ep_close_nbx(ep, &param);
      if (UCS_PTR_IS_PTR(req)) closing.push_back(req);
    }
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(aborted ? 500 : 5000);
    while (!closing.empty() && std::chrono::steady_clock::now() < until) {
      ucp_worker_progress(worker);
      for (size_t i = 0; i < closing.size();)
        if (ucp_request_check_status(closing[i]) != UCS_INPROGRESS) {
          ucp_request_free(closing[i]);
          closing[i] = closing.back();
          closing.pop_back();
        } else {
          ++i;
        }
    }
    for (void* r : closing) ucp_request_free(r);
    for (auto& [tag, reqs] : sends)
      for (void* r : reqs) ucp_request_free(r);
    if (worker) ucp_worker_destroy(worker);
    if (context) ucp_cleanup(context);
  }

  static void on_endpoint_error(void* arg, ucp_ep_h, ucs_status_t status) {
    auto* a = static_cast<std::pair<impl*, int>*>(arg);
    if (!a->first->aborted) {
      a->first->aborted = true;
      a->first->abort_reason = "lost EP peer rank " + std::to_string(a->second) + " (" + ucs_status_string(status) + ")";
    }
  }

  void fail_if_aborted() {
    if (!aborted) return;
    if (abort_hook && !hook_called) {
      hook_called = true;
      abort_hook(abort_reason);
    }
    throw transport_error("expert all-to-all aborted: " + abort_reason);
  }

  /// Receives an abort reason a peer sent, if any.
  void poll_abort_messages() {
    ucp_tag_recv_info_t info{};
    ucp_tag_message_h msg = ucp_tag_probe_nb(worker, k_abort_phase, 0xf, 1, &info);
    if (!msg) return;
    std::string reason(info.length, '\0');
    ucp_request_param_t param{};
    void* req = ucp_tag_msg_recv_nbx(worker, reason.empty() ? const_cast<char*>(&k_dummy) : reason.data(),
                                     info.length, msg, &param);
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(1);
    while (UCS_PTR_IS_PTR(req) && ucp_request_check_status(req) == UCS_INPROGRESS &&
           std::chrono::steady_clock::now() < until)
      ucp_worker_progress(worker);
    if (UCS_PTR_IS_PTR(req)) ucp_request_free(req);
    aborted = true;
    abort_reason = "rank " + std::to_string(int(info.sender_tag >> 56)) + ": " + reason;
  }
};

ep_ucx_transport::ep_ucx_transport(std::unique_ptr<impl> p) : p_(std::move(p)) {}
ep_ucx_transport::~ep_ucx_transport() = default;

std::unique_ptr<ep_ucx_transport> ep_ucx_transport::create(int rank, int size, const ep_ucx_options& opts) {
  if (size < 1 || size > 255 || rank < 0 || rank >= size)
    throw std::invalid_argument("ep_ucx_transport: rank " + std::to_string(rank) + " of a group of " +
                                std::to_string(size) + " (1..255 ranks)");
  auto p = std::make_unique<impl>();
  p->rank = rank;
  p->size = size;
  p->opts = opts;
  ucp_config_t* config = nullptr;
  ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
  if (s != UCS_OK) throw transport_error(ucs_error("ucp_config_read", s));
  s = ucp_config_modify(config, "TLS", opts.transports.c_str());
  if (s == UCS_OK && !opts.net_devices.empty()) s = ucp_config_modify(config, "NET_DEVICES", opts.net_devices.c_str());
  if (s != UCS_OK) {
    ucp_config_release(config);
    throw transport_error(ucs_error("ucp_config_modify (TLS=" + opts.transports + ")", s));
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME;
  params.features = UCP_FEATURE_TAG;
  params.name = "petrel-ep";
  s = ucp_init(&params, config, &p->context);
  ucp_config_release(config);
  if (s != UCS_OK) throw transport_error(ucs_error("ucp_init (TLS=" + opts.transports + ")", s));
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE; // the rank's thread only
  s = ucp_worker_create(p->context, &wp, &p->worker);
  if (s != UCS_OK) throw transport_error(ucs_error("ucp_worker_create", s));
  ucp_address_t* addr = nullptr;
  size_t len = 0;
  s = ucp_worker_get_address(p->worker, &addr, &len);
  if (s != UCS_OK) throw transport_error(ucs_error("ucp_worker_get_address", s));
  p->address.assign(reinterpret_cast<const uint8_t*>(addr), reinterpret_cast<const uint8_t*>(addr) + len);
  ucp_worker_release_address(p->worker, addr);
  p->eps.assign(size_t(size), nullptr);
  p->err_args.resize(size_t(size));
  return std::unique_ptr<ep_ucx_transport>(new ep_ucx_transport(std::move(p)));
}

std::vector<uint8_t> ep_ucx_transport::address() const { return p_->address; }
int ep_ucx_transport::rank() const { return p_->rank; }
int ep_ucx_transport::size() const { return p_->size; }

void ep_ucx_transport::connect(const std::vector<std::vector<uint8_t>>& addresses) {
  impl& p = *p_;
  if (int(addresses.size()) != p.size)
    throw std::invalid_argument("ep_ucx_transport::connect: " + std::to_string(addresses.size()) +
                                " addresses for a group of " + std::to_string(p.size));
  for (int r = 0; r < p.size; ++r) {
    if (r == p.rank || p.eps[size_t(r)]) continue;
    if (addresses[size_t(r)].empty()) throw std::invalid_argument("ep_ucx_transport::connect: no address for rank " + std::to_string(r));
    p.err_args[size_t(r)] = {&p, r};
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.address = reinterpret_cast<const ucp_address_t*>(addresses[size_t(r)].data());
    const bool peer_mode = p.opts.transports.find("tcp") != std::string::npos;
    ep.err_mode = peer_mode ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
    if (peer_mode) {
      ep.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep.err_handler.cb = &impl::on_endpoint_error;
      ep.err_handler.arg = &p.err_args[size_t(r)];
    }
    ucs_status_t s = ucp_ep_create(p.worker, &ep, &p.eps[size_t(r)]);
    if (s != UCS_OK) throw transport_error(ucs_error("connect to EP rank " + std::to_string(r), s));
  }
}

void ep_ucx_transport::start_all_to_all(uint64_t tag, std::span<const std::span<const std::byte>> send) {
  impl& p = *p_;
  p.fail_if_aborted();
  if (int(send.size()) != p.size)
    throw std::invalid_argument("start_all_to_all: " + std::to_string(send.size()) + " parts for a group of " +
                                std::to_string(p.size));
  auto& reqs = p.sends[tag];
  for (int d = 0; d < p.size; ++d) {
    const auto part = send[size_t(d)];
    if (d == p.rank) {
      auto& self = p.self_parts[tag];
      self.emplace_back(part.begin(), part.end());
      continue;
    }
    if (!p.eps[size_t(d)]) throw std::logic_error("start_all_to_all before connect()");
    ucp_request_param_t param{};
    const void* buf = part.empty() ? static_cast<const void*>(&impl::k_dummy) : part.data();
    void* req = ucp_tag_send_nbx(p.eps[size_t(d)], buf, part.size(), ucx_tag(p.rank, tag), &param);
    if (UCS_PTR_IS_ERR(req))
      throw transport_error(ucs_error("send to EP rank " + std::to_string(d), UCS_PTR_STATUS(req)));
    if (req) reqs.push_back(req);
  }
  ucp_worker_progress(p.worker);
}

void ep_ucx_transport::wait_all_to_all(uint64_t tag, std::vector<byte_buffer>& recv) {
  impl& p = *p_;
  recv.assign(size_t(p.size), {});
  std::vector<int> state(size_t(p.size), 0); // 0 not seen, 1 receiving, 2 done
  std::vector<void*> rreq(size_t(p.size), nullptr);
  {
    auto it = p.self_parts.find(tag);
    if (it == p.self_parts.end() || it->second.empty())
      throw std::logic_error("wait_all_to_all: this rank never started tag " + std::to_string(tag));
    recv[size_t(p.rank)] = std::move(it->second.front());
    p.self_parts.erase(it);
    state[size_t(p.rank)] = 2;
  }
  auto& sreqs = p.sends[tag];
  auto last_progress = std::chrono::steady_clock::now();
  auto cleanup = [&] {
    for (void* r : rreq)
      if (r) {
        ucp_request_cancel(p.worker, r);
        ucp_request_free(r);
      }
  };
  for (;;) {
    bool moved = ucp_worker_progress(p.worker) != 0;
    p.poll_abort_messages();
    if (p.aborted) {
      cleanup();
      p.fail_if_aborted();
    }
    int done = 0;
    for (int s = 0; s < p.size; ++s) {
      if (state[size_t(s)] == 0) {
        ucp_tag_recv_info_t info{};
        ucp_tag_message_h msg = ucp_tag_probe_nb(p.worker, ucx_tag(s, tag), ~uint64_t(0), 1, &info);
        if (msg) {
          recv[size_t(s)].resize(info.length);
          ucp_request_param_t param{};
          void* buf = info.length ? static_cast<void*>(recv[size_t(s)].data()) : const_cast<char*>(&impl::k_dummy);
          void* req = ucp_tag_msg_recv_nbx(p.worker, buf, info.length, msg, &param);
          if (UCS_PTR_IS_ERR(req)) {
            cleanup();
            throw transport_error(ucs_error("receive from EP rank " + std::to_string(s), UCS_PTR_STATUS(req)));
          }
          rreq[size_t(s)] = req;
          state[size_t(s)] = req ? 1 : 2;
          moved = true;
        }
      }
      if (state[size_t(s)] == 1) {
        const ucs_status_t st = ucp_request_check_status(rreq[size_t(s)]);
        if (st != UCS_INPROGRESS) {
          ucp_request_free(rreq[size_t(s)]);
          rreq[size_t(s)] = nullptr;
          if (st != UCS_OK) {
            cleanup();
            throw transport_error(ucs_error("receive from EP rank " + std::to_string(s), st));
          }
          state[size_t(s)] = 2;
          moved = true;
        }
      }
      done += state[size_t(s)] == 2 ? 1 : 0;
    }
    for (size_t i = 0; i < sreqs.size();) {
      const ucs_status_t st = ucp_request_check_status(sreqs[i]);
      if (st == UCS_INPROGRESS) {
        ++i;
        continue;
      }
      ucp_request_free(sreqs[i]);
      sreqs[i] = sreqs.back();
      sreqs.pop_back();
      moved = true;
      if (st != UCS_OK) {
        cleanup();
        throw transport_error(ucs_error("send of tag " + std::to_string(tag), st));
      }
    }
    if (done == p.size && sreqs.empty()) break;
    const auto now = std::chrono::steady_clock::now();
    if (moved) last_progress = now;
    else if (now - last_progress > p.opts.wait_timeout) {
      cleanup();
      p.aborted = true;
      p.abort_reason = "no expert all-to-all progress for " + std::to_string(p.opts.wait_timeout.count()) + " ms";
      p.fail_if_aborted();
    }
  }
  p.sends.erase(tag);
}

void ep_ucx_transport::on_abort(std::function<void(const std::string&)> hook) {
  p_->abort_hook = std::move(hook);
  p_->hook_called = false;
}

void ep_ucx_transport::poll() {
  impl& p = *p_;
  ucp_worker_progress(p.worker);
  p.poll_abort_messages();
  p.fail_if_aborted();
}

void ep_ucx_transport::abort(const std::string& reason) {
  impl& p = *p_;
  if (!p.aborted) {
    p.aborted = true;
    p.abort_reason = reason;
  }
  if (p.abort_hook && !p.hook_called) {
    p.hook_called = true;
    p.abort_hook(p.abort_reason);
  }
  // Best effort: tell every peer, then give the sends a moment to leave.
  std::vector<void*> reqs;
  for (int d = 0; d < p.size; ++d) {
    if (d == p.rank || !p.eps[size_t(d)]) continue;
    ucp_request_param_t param{};
    void* req = ucp_tag_send_nbx(p.eps[size_t(d)], reason.empty() ? &impl::k_dummy : reason.data(), reason.size(),
                                 ucx_tag(p.rank, k_abort_phase), &param);
    if (UCS_PTR_IS_PTR(req)) reqs.push_back(req);
  }
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
  while (!reqs.empty() && std::chrono::steady_clock::now() < until) {
    ucp_worker_progress(p.worker);
    for (size_t i = 0; i < reqs.size();)
      if (ucp_request_check_status(reqs[i]) != UCS_INPROGRESS) {
        ucp_request_free(reqs[i]);
        reqs[i] = reqs.back();
        reqs.pop_back();
      } else {
        ++i;
      }
  }
  for (void* r : reqs) ucp_request_free(r);
}

} // namespace petrel::transport
