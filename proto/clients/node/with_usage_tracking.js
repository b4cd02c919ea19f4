'use strict';
// Usage events for meterd from a Node.js HTTP app: `withUsageTracking(options)` is a
// `(req, res, next)` middleware (Express, Connect, or a bare `http.createServer` wrapper) that
// emits one CloudEvent per finished request; `UsageEmitter` batches events in a bounded queue
// and posts them to meterd's `POST /v1/events`; `MeterdHttpClient` does one batch, with retries.
// CommonJS, Node.js >= 18, no npm dependencies. See ../README.md.

const crypto = require('node:crypto');
const events = require('node:events');
const http = require('node:http');
const https = require('node:https');
const os = require('node:os');

const UUID = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
const INDUSTRIES = new Set(['hs', 'rest', 'auto', 'ret', 'edu', 'payroll']);
const METER = /^[a-z][a-z0-9_]{0,62}$/;

// Statuses worth retrying. A retry re-sends the same events (same source and id), which meterd
// counts once: 503 (Kafka did not acknowledge, or meterd is starting or stopping), 429 (the
// key's rate limit), 408/502/504 (something in between), and network errors (status 0).
function isRetryable(status) {
  return status === 0 || status === 408 || status === 429 || status === 502 ||
      status === 503 || status === 504;
}

// Retry-After in milliseconds (delta-seconds or an HTTP date); undefined if absent or unusable.
function parseRetryAfter(value) {
  if (value === undefined || value === null || value === '') return undefined;
  const text = String(value).trim();
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const at = Date.parse(text);
  return Number.isNaN(at) ? undefined : Math.max(0, at - Date.now());
}

// Resolves after `ms`, or at once when `signal` (an AbortSignal) aborts. Removes its listener,
// so a long-lived signal collects none.
function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal && signal.aborted) return resolve();
    const onAbort = () => {
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(() => {
      if (signal) signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    timer.unref();
    if (signal) signal.addEventListener('abort', onAbort, {once: true});
  });
}

// Posts batches of events to meterd. One instance per meterd URL; share it.
class MeterdHttpClient {
  // url: meterd's base URL ("http://meterd:8080") or the full /v1/events URL.
  // timeoutMs: per attempt; meterd itself answers 503 within ~10 s when Kafka is slow.
  // maxAttempts: attempts per batch before it is given up (counted as failed by the emitter).
  constructor({url, timeoutMs = 15000, maxAttempts = 8, minBackoffMs = 100,
               maxBackoffMs = 5000, maxSockets = 4} = {}) {
    if (!url) throw new Error('MeterdHttpClient: url is required');
    const parsed = new URL(url);
    if (parsed.pathname === '/' || parsed.pathname === '') parsed.pathname = '/v1/events';
    this.url = parsed;
    this.transport = parsed.protocol === 'https:' ? https : http;
    this.agent = new this.transport.Agent({keepAlive: true, maxSockets});
    this.timeoutMs = timeoutMs;
    this.maxAttempts = maxAttempts;
    this.minBackoffMs = minBackoffMs;
    this.maxBackoffMs = maxBackoffMs;
  }

  // One POST of `events` (objects). Never rejects: resolves {status, retryAfterMs, body,
  // error}; status 0 for a network error, a timeout or `signal` aborting it.
  postOnce(events, apiKey, signal) {
    const payload = Buffer.from(JSON.stringify(events));
    return new Promise((resolve) => {
      let settled = false;
      const done = (result) => {
        if (!settled) {
          settled = true;
          resolve(result);
        }
      };
      let request;
      try {
        request = this.transport.request(this.url, {
          method: 'POST',
          agent: this.agent,
          signal,
          headers: {
            'Content-Type': 'application/cloudevents-batch+json',
            'Content-Length': payload.length,
            'Authorization': `Bearer ${apiKey}`,
          },
        }, (response) => {
          const chunks = [];
          let size = 0;
          response.on('data', (chunk) => {
            // meterd's answers are small; do not buffer an unexpected huge one.
            if (size < 1 << 20) chunks.push(chunk);
            size += chunk.length;
          });
          response.on('end', () => done({
            status: response.statusCode,
            retryAfterMs: parseRetryAfter(response.headers['retry-after']),
            body: Buffer.concat(chunks).toString('utf8'),
          }));
          response.on('error', (error) => done({status: 0, error}));
        });
      } catch (error) {
        done({status: 0, error});
        return;
      }
      request.setTimeout(this.timeoutMs, () => {
        request.destroy(new Error(`no answer from meterd within ${this.timeoutMs} ms`));
      });
      request.on('error', (error) => done({status: 0, error}));
      request.end(payload);
    });
  }

