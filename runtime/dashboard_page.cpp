#include "runtime/dashboard_page.hpp"

namespace petrel {

const std::string& dashboard_html() {
  static const std::string page = R"HTML(<!doctype html>
<html><head><meta charset="utf-8"><title>Petrel</title></head>
<body><h1>Petrel</h1><pre id="data">loading...</pre>
<script>
async function refresh() {
  const r = await fetch('/dashboard/data');
  document.getElementById('data').textContent = JSON.stringify(await r.json(), null, 2);
}
setInterval(refresh, 1000); refresh();
</script></body></html>
)HTML";
  return page;
}

} // namespace petrel
