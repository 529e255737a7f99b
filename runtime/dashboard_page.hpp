// The operator's dashboard: one self-contained HTML page (inline CSS/JS, hand-drawn SVG, no CDN), served by
// the gateway at GET /dashboard. It polls GET /dashboard/data once a second and reads these keys:
//   "time", "metrics" (registry snapshot_json), "cluster" (actor tree), "groups" (router loads), and, when
//   present, "expert_load": {"before": [[layer][expert]], "after": [[...]], "balancedness_before": x,
//   "balancedness_after": y} (drawn as two heatmaps) and "events": [{"time", "kind", "target", "text"}]
//   (e.g. the chaos history, drawn on the timeline). Rates, percentiles and restarts are derived in the page.
// Panels: <section id="panel-{topology,timeline,throughput,latency,queues,kvpool,kv-transfers,requests,
// expert-load}" data-state="loading|waiting|live|stale|error|unavailable" data-...>; see docs/operations.md.
#pragma once

#include <string>

namespace petrel {

/// The page, HTML + CSS + JS inline.
const std::string& dashboard_html();

} // namespace petrel