  // Sends `events` with retries (the same events each time). Never rejects; resolves
  // {ok, status, accepted, rejected: [{index, id, reason, detail}], attempts, error}. `ok` is
  // false when the batch was given up: a non-retryable status (401, 403, 413, ...), attempts
  // exhausted, or `signal` (an AbortSignal) aborted.
  async send(events, apiKey, {signal} = {}) {
    let last = {status: 0};
    let attempt = 0;
    while (attempt < this.maxAttempts && !(signal && signal.aborted)) {
      ++attempt;
      last = await this.postOnce(events, apiKey, signal);
      if (last.status === 202) {
        const answer = safeJson(last.body);
        const accepted = answer && Array.isArray(answer.accepted) ?
            answer.accepted.length : events.length;
        const rejected = answer && Array.isArray(answer.rejected) ? answer.rejected : [];
        return {ok: true, status: 202, accepted, rejected, attempts: attempt};
      }
      if (last.status === 400) {
        // Every event was refused (unknown meter, bad subject, ...): re-sending cannot help.
        // A 400 without per-event results (not_a_batch, ...) refused them all too.
        const answer = safeJson(last.body);
        const rejected = answer && Array.isArray(answer.rejected) && answer.rejected.length > 0 ?
            answer.rejected : events.map((e, index) => ({index, id: e.id, reason: 'bad_request'}));
        return {ok: true, status: 400, accepted: 0, rejected, attempts: attempt};
      }
      if (!isRetryable(last.status) || attempt === this.maxAttempts) break;
      // Exponential backoff with jitter, never shorter than what meterd asked for.
      const backoff = Math.min(this.maxBackoffMs, this.minBackoffMs * 2 ** (attempt - 1));
      const jittered = backoff / 2 + Math.random() * backoff / 2;
      await sleep(Math.max(jittered, last.retryAfterMs || 0), signal);
    }
    return {
      ok: false,
      status: last.status,
      accepted: 0,
      rejected: [],
      attempts: attempt,
      error: signal && signal.aborted ? 'stopped by close() before meterd acknowledged' :
             last.error ? String(last.error.message || last.error) :
                          `meterd answered ${last.status}: ${String(last.body || '').slice(0, 200)}`,
    };
  }

  destroy() { this.agent.destroy(); }
}

function safeJson(text) {
  try {
    return JSON.parse(text);
  } catch (_) {
    return undefined;
  }
}

// A bounded in-memory queue of events, sent in batches by a MeterdHttpClient. `emit` never
// blocks and never throws; when the queue is full the oldest event is dropped and counted.
// Memory is bounded by maxQueue + concurrency * batchSize events.
class UsageEmitter {
  // apiKey: a token, an {orgId: token} object, or a function orgId -> token (an org-scoped
  //   key may only send its own org's events; an admin key may send any org's).
  // source: the CloudEvents `source`, stable for this app (ids are unique within it).
  constructor({url, apiKey, source, batchSize = 100, flushIntervalMs = 200, maxQueue = 10000,
               concurrency = 2, client, onError, ...clientOptions} = {}) {
    if (!apiKey) throw new Error('UsageEmitter: apiKey is required');
    this.keyFor = typeof apiKey === 'function' ? apiKey :
                  typeof apiKey === 'object' ? (org) => apiKey[org] || apiKey[org.toLowerCase()] :
                                               () => apiKey;
    this.client = client || new MeterdHttpClient({url, ...clientOptions});
    this.source = source || `node/${os.hostname()}`;
    this.batchSize = Math.max(1, Math.min(batchSize, 1000));  // meterd takes <= 1000 a request.
    this.flushIntervalMs = flushIntervalMs;
    this.maxQueue = Math.max(1, maxQueue);
    this.concurrency = Math.max(1, concurrency);
    this.onError = onError || rateLimitedWarning();
    // A ring buffer: O(1) push and drop-oldest.
    this.ring = new Array(this.maxQueue);
    this.head = 0;
    this.length = 0;
    this.inFlight = 0;
    this.timer = null;
    this.closed = false;
    this.waiters = [];  // Resolved when the queue is empty and nothing is in flight.
    this.stop = new AbortController();  // Aborted by close() at its deadline.
    // Every request in flight and every retry wait listens to it (one per key per batch).
    events.setMaxListeners(0, this.stop.signal);
    this.counters = {
      emitted: 0,    // Taken by emit().
      accepted: 0,   // Acknowledged by meterd (Kafka has them).
      rejected: 0,   // Refused by meterd (invalid event, wrong org for the key): never retried.
      dropped: 0,    // Oldest dropped because the queue was full.
      failed: 0,     // Given up: retries exhausted, non-retryable answer, or close() timed out.
      skipped: 0,    // Not emitted: no org, an org that is not a UUID, no key for the org.
      retries: 0,    // Extra attempts made.
    };
  }

