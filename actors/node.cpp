// A node process: the node_supervisor over this node's actors, registered with the head.
#include <unistd.h>

#include <iostream>

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include "actors/cluster.hpp"
#include "actors/cluster_tls.hpp"
#include "actors/node_children.hpp"
#include "actors/process_signals.hpp"
#include "actors/supervisor.hpp"
#include "actors/system.hpp"
#include "runtime/ep_device_plane.hpp"
#include "transport/kv_transfer.hpp"

namespace petrel {

int run_node(const cluster_config& cfg, const node_options& opts) {
  auto* node = cfg.find_node(opts.node);
  if (!node)
    throw config_error(cfg.source + ": no node named '" + opts.node + "'");
  // Ranks of this process that share a GPU through the GPU expert exchange need two CUDA settings made before the
  // first CUDA call (see prepare_process_for_device_plane).
  if (auto* g = cfg.group_of(node->name); g && g->ep_size > 1 && cfg.expert_exchange_for(*g) == "cuda_ipc")
    ep::prepare_process_for_device_plane();
  signal_watcher signals;
  install_stack_dump_signal(); // kill -USR2 <pid>: every thread's stack into the node log
  petrel_config sys_cfg;
  // The head and every other peer must show a certificate of the cluster's CA, and so must we.
  std::unique_ptr<tls_identity> tls;
  if (cfg.security.tls) {
    try {
      tls = tls_identity::make(read_cluster_secret(cluster_secret_path(cfg), cfg.security.secret_file.empty()),
                               cfg.cluster.name, "node " + node->name);
    } catch (const std::exception& e) {
      std::cerr << "petrel node " << node->name << ": " << e.what() << "\n";
      return 1;
    }
    sys_cfg.use_tls(*tls);
    set_tls_endpoint_name("node " + node->name);
  }
  caf::actor_system sys{sys_cfg};

  supervisor_spec spec;
  spec.name = "node_supervisor(" + node->name + ")";
  spec.strategy = cfg.supervision.strategy;
  spec.intensity = cfg.supervision.intensity;
  spec.period = cfg.supervision.period;
  spec.epoch_base = opts.epoch << 32; // children epochs read NODE_EPOCH.INCARNATION
  // The node's KV engine (UCX worker + progress thread) lives as long as the process.
  transport::kv_transfer_options kv_opts;
  kv_opts.transports = cfg.transport.kv_tls;
  kv_opts.net_devices = cfg.transport.kv_net_devices;
  kv_opts.transfer_deadline = cfg.transport.kv_timeout;
  kv_opts.allow_cuda_ipc = cfg.transport.kv_gpu_path != "staged";
  kv_opts.gpu_host_mirror = cfg.transport.kv_gpu_mirror;
  kv_opts.name = "petrel-kv-" + node->name;
  auto engine = transport::kv_transfer_engine::create(kv_opts);
  if (!engine) {
    std::cerr << "petrel node " << node->name << ": cannot start the KV transfer engine (UCX "
              << cfg.transport.kv_tls << "): " << engine.error() << "\n";
    return 1;
  }
  std::shared_ptr<transport::kv_transfer_engine> kv_engine = std::move(*engine);
  spec.children = node_children(cfg, *node, kv_engine);
  auto sup = spawn_supervisor(sys, std::move(spec));

  auto published = publish_cluster_port(sup, node->address.port, node->address.host);
  if (!published) {
    std::cerr << "petrel node " << node->name << ": cannot publish on " << node->address.host << ":"
              << node->address.port << ": " << sys.render(published.error()) << "\n";
    anon_send_exit(sup, caf::exit_reason::kill);
    return 1;
  }
  auto head = connect_cluster_port<head_actor>(sys, opts.head_host, static_cast<uint16_t>(opts.head_port));
  if (!head) {
    std::cerr << "petrel node " << node->name << ": cannot reach the head at " << opts.head_host << ":"
              << opts.head_port << ": " << sys.render(head.error()) << "\n";
    anon_send_exit(sup, caf::exit_reason::kill);
    return 1;
  }
  signals.on_signal([sup](int) { caf::anon_send(sup, stop_atom::value); });
  int rc = 0;
  caf::scoped_actor self{sys};
  bool registered = false;
  self->request(*head, std::chrono::seconds(10), hello_atom::value,
                node_hello{node->name, opts.epoch, static_cast<int32_t>(::getpid()), caf::actor_cast<caf::actor>(sup)})
      .receive([&](caf::ok_atom) { registered = true; },
               [&](caf::error& err) {
                 std::cerr << "petrel node " << node->name << ": the head refused registration: " << describe(err)
                           << "\n";
               });
  if (!registered) {
    anon_send_exit(sup, caf::exit_reason::kill);
    return 1;
  }
  std::cerr << "petrel node " << node->name << " epoch " << opts.epoch << " pid " << ::getpid() << " running\n";
  self->monitor(*head);
  self->monitor(sup);
  bool running = true;
  while (running) {
    self->receive([&](caf::down_msg& dm) {
      if (dm.source == sup.address()) {
        running = false;
        if (dm.reason && dm.reason != caf::exit_reason::user_shutdown) {
          std::cerr << "petrel node " << node->name << ": " << describe(dm.reason) << "\n";
          rc = 3;
        }
      } else if (dm.source == head->address()) {
        // Without its head a node has no purpose: stop the actors and leave.
        std::cerr << "petrel node " << node->name << ": lost the head (" << describe(dm.reason) << "), stopping\n";
        self->send(sup, stop_atom::value);
      }
    });
  }
  return rc;
}

} // namespace petrel
