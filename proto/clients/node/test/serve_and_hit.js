'use strict';
// Driver for tests/integration/clients_test.cc: a bare http.createServer app wrapped with
// withUsageTracking, hit by concurrent clients, then close()d. Prints one JSON line (what the
// app's clients saw, how long close() took, the emitter's counters) and exits by itself: an
// emitter that left a timer or socket behind would keep it running.
//
//   node serve_and_hit.js --url http://127.0.0.1:PORT --keys ORG=TOKEN,ORG=TOKEN
//       [--requests 2000] [--concurrency 16] [--max-queue 10000] [--close-timeout-ms 10000]
//       [--hang-meterd]   (ignore --url: point at a local server that accepts and never answers)
//       [--baseline]      (first the same requests against the app without the middleware)
//
// Request i goes to org i % orgs (industry hs, rest, auto, ...by org position); every tenth
// (i % 10 == 0) is GET /export, metered as data_exports with quantity 2; the others are
// api_calls with quantity 1.

const http = require('node:http');
const net = require('node:net');
const path = require('node:path');
const {withUsageTracking} = require(path.join(__dirname, '..', 'with_usage_tracking.js'));

const INDUSTRIES = ['hs', 'rest', 'auto', 'ret', 'edu', 'payroll'];

function parseArgs(argv) {
  const args = {requests: 2000, concurrency: 16, maxQueue: 10000, closeTimeoutMs: 10000,
                hangMeterd: false, baseline: false, url: '', keys: ''};
  for (let i = 0; i < argv.length; ++i) {
    const name = argv[i];
    const next = () => argv[++i];
    if (name === '--url') args.url = next();
    else if (name === '--keys') args.keys = next();
    else if (name === '--requests') args.requests = Number(next());
    else if (name === '--concurrency') args.concurrency = Number(next());
    else if (name === '--max-queue') args.maxQueue = Number(next());
    else if (name === '--close-timeout-ms') args.closeTimeoutMs = Number(next());
    else if (name === '--hang-meterd') args.hangMeterd = true;
    else if (name === '--baseline') args.baseline = true;
    else throw new Error(`unknown argument ${name}`);
  }
  return args;
}

function listen(server) {
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server.address().port)));
}

// GET with the org's headers; resolves {status, ms} (status 0 on an error).
function hit(agent, port, pathName, org, industry) {
  const start = process.hrtime.bigint();
  return new Promise((resolve) => {
    const request = http.get({host: '127.0.0.1', port, path: pathName, agent,
                              headers: {'x-org-id': org, 'x-industry': industry}}, (response) => {
      response.resume();
      response.on('end', () => resolve({status: response.statusCode,
                                        ms: Number(process.hrtime.bigint() - start) / 1e6}));
    });
    request.setTimeout(10000, () => request.destroy(new Error('timeout')));
    request.on('error', () => resolve({status: 0, ms: Number(process.hrtime.bigint() - start) / 1e6}));
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  // Bounded: the test's own timeout is the backstop, this one says why.
  setTimeout(() => {
    console.error('serve_and_hit: still running after 50 s');
    process.exit(2);
  }, 50000).unref();

  const keys = {};
  const orgs = [];
  for (const pair of args.keys.split(',').filter(Boolean)) {
    const [org, token] = pair.split('=');
    keys[org] = token;
    orgs.push(org);
  }
  if (orgs.length === 0) throw new Error('--keys ORG=TOKEN[,ORG=TOKEN...] is required');

  let url = args.url;
  const hanging = new Set();
  let hangServer = null;
  if (args.hangMeterd) {
    // Accepts connections, reads nothing, answers nothing.
    hangServer = net.createServer((socket) => {
      hanging.add(socket);
      socket.on('close', () => hanging.delete(socket));
      socket.on('error', () => {});
    });
    url = `http://127.0.0.1:${await listen(hangServer)}`;
  }

  const tracking = withUsageTracking({
    url,
    apiKey: keys,
    source: 'clients-test/node',
    maxQueue: args.maxQueue,
    meter: (req) => (req.url.startsWith('/export') ? 'data_exports' : 'api_calls'),
    quantity: (req) => (req.url.startsWith('/export') ? 2 : 1),
  });
  const app = http.createServer((req, res) => {
    tracking(req, res, () => {
      res.writeHead(200, {'Content-Type': 'text/plain'});
      res.end('ok\n');
    });
  });
  const port = await listen(app);

  // The same requests against `targetPort`; their latencies (ms, sorted) and how many got 200.
  async function drive(targetPort) {
    const agent = new http.Agent({keepAlive: true, maxSockets: args.concurrency});
    const latencies = [];
    let ok = 0;
    let next = 0;
    async function worker() {
      for (;;) {
        const i = next++;
        if (i >= args.requests) return;
        const orgIndex = i % orgs.length;
        const result = await hit(agent, targetPort, i % 10 === 0 ? '/export' : '/api/thing',
                                 orgs[orgIndex], INDUSTRIES[orgIndex % INDUSTRIES.length]);
        latencies.push(result.ms);
        if (result.status === 200) ok++;
      }
    }
    await Promise.all(Array.from({length: args.concurrency}, worker));
    agent.destroy();
    latencies.sort((a, b) => a - b);
    return {latencies, ok};
  }
  const at = (latencies, q) =>
    Math.round(latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))] * 100) / 100;

  let baseline = null;
  if (args.baseline) {
    const plain = http.createServer((req, res) => {
      res.writeHead(200, {'Content-Type': 'text/plain'});
      res.end('ok\n');
    });
    const plainRun = await drive(await listen(plain));
    plain.closeAllConnections();
    plain.close();
    baseline = {ok: plainRun.ok, p50Ms: at(plainRun.latencies, 0.5),
                p99Ms: at(plainRun.latencies, 0.99), maxMs: at(plainRun.latencies, 1)};
  }
  const started = Date.now();
  const {latencies, ok} = await drive(port);
  const requestsMs = Date.now() - started;

  const closeStart = Date.now();
  const stats = await tracking.close({timeoutMs: args.closeTimeoutMs});
  const closeMs = Date.now() - closeStart;

  app.closeAllConnections();
  app.close();
  if (hangServer) {
    for (const socket of hanging) socket.destroy();
    hangServer.close();
  }
  console.log(JSON.stringify({
    requests: args.requests,
    ok,
    requestsMs,
    p50Ms: at(latencies, 0.5),
    p99Ms: at(latencies, 0.99),
    maxMs: at(latencies, 1),
    baseline,
    closeMs,
    stats,
  }));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
