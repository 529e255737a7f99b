// The operator's dashboard: one self-contained HTML page (no CDN), served by the gateway at
// GET /dashboard. It polls GET /dashboard/data (cluster tree, group loads, metrics snapshot).
#pragma once

#include <string>

namespace petrel {

/// The page, HTML + CSS + JS inline.
const std::string& dashboard_html();

} // namespace petrel
