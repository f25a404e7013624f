// Drives Debian's headless Chromium (through playwright-core) for tests/browser/main.rs.
//
// It serves a page from two origins of its own on 127.0.0.1 (one the bridge lists in
// `cors_origins`, one it does not), then takes commands, one JSON object per line on stdin,
// and answers one JSON object per line on stdout:
//   {"cmd":"open","page":"listed"|"unlisted","url":URL}  -> {"opened":ID}
//       a new tab on that origin runs `new EventSource(URL)` and records what it sees
//   {"cmd":"state","id":ID}   -> {"id":ID,"events":N,"opens":N,"errors":N,"readyState":N}
//   {"cmd":"events","id":ID}  -> {"id":ID,"events":[[lastEventId,type,data],...]}
//   {"cmd":"quit"}            -> exits
// First it prints {"listed":ORIGIN,"unlisted":ORIGIN}.

import http from "node:http";
import readline from "node:readline";
import { chromium } from "playwright-core";

const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>sse-bridge browser test</title>
<script>
  // What the page saw: every event of every type the test stream uses, and the
  // EventSource's opens, errors and readyState after each error.
  window.seen = { events: [], opens: 0, errors: 0 };
  window.start = (url) => {
    const source = new EventSource(url);
    window.source = source;
    source.onopen = () => { window.seen.opens += 1; };
    source.onerror = () => { window.seen.errors += 1; };
    const record = (e) => window.seen.events.push([e.lastEventId, e.type, e.data]);
    for (const type of ["message", "edit", "log", "new"]) {
      source.addEventListener(type, record);
    }
  };
</script>
<p>sse-bridge browser test</p>
`;

function pageServer() {
  const server = http.createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
    res.end(PAGE);
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => resolve(server));
  });
}

const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const listed = await pageServer();
const unlisted = await pageServer();
const origins = {
  listed: `http://127.0.0.1:${listed.address().port}`,
  unlisted: `http://127.0.0.1:${unlisted.address().port}`,
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // The machine's network is closed: no background fetches, no QUIC, no sandbox as root.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const context = await browser.newContext();
const pages = [];
const consoleLines = [];

say(origins);

const input = readline.createInterface({ input: process.stdin });
for await (const line of input) {
  if (!line.trim()) continue;
  let msg;
  try {
    msg = JSON.parse(line);
  } catch (e) {
    say({ error: `not JSON: ${line}` });
    continue;
  }
  try {
    if (msg.cmd === "open") {
      const page = await context.newPage();
      page.on("console", (m) => consoleLines.push(m.text()));
      await page.goto(origins[msg.page] + "/");
      await page.evaluate((url) => window.start(url), msg.url);
      pages.push(page);
      say({ opened: pages.length - 1 });
    } else if (msg.cmd === "state") {
      const s = await pages[msg.id].evaluate(() => ({
        events: window.seen.events.length,
        opens: window.seen.opens,
        errors: window.seen.errors,
        readyState: window.source.readyState,
      }));
      say({ id: msg.id, ...s });
    } else if (msg.cmd === "events") {
      const events = await pages[msg.id].evaluate(() => window.seen.events);
      say({ id: msg.id, events, console: consoleLines });
    } else if (msg.cmd === "quit") {
      break;
    } else {
      say({ error: `unknown command ${msg.cmd}` });
    }
  } catch (e) {
    say({ error: String(e) });
  }
}
await browser.close();
listed.close();
unlisted.close();
process.exit(0);
