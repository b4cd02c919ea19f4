#!/usr/bin/env python3
"""Usage events for meterd from Python (standard library only, but for KafkaEmitter).

HttpEmitter: a bounded queue and one background thread that posts batches to meterd's
`POST /v1/events` (application/cloudevents-batch+json), retrying 503/429/network errors with
backoff and Retry-After (the same events each time: meterd counts a source + id once).
KafkaEmitter: an idempotent (acks=all) confluent_kafka producer to meterd's topic, keyed by org.

Both: emit() never blocks and never raises for a bad event; flush(); close(); stats().
CLI (used by tests/integration/clients_test.cc):

  python3 meterd_client.py http  --url http://127.0.0.1:8080 --key TOKEN --org ORG --count N
  python3 meterd_client.py kafka --brokers HOST:PORT --topic usage-events --org ORG --count N

prints the emitter's counters as one JSON line and exits 0 only if every event was accepted.
See ../README.md.
"""

import argparse
import collections
import datetime
import email.utils
import http.client
import json
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
import uuid

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_METER = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
INDUSTRIES = frozenset({"hs", "rest", "auto", "ret", "edu", "payroll"})
# meterd takes at most 1000 events per request.
MAX_BATCH = 1000
# Statuses a retry can fix; status 0 is a network error or timeout.
_RETRYABLE = frozenset({0, 408, 429, 502, 503, 504})


def usage_event(org, meter="api_calls", quantity=1, industry="hs", source="python",
                event_id=None, at=None):
    """One usage event as a dict (CloudEvents 1.0), or None if it cannot be valid."""
    if not isinstance(org, str) or not _UUID.match(org):
        return None
    if not isinstance(meter, str) or not _METER.match(meter) or industry not in INDUSTRIES:
        return None
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 0:
        return None
    at = at or datetime.datetime.now(datetime.timezone.utc)
    return {
        "specversion": "1.0",
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": meter,
        "subject": org,
        "time": at.astimezone(datetime.timezone.utc).isoformat(timespec="milliseconds")
                  .replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": {"quantity": quantity, "industry": industry},
    }