  // Queues one usage event. Returns true if queued. Never throws.
  emit({org, meter = 'api_calls', quantity = 1, industry, time, id}) {
    try {
      if (this.closed || typeof org !== 'string' || !UUID.test(org) ||
          typeof meter !== 'string' || !METER.test(meter) || !INDUSTRIES.has(industry) ||
          !Number.isSafeInteger(quantity) || quantity < 0) {
        this.counters.skipped++;
        return false;
      }
      const apiKey = this.keyFor(org);
      if (!apiKey) {
        this.counters.skipped++;
        return false;
      }
      const event = {
        specversion: '1.0',
        id: id || crypto.randomUUID(),
        source: this.source,
        type: meter,
        subject: org,
        time: (time instanceof Date ? time : new Date()).toISOString(),
        datacontenttype: 'application/json',
        data: {quantity, industry},
      };
      if (this.length === this.maxQueue) {
        this.head = (this.head + 1) % this.maxQueue;
        this.length--;
        this.counters.dropped++;
      }
      this.ring[(this.head + this.length) % this.maxQueue] = {apiKey, event};
      this.length++;
      this.counters.emitted++;
      if (this.length >= this.batchSize) {
        this.pump(false);
      } else if (this.timer === null) {
        this.timer = setTimeout(() => {
          this.timer = null;
          this.pump(true);
        }, this.flushIntervalMs);
        this.timer.unref();  // A pending batch does not keep the process alive: call close().
      }
      return true;
    } catch (error) {
      this.counters.skipped++;
      return false;
    }
  }

  // Starts sending batches while there is room in flight; `partial` also sends a batch
  // smaller than batchSize (the timer fired, or a flush is waiting).
  pump(partial) {
    while (this.inFlight < this.concurrency && this.length > 0 &&
           (partial || this.length >= this.batchSize || this.waiters.length > 0)) {
      const taken = [];
      const count = Math.min(this.batchSize, this.length);
      for (let i = 0; i < count; ++i) {
        taken.push(this.ring[this.head]);
        this.ring[this.head] = undefined;
        this.head = (this.head + 1) % this.maxQueue;
      }
      this.length -= count;
      // One request per API key (an org-scoped key sends only its org's events).
      const byKey = new Map();
      for (const {apiKey, event} of taken) {
        if (!byKey.has(apiKey)) byKey.set(apiKey, []);
        byKey.get(apiKey).push(event);
      }
      this.inFlight++;
      const sends = [...byKey].map(([apiKey, events]) => this.sendBatch(apiKey, events));
      Promise.all(sends).then(() => {
        this.inFlight--;
        this.pump(this.length > 0 && (this.waiters.length > 0 || this.timer === null));
        this.settleWaiters();
      });
    }
    if (this.length > 0 && this.timer === null && this.inFlight < this.concurrency) {
      this.timer = setTimeout(() => {
        this.timer = null;
        this.pump(true);
      }, this.flushIntervalMs);
      this.timer.unref();
    }
    this.settleWaiters();
  }

  async sendBatch(apiKey, events) {
    let result;
    try {
      result = await this.client.send(events, apiKey, {signal: this.stop.signal});
    } catch (error) {
      result = {ok: false, status: 0, accepted: 0, rejected: [], attempts: 1, error: String(error)};
    }
    this.counters.retries += Math.max(0, (result.attempts || 1) - 1);
    if (result.ok) {
      this.counters.accepted += result.accepted;
      this.counters.rejected += result.rejected.length;
      if (result.rejected.length > 0) {
        this.safeOnError(new Error(`meterd refused ${result.rejected.length} event(s): ` +
                                   JSON.stringify(result.rejected.slice(0, 3))));
      }
    } else {
      this.counters.failed += events.length;
      this.safeOnError(new Error(`gave up on ${events.length} event(s): ${result.error}`));
    }
  }

