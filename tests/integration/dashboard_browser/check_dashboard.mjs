// Drives Debian's headless Chromium (through playwright-core) against a running Petrel cluster's
// /dashboard: asserts that every panel shows live data, kills a node process with SIGKILL, asserts that
// the page shows the restart, then checks the expert-load heatmap with an injected "expert_load" key.
//
//   node check_dashboard.mjs --url http://127.0.0.1:PORT --config cluster.yaml --petrel /path/to/petrel \
//        --screenshot out/dashboard.png [--kill-node p0] [--page-override page.html]
//
// Exits 0 on success, 1 with a message naming the failed check.
import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
for (const need of ['url', 'config', 'petrel', 'screenshot'])
  if (!args[need]) { console.error(`check_dashboard: missing --${need}`); process.exit(2); }
const killNode = args['kill-node'] || 'p0';
const chromiumPath = args.chromium || '/usr/bin/chromium';

const log = (...a) => console.log('[dashboard]', ...a);
class CheckFailed extends Error {}
function fail(msg) { throw new CheckFailed(msg); }
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(what, timeoutS, fn) {
  const deadline = Date.now() + timeoutS * 1000;
  let last;
  while (Date.now() < deadline) {
    try { last = await fn(); if (last && last.ok) return last; } catch (e) { last = {why: e.message}; }
    await sleep(250);
  }
  fail(`${what}: not seen within ${timeoutS} s (last: ${JSON.stringify(last && (last.why ?? last))})`);
}

function clusterStatus() {
  const out = execFileSync(args.petrel, ['status', '--json', args.config], {encoding: 'utf8', timeout: 20000});
  return JSON.parse(out);
}