def _retry_after_seconds(value):
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class HttpEmitter:
    """Batches events in a bounded queue; one daemon thread posts them to meterd.

    Memory: at most max_queue queued events plus one batch in flight; when the queue is full
    the oldest event is dropped and counted. Thread-safe: emit() from any thread.
    """

    def __init__(self, url, api_key, source="python", batch_size=100, flush_interval=0.2,
                 max_queue=10000, max_attempts=8, min_backoff=0.1, max_backoff=5.0,
                 timeout=15.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https"):
            raise ValueError("url must be http:// or https://")
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname
        self._port = parsed.port or (443 if self._https else 80)
        self._path = parsed.path if parsed.path not in ("", "/") else "/v1/events"
        self._api_key = api_key
        self._source = source
        self._batch_size = max(1, min(batch_size, MAX_BATCH))
        self._flush_interval = flush_interval
        self._max_queue = max(1, max_queue)
        self._max_attempts = max(1, max_attempts)
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._timeout = timeout
        self._queue = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._in_flight = 0
        self._first_queued_at = time.monotonic()
        self._flush_requests = 0
        self._closed = False
        self._stop = threading.Event()  # Set at close()'s deadline: retries give up.
        self._connection = None
        self._counters = dict(emitted=0, accepted=0, rejected=0, dropped=0, failed=0,
                              skipped=0, retries=0)
        self._last_error = None
        self._thread = threading.Thread(target=self._run, name="meterd-http-emitter",
                                        daemon=True)
        self._thread.start()

    def emit(self, org, meter="api_calls", quantity=1, industry="hs", event_id=None, at=None):
        """Queues one event; True if queued. Never blocks on the network, never raises."""
        try:
            event = usage_event(org, meter, quantity, industry, self._source, event_id, at)
        except Exception:  # noqa: BLE001 - metering must not fail the caller
            event = None
        with self._lock:
            if event is None or self._closed:
                self._counters["skipped"] += 1
                return False
            if len(self._queue) >= self._max_queue:
                self._queue.popleft()
                self._counters["dropped"] += 1
            if not self._queue:
                self._first_queued_at = time.monotonic()
            self._queue.append(event)
            self._counters["emitted"] += 1
            # The sender wakes for the first event (to start the flush_interval clock) and for
            # a full batch; not for every event.
            if len(self._queue) == 1 or len(self._queue) >= self._batch_size:
                self._wake.notify()
        return True

    def flush(self, timeout=30.0):
        """Sends everything queued now; True once the queue is empty and nothing is in flight
        (acknowledged, refused or given up), False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._flush_requests += 1
            self._wake.notify()
            try:
                while self._queue or self._in_flight:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._thread.is_alive():
                        return False
                    self._wake.wait(min(remaining, 0.05))
                return True
            finally:
                self._flush_requests -= 1

    def close(self, timeout=10.0):
        """Stops taking events and flushes; after `timeout` retries stop, a request still
        waiting for meterd is cut, and what is unsent is counted as failed. Returns stats()."""
        with self._lock:
            self._closed = True
        self.flush(timeout)
        self._stop.set()
        with self._lock:
            self._wake.notify_all()
        # Cut a request still waiting for an answer (shutdown wakes a blocked recv; close
        # alone may not). Best effort: the sender may be between requests.
        sock = getattr(self._connection, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=2.0)
        return self.stats()

    def stats(self):
        with self._lock:
            return dict(self._counters, queued=len(self._queue), in_flight=self._in_flight,
                        last_error=self._last_error)

    # The sender thread.

    def _run(self):
        while True:
            with self._lock:
                while True:
                    if self._stop.is_set():
                        # close() timed out (or finished): what is left is given up.
                        self._counters["failed"] += len(self._queue)
                        self._queue.clear()
                        self._wake.notify_all()
                        self._disconnect()
                        return
                    if self._queue:
                        due = self._first_queued_at + self._flush_interval
                        if (len(self._queue) >= self._batch_size or self._flush_requests or
                                self._closed or time.monotonic() >= due):
                            break
                        self._wake.wait(max(0.001, due - time.monotonic()))
                    else:
                        self._wake.wait(1.0)
                batch = [self._queue.popleft()
                         for _ in range(min(self._batch_size, len(self._queue)))]
                self._first_queued_at = time.monotonic()
                self._in_flight = len(batch)
            accepted, rejected, failed, retries, error = self._send(batch)
            with self._lock:
                self._in_flight = 0
                self._counters["accepted"] += accepted
                self._counters["rejected"] += rejected
                self._counters["failed"] += failed
                self._counters["retries"] += retries
                if error:
                    self._last_error = error
                self._wake.notify_all()

    def _send(self, batch):
        """Posts one batch with retries: (accepted, rejected, failed, retries, error)."""
        body = json.dumps(batch, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/cloudevents-batch+json",
                   "Authorization": "Bearer " + self._api_key}
        error = None
        for attempt in range(1, self._max_attempts + 1):
            status, retry_after, answer = self._post(body, headers)
            if status in (202, 400):
                # 400: every event was refused; re-sending cannot help.
                parsed = _json_or_none(answer) or {}
                rejected = len(parsed.get("rejected") or [])
                accepted = len(parsed.get("accepted") or []) if status == 202 else 0
                if status == 400 and rejected == 0:
                    rejected = len(batch)  # not_a_batch, ...: refused as a whole.
                if status == 202 and "accepted" not in parsed:
                    accepted = len(batch)
                err = None if rejected == 0 else "refused: " + answer[:300]
                return accepted, rejected, 0, attempt - 1, err
            error = "meterd answered %d: %s" % (status, answer[:300]) if status else answer
            if status not in _RETRYABLE or attempt == self._max_attempts or self._stop.is_set():
                return 0, 0, len(batch), attempt - 1, error
            backoff = min(self._max_backoff, self._min_backoff * 2 ** (attempt - 1))
            delay = max(backoff / 2 + random.random() * backoff / 2, retry_after or 0.0)
            if self._stop.wait(delay):
                return 0, 0, len(batch), attempt - 1, error
        return 0, 0, len(batch), self._max_attempts - 1, error

    def _post(self, body, headers):
        """One attempt: (status, retry_after_seconds, body text); status 0 on a network
        error, with the error as the text."""
        try:
            if self._connection is None:
                cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
                self._connection = cls(self._host, self._port, timeout=self._timeout)
            self._connection.request("POST", self._path, body=body, headers=headers)
            response = self._connection.getresponse()
            text = response.read(1 << 20).decode("utf-8", "replace")
            if response.will_close or response.getheader("Connection", "").lower() == "close":
                self._disconnect()
            return (response.status, _retry_after_seconds(response.getheader("Retry-After")),
                    text)
        except (OSError, http.client.HTTPException, socket.timeout) as e:
            self._disconnect()
            return 0, None, "%s: %s" % (type(e).__name__, e)

    def _disconnect(self):
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # noqa: BLE001
                pass
            self._connection = None


def _json_or_none(text):
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else None
    except ValueError:
        return None


class KafkaEmitter:
    """Produces events to meterd's Kafka topic with confluent_kafka (Debian:
    python3-confluent-kafka), one event per message keyed by org (so an org's events, and a
    retry of one, land on the same partition), idempotent with acks=all.

    Memory is bounded by librdkafka's queue (queue.buffering.max.messages, 100000 by
    default); when it is full, emit() drops the event and counts it rather than block.
    Call poll() now and then, or rely on emit() doing it; flush() waits for delivery.
    """

    def __init__(self, brokers, topic, source="python", config=None):
        try:
            import confluent_kafka  # noqa: PLC0415 - optional dependency
        except ImportError as e:
            raise ImportError(
                "KafkaEmitter needs confluent_kafka: apt-get install python3-confluent-kafka "
                "(Debian; run it with /usr/bin/python3) or pip install confluent-kafka") from e
        settings = {
            "bootstrap.servers": brokers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            "compression.type": "lz4",
        }
        settings.update(config or {})
        self._producer = confluent_kafka.Producer(settings)
        self._buffer_error = BufferError
        self._topic = topic
        self._source = source
        self._lock = threading.Lock()
        self._counters = dict(emitted=0, accepted=0, rejected=0, dropped=0, failed=0,
                              skipped=0, retries=0)
        self._last_error = None

    def _delivered(self, error, _message):
        with self._lock:
            if error is None:
                self._counters["accepted"] += 1
            else:
                self._counters["failed"] += 1
                self._last_error = str(error)

    def emit(self, org, meter="api_calls", quantity=1, industry="hs", event_id=None, at=None):
        """Queues one event in the producer; True if queued. Never blocks, never raises."""
        event = usage_event(org, meter, quantity, industry, self._source, event_id, at)
        if event is None:
            with self._lock:
                self._counters["skipped"] += 1
            return False
        value = json.dumps(event, separators=(",", ":")).encode()
        for _ in range(2):
            try:
                self._producer.produce(self._topic, value=value, key=org.lower().encode(),
                                       on_delivery=self._delivered)
                with self._lock:
                    self._counters["emitted"] += 1
                self._producer.poll(0)  # Serves delivery reports; does not wait.
                return True
            except self._buffer_error:
                # librdkafka's queue is full: serve delivery reports once and try again, then
                # drop rather than block the caller.
                self._producer.poll(0)
            except Exception as e:  # noqa: BLE001 - metering must not fail the caller
                with self._lock:
                    self._last_error = str(e)
                break
        with self._lock:
            self._counters["dropped"] += 1
        return False

    def poll(self, timeout=0.0):
        return self._producer.poll(timeout)

    def flush(self, timeout=30.0):
        """Waits until every queued event is delivered or failed; True if none is left."""
        return self._producer.flush(timeout) == 0

    def close(self, timeout=10.0):
        remaining = self._producer.flush(timeout)
        with self._lock:
            self._counters["failed"] += remaining
        return self.stats()

    def stats(self):
        with self._lock:
            return dict(self._counters, queued=len(self._producer), in_flight=0,
                        last_error=self._last_error)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("http", "kafka"):
        p = sub.add_parser(name)
        p.add_argument("--org", required=True)
        p.add_argument("--count", type=int, required=True)
        p.add_argument("--meter", default="api_calls")
        p.add_argument("--quantity", type=int, default=1)
        p.add_argument("--industry", default="hs")
        p.add_argument("--source", default="meterd_client.py")
        p.add_argument("--timeout", type=float, default=40.0, help="for flush, seconds")
        if name == "http":
            p.add_argument("--url", required=True)
            p.add_argument("--key", required=True)
            p.add_argument("--batch-size", type=int, default=100)
            p.add_argument("--max-attempts", type=int, default=8)
        else:
            p.add_argument("--brokers", required=True)
            p.add_argument("--topic", required=True)
    args = parser.parse_args(argv)
    start = time.monotonic()
    if args.mode == "http":
        emitter = HttpEmitter(args.url, args.key, source=args.source,
                              batch_size=args.batch_size, max_attempts=args.max_attempts,
                              max_queue=max(10000, args.count))
    else:
        try:
            emitter = KafkaEmitter(args.brokers, args.topic, source=args.source)
        except ImportError as e:
            print(json.dumps({"error": str(e)}))
            print("meterd_client.py: %s" % e, file=sys.stderr)
            return 3
    for _ in range(args.count):
        emitter.emit(args.org, args.meter, args.quantity, args.industry)
    stats = emitter.close(timeout=args.timeout)
    stats["seconds"] = round(time.monotonic() - start, 3)
    print(json.dumps(stats), flush=True)
    return 0 if stats["accepted"] == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