  safeOnError(error) {
    try {
      this.onError(error);
    } catch (_) {
      // The app's callback must not break the emitter.
    }
  }

  settleWaiters() {
    if (this.length === 0 && this.inFlight === 0 && this.waiters.length > 0) {
      const waiters = this.waiters;
      this.waiters = [];
      for (const resolve of waiters) resolve();
    }
  }

  // Sends everything queued now; resolves when the queue is empty and nothing is in flight
  // (each batch acknowledged, refused or given up). Never rejects.
  flush() {
    return new Promise((resolve) => {
      this.waiters.push(resolve);
      if (this.timer !== null) {
        clearTimeout(this.timer);
        this.timer = null;
      }
      this.pump(true);
    });
  }

  // Stops taking events, flushes, and releases the sockets. Within `timeoutMs` retries stop
  // waiting and what is still unsent is counted as failed. Resolves with stats().
  async close({timeoutMs = 10000} = {}) {
    this.closed = true;
    const deadline = setTimeout(() => this.stop.abort(), timeoutMs);
    await this.flush();
    clearTimeout(deadline);
    this.stop.abort();
    if (this.timer !== null) clearTimeout(this.timer);
    this.client.destroy();
    return this.stats();
  }

  stats() {
    return {...this.counters, queued: this.length, inFlight: this.inFlight};
  }
}

// The default onError: a console warning at most once a minute (a bad key must not go unseen,
// nor flood the app's log).
function rateLimitedWarning() {
  let last = 0;
  let suppressed = 0;
  return (error) => {
    const now = Date.now();
    if (now - last < 60000) {
      suppressed++;
      return;
    }
    console.warn(`meterd usage tracking: ${error.message}` +
                 (suppressed ? ` (${suppressed} similar suppressed)` : ''));
    last = now;
    suppressed = 0;
  };
}

// The middleware. Options: those of UsageEmitter, plus
//   orgHeader ('x-org-id'): the request header naming the org (a UUID);
//   org(req): instead of the header (e.g. from the authenticated session);
//   meter ('api_calls') and quantity (1): values or functions (req, res) -> value;
//   industry: a value or function; else the industryHeader ('x-industry') of the request;
//   shouldTrack(req, res): false to emit nothing for this request (default: every request
//     whose response finished, whatever its status).
// Returns the middleware, with flush(), close(), stats() and the emitter attached.
function withUsageTracking(options = {}) {
  const {orgHeader = 'x-org-id', industryHeader = 'x-industry', meter = 'api_calls',
         quantity = 1, industry, org, shouldTrack, ...emitterOptions} = options;
  const emitter = new UsageEmitter(emitterOptions);
  const value = (v, req, res) => (typeof v === 'function' ? v(req, res) : v);
  const headerName = orgHeader.toLowerCase();
  const industryHeaderName = industryHeader.toLowerCase();

  function middleware(req, res, next) {
    try {
      res.once('finish', () => {
        // Runs after the response went out: nothing here can delay or fail it.
        try {
          if (shouldTrack && !shouldTrack(req, res)) return;
          const orgId = org ? org(req, res) : req.headers[headerName];
          emitter.emit({
            org: Array.isArray(orgId) ? orgId[0] : orgId,
            meter: value(meter, req, res),
            quantity: value(quantity, req, res),
            industry: industry !== undefined ? value(industry, req, res) :
                                               req.headers[industryHeaderName],
          });
        } catch (_) {
          emitter.counters.skipped++;
        }
      });
    } catch (_) {
      // Never fail the app's request for metering.
    }
    if (typeof next === 'function') next();
  }
  middleware.emitter = emitter;
  middleware.flush = () => emitter.flush();
  middleware.close = (closeOptions) => emitter.close(closeOptions);
  middleware.stats = () => emitter.stats();
  return middleware;
}

module.exports = {withUsageTracking, UsageEmitter, MeterdHttpClient, parseRetryAfter};