// Background load: a couple of concurrent completions in a loop, so rates and percentiles move.
let loadOn = true, sent = 0, okCount = 0, failedCount = 0;
async function loadWorker(id) {
  while (loadOn) {
    try {
      const r = await fetch(args.url + '/v1/completions', {method: 'POST', headers: {'content-type': 'application/json'},
        body: JSON.stringify({model: 'fortune-moe', prompt: `Worker ${id} asks question number ${sent}:`, max_tokens: 24}),
        signal: AbortSignal.timeout(30000)});
      sent++;
      await r.text();
      if (r.ok) okCount++; else { failedCount++; await sleep(300); }
    } catch { failedCount++; await sleep(300); }
  }
}

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'petrel-dash-chromium-'));
let context;
let exitCode = 0;
const workers = [];
try {
  if (!fs.existsSync(chromiumPath)) fail(`no Chromium at ${chromiumPath}: run tools/setup.sh (installs Debian's chromium)`);
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: chromiumPath,
    headless: true,
    viewport: {width: 1400, height: 1500},
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
           '--disable-sync', '--disable-quic', '--no-first-run'],
  });
  const page = context.pages()[0] || await context.newPage();
  const consoleErrors = [];
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
  page.on('pageerror', (e) => consoleErrors.push(String(e)));
  // The page must be self-contained: refuse (and record) any request that leaves the gateway.
  const foreign = [];
  await page.route('**/*', (route) => {
    const u = route.request().url();
    if (!u.startsWith(args.url)) { foreign.push(u); return route.abort(); }
    if (args['page-override'] && new URL(u).pathname === '/dashboard')
      return route.fulfill({status: 200, contentType: 'text/html', body: fs.readFileSync(args['page-override'], 'utf8')});
    return route.continue();
  });

  for (let i = 0; i < 2; i++) workers.push(loadWorker(i));
  await page.goto(args.url + '/dashboard', {waitUntil: 'load'});
  log('page loaded:', await page.title());

  // no auto-wait: a missing panel reads as 'missing' at once, so the failure message names it
  const attr = async (id, a) => { const el = await page.$('#' + id); return el ? el.getAttribute('data-' + a) : 'missing'; };
  const state = (id) => attr(id, 'state');
  const panels = ['panel-topology', 'panel-timeline', 'panel-throughput', 'panel-latency', 'panel-queues',
                  'panel-kvpool', 'panel-kv-transfers', 'panel-requests'];

  // 1. every panel live, with real numbers behind it
  await waitFor('every panel live', 60, async () => {
    const st = {};
    for (const p of panels) st[p] = await state(p);
    const notLive = panels.filter((p) => st[p] !== 'live');
    return notLive.length ? {why: 'not live: ' + notLive.map((p) => `${p}=${st[p]}`).join(', ')} : {ok: true};
  });
  await waitFor('output tokens flowing', 60, async () => {
    const v = +(await attr('panel-throughput', 'peak-output-tps'));
    return v > 0 ? {ok: true} : {why: `peak-output-tps=${v}`};
  });
  // The page must keep polling. On a loaded machine one /dashboard/data answer can take seconds (it
  // gathers the live actor tree from every node), so allow a generous window for the next poll.
  const polls0 = +(await page.getAttribute('body', 'data-polls'));
  await waitFor('the page keeps polling', 30, async () => {
    const polls1 = +(await page.getAttribute('body', 'data-polls'));
    return polls1 >= polls0 + 1 ? {ok: true} : {why: `data-polls ${polls0} -> ${polls1}`};
  });
  // (retried: on a loaded host a node may be restarting just when we look)
  const liveChecks = async () => ({
    'topology nodes': +(await attr('panel-topology', 'nodes')) >= 2,
    'all nodes running': (await page.$$eval('#panel-topology .node', (ns) => ns.every((n) => n.dataset.state === 'running'))),
    'actors shown': (await page.$$('#panel-topology .actor')).length >= 2,
    'TTFT samples': +(await attr('panel-latency', 'ttft-count')) > 0,
    'ITL samples': +(await attr('panel-latency', 'itl-count')) > 0,
    'TTFT p50 > 0': +(await attr('panel-latency', 'ttft-p50')) > 0,
    'queue groups': ((await attr('panel-queues', 'groups')) || '').split(',').filter(Boolean).length >= 1,
    'KV pool pages': +(await attr('panel-kvpool', 'total-pages')) > 0,
    'KV transfers': +(await attr('panel-kv-transfers', 'transfers')) > 0,
    'KV bytes': +(await attr('panel-kv-transfers', 'bytes')) > 0,
    'KV transfer phase mean': +(await attr('panel-kv-transfers', 'transfer-mean')) > 0,
    'ok requests': +(await attr('panel-requests', 'ok')) > 0,
    'chart lines drawn': (await page.$$('#throughput-chart path')).length >= 1 && (await page.$$('#ttft-chart path')).length >= 1,
    'expert-load placeholder': (await state('panel-expert-load')) === 'unavailable' &&
      (await page.textContent('#expert-load-body')).includes('no expert-load data (expert parallelism not wired yet)'),
  });
  let checks;
  await waitFor('live data checks', 30, async () => {
    checks = await liveChecks();
    const bad = Object.entries(checks).filter(([, v]) => !v).map(([k]) => k);
    return bad.length ? {why: 'failed: ' + bad.join(', ')} : {ok: true};
  });
  log('all panels live:', JSON.stringify(checks));

  // 2. kill a node process and watch the page show the restart
  const status = clusterStatus();
  const node = (status.nodes || []).find((n) => n.name === killNode);
  if (!node || !node.pid) fail(`petrel status --json has no node ${killNode} with a pid: ${JSON.stringify(status).slice(0, 300)}`);
  const sel = `#panel-topology .node[data-node="${killNode}"]`;
  const before = {epoch: +(await page.getAttribute(sel, 'data-epoch')), restarts: +(await page.getAttribute(sel, 'data-restarts')),
                  pid: +(await page.getAttribute(sel, 'data-pid'))};
  if (before.pid !== node.pid) fail(`page shows pid ${before.pid} for ${killNode}, petrel status says ${node.pid}`);
  log(`killing node ${killNode} (pid ${node.pid}, epoch ${before.epoch}, restarts ${before.restarts})`);
  const okBefore = +(await attr('panel-requests', 'ok'));
  process.kill(node.pid, 'SIGKILL');
  const after = await waitFor(`restart of ${killNode} on the page`, 90, async () => {
    const a = {epoch: +(await page.getAttribute(sel, 'data-epoch')), restarts: +(await page.getAttribute(sel, 'data-restarts')),
               pid: +(await page.getAttribute(sel, 'data-pid')), state: await page.getAttribute(sel, 'data-state')};
    const changed = a.epoch > before.epoch && a.restarts > before.restarts && a.pid !== before.pid && a.state === 'running';
    return changed ? {ok: true, ...a} : {why: JSON.stringify(a)};
  });
  log(`page shows ${killNode} restarted: epoch ${before.epoch} -> ${after.epoch}, restarts ${before.restarts} -> ${after.restarts}, pid ${after.pid}`);
  await waitFor('page and petrel status agree after the restart', 15, async () => {
    const n = (clusterStatus().nodes || []).find((x) => x.name === killNode) || {};
    const pg = {epoch: +(await page.getAttribute(sel, 'data-epoch')), restarts: +(await page.getAttribute(sel, 'data-restarts')),
                pid: +(await page.getAttribute(sel, 'data-pid'))};
    return n.epoch === pg.epoch && n.restarts === pg.restarts && n.pid === pg.pid ? {ok: true}
      : {why: `status ${JSON.stringify({epoch: n.epoch, restarts: n.restarts, pid: n.pid})} page ${JSON.stringify(pg)}`};
  });
  const entry = await waitFor('timeline restart entry', 10, async () => {
    const n = await page.$$eval(`#timeline-list li.tl-entry[data-kind="restart"][data-target="${killNode}"]`, (ls) => ls.map((l) => l.textContent));
    return n.length ? {ok: true, text: n[0]} : {why: 'no restart entry for ' + killNode};
  });
  log('timeline:', entry.text);
  if (+(await attr('panel-timeline', 'restart-events')) < 1) fail('timeline panel counts no restart events');
  if ((await page.$$('#timeline-svg circle')).length < 2) fail('timeline SVG has no event markers');
  // the cluster serves again after the restart, and the page keeps updating
  await waitFor('completions served after the restart', 60, async () => {
    const okNow = +(await attr('panel-requests', 'ok'));
    return okNow > okBefore ? {ok: true} : {why: 'ok=' + okNow};
  });
  await sleep(3000);
  fs.mkdirSync(path.dirname(args.screenshot), {recursive: true});
  await page.screenshot({path: args.screenshot, fullPage: true});
  log('screenshot:', args.screenshot);

  // 3. the expert-load heatmap, from a data document that carries "expert_load"
  await page.unroute('**/*');
  const injectedAt = Date.now() / 1000;
  await page.route('**/dashboard/data', async (route) => {
    let r;
    try { r = await route.fetch(); } catch { return route.abort().catch(() => {}); }
    let doc;
    try { doc = await r.json(); } catch { return route.abort().catch(() => {}); }
    const layers = 6, experts = 16;
    const before = [...Array(layers)].map((_, l) => [...Array(experts)].map((_, e) => (e === l % experts ? 90 : 5 + ((e * 7 + l * 3) % 11))));
    const after = [...Array(layers)].map(() => [...Array(experts)].map((_, e) => 10 + (e % 3)));
    doc.expert_load = {before, after, balancedness_before: 0.31, balancedness_after: 0.92};
    doc.events = [{time: injectedAt, kind: 'kill_node', target: 'd9', text: 'chaos: kill_node d9 (injected by the test)'}];
    return route.fulfill({response: r, json: doc}).catch(() => {});
  });
  await waitFor('expert-load heatmap', 15, async () => {
    const st = await state('panel-expert-load');
    const cells = (await page.$$('#panel-expert-load rect.cell')).length;
    return st === 'live' && cells === 2 * 6 * 16 ? {ok: true} : {why: `state=${st} cells=${cells}`};
  });
  if ((await attr('panel-expert-load', 'balancedness-after')) !== '0.92') fail('expert-load panel does not report balancedness_after');
  await waitFor('recorded chaos event on the timeline', 10, async () => {
    const n = (await page.$$('#timeline-list li.tl-entry[data-kind="chaos"][data-target="d9"]')).length;
    return n === 1 ? {ok: true} : {why: `${n} chaos entries for d9 (want exactly 1, once)`};
  });
  await page.locator('#panel-expert-load').screenshot({path: args.screenshot.replace(/\.png$/, '') + '-expert-load.png'});
  log('expert-load heatmap rendered (2 x 6 x 16 cells)');

  if (foreign.length) fail('the page requested resources outside the gateway: ' + foreign.join(', '));
  const realErrors = consoleErrors.filter((e) => !/Failed to load resource/.test(e));
  if (realErrors.length) fail('JavaScript errors on the page: ' + realErrors.join(' | '));
  log(`load generator: ${sent} sent, ${okCount} ok, ${failedCount} failed`);
  log('PASS');
} catch (e) {
  exitCode = 1;
  console.error('[dashboard] FAIL:', e instanceof CheckFailed ? e.message : (e.stack || e));
  try {
    const p = context && context.pages()[0];
    if (p) {
      const shot = args.screenshot.replace(/\.png$/, '') + '-failure.png';
      await p.screenshot({path: shot, fullPage: true});
      console.error('[dashboard] failure screenshot:', shot);
    }
  } catch {}
} finally {
  loadOn = false;
  await Promise.race([Promise.allSettled(workers), sleep(5000)]);
  if (context) await context.close().catch(() => {});
  fs.rmSync(userDataDir, {recursive: true, force: true});
}
process.exit(exitCode);
