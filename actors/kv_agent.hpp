// The kv_agent actor: the node's KV mover (see interfaces.hpp, kv_agent_actor).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include <caf/actor.hpp>
#include <caf/local_actor.hpp>

#include "actors/supervisor.hpp"

namespace petrel {

namespace transport {
class kv_transfer_engine;
}

/// Spawns the kv_agent of a node over the node's engine (which outlives agent restarts, so pools
/// registered by ranks stay valid).
caf::actor spawn_kv_agent(caf::local_actor* parent, std::shared_ptr<transport::kv_transfer_engine> engine,
                          const child_context& ctx);

/// CRC32C (Castagnoli, the iSCSI/ext4 polynomial) of `bytes` bytes, continuing from `crc` (0 to
/// start). SSE4.2's crc32 instruction where the CPU has it, a table otherwise; both give the same
/// value. Every shipped KV page carries one (docs/reliability.md, "Corrupted KV").
uint32_t kv_page_crc32c(const void* data, size_t bytes, uint32_t crc = 0);

} // namespace petrel
