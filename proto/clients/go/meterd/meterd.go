// Package meterd sends usage events to meterd's HTTP API (POST /v1/events) from Go, with the
// standard library only.
//
// An Emitter keeps a bounded queue (the oldest event is dropped and counted when it is full),
// sends batches from one goroutine (by size or every FlushInterval) as
// application/cloudevents-batch+json, and retries 503, 429 and network errors with backoff
// and Retry-After. A retry re-sends the same events (same source and id), which meterd counts
// once. Emit never blocks on the network.
//
// Untested: Go is not installed on the machine this was written on (see ../../README.md).
package meterd

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	mathrand "math/rand"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

var (
	uuidPattern  = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)
	meterPattern = regexp.MustCompile(`^[a-z][a-z0-9_]{0,62}$`)
	industries   = map[string]bool{"hs": true, "rest": true, "auto": true, "ret": true, "edu": true, "payroll": true}
)

// Event is one usage event as meterd takes it (CloudEvents 1.0, structured JSON mode).
type Event struct {
	SpecVersion string    `json:"specversion"`
	ID          string    `json:"id"`
	Source      string    `json:"source"`
	Type        string    `json:"type"`    // The meter: api_calls, data_exports, ai_requests, ...
	Subject     string    `json:"subject"` // The organization's UUID.
	Time        string    `json:"time"`
	Data        EventData `json:"data"`
}

// EventData is the event's data.
type EventData struct {
	Quantity int64  `json:"quantity"`
	Industry string `json:"industry"`
}

// Options configures an Emitter. URL, APIKey and Source are required.
type Options struct {
	URL           string // meterd's base URL ("http://meterd:8080") or the /v1/events URL.
	APIKey        string // An org key with the ingest scope, or an admin key.
	Source        string // The CloudEvents source: stable for this app.
	BatchSize     int    // Events per request; default 100, at most 1000.
	FlushInterval time.Duration
	MaxQueue      int // Events kept while meterd is slow or down; default 10000.
	MaxAttempts   int // Per batch; default 8.
	MaxBackoff    time.Duration
	Client        *http.Client // Default: a client with a 15 s timeout.
}

// Stats are the Emitter's counters.
type Stats struct {
	Emitted, Accepted, Rejected, Dropped, Failed, Skipped, Retries int64
	Queued                                                         int
}

// Emitter batches events and sends them to meterd. Safe for concurrent use.
type Emitter struct {
	opts     Options
	url      string
	mu       sync.Mutex
	queue    []Event // Bounded by opts.MaxQueue.
	inFlight int
	closed   bool
	stats    Stats
	wake     chan struct{} // Capacity 1: a pending wake-up.
	stop     chan struct{} // Closed at Close's deadline: retries give up.
	done     chan struct{} // Closed when the sender goroutine exits.
	flushes  int
	stopOnce sync.Once
}

// NewEmitter starts an Emitter's sender goroutine.
func NewEmitter(opts Options) (*Emitter, error) {
	if opts.URL == "" || opts.APIKey == "" || opts.Source == "" {
		return nil, errors.New("meterd: URL, APIKey and Source are required")
	}
	if opts.BatchSize <= 0 {
		opts.BatchSize = 100
	}
	if opts.BatchSize > 1000 {
		opts.BatchSize = 1000
	}
	if opts.FlushInterval <= 0 {
		opts.FlushInterval = 200 * time.Millisecond
	}
	if opts.MaxQueue <= 0 {
		opts.MaxQueue = 10000
	}
	if opts.MaxAttempts <= 0 {
		opts.MaxAttempts = 8
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = 5 * time.Second
	}
	if opts.Client == nil {
		opts.Client = &http.Client{Timeout: 15 * time.Second}
	}
	url := strings.TrimRight(opts.URL, "/")
	if !strings.HasSuffix(url, "/v1/events") {
		url += "/v1/events"
	}
	e := &Emitter{opts: opts, url: url, wake: make(chan struct{}, 1),
		stop: make(chan struct{}), done: make(chan struct{})}
	go e.run()
	return e, nil
}

// Emit queues one event and returns at once; false if it was not queued (invalid, or the
// Emitter is closed). When the queue is full the oldest queued event is dropped and counted.
func (e *Emitter) Emit(org, meter string, quantity int64, industry string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed || !uuidPattern.MatchString(org) || !meterPattern.MatchString(meter) ||
		!industries[industry] || quantity < 0 {
		e.stats.Skipped++
		return false
	}
	if len(e.queue) >= e.opts.MaxQueue {
		e.queue[0] = Event{} // Release its strings.
		e.queue = e.queue[1:]
		e.stats.Dropped++
	}
	e.queue = append(e.queue, Event{
		SpecVersion: "1.0",
		ID:          newID(),
		Source:      e.opts.Source,
		Type:        meter,
		Subject:     org,
		Time:        time.Now().UTC().Format("2006-01-02T15:04:05.000Z"),
		Data:        EventData{Quantity: quantity, Industry: industry},
	})
	e.stats.Emitted++
	if len(e.queue) >= e.opts.BatchSize {
		e.signal()
	}
	return true
}

// Flush sends everything queued and waits until nothing is queued or in flight, or ctx ends.
func (e *Emitter) Flush(ctx context.Context) error {
	e.mu.Lock()
	e.flushes++
	e.mu.Unlock()
	defer func() {
		e.mu.Lock()
		e.flushes--
		e.mu.Unlock()
	}()
	e.signal()
	// Polls: the sender signals nothing per batch, and a poll every 20 ms is cheap.
	ticker := time.NewTicker(20 * time.Millisecond)
	defer ticker.Stop()
	for {
		e.mu.Lock()
		empty := len(e.queue) == 0 && e.inFlight == 0
		e.mu.Unlock()
		if empty {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-e.done:
			return errors.New("meterd: emitter stopped")
		case <-ticker.C:
			e.signal()
		}
	}
}

// Close stops taking events, flushes until ctx ends, then gives up on what is left (counted as
// Failed) and stops the sender.
func (e *Emitter) Close(ctx context.Context) Stats {
	e.mu.Lock()
	e.closed = true
	e.mu.Unlock()
	_ = e.Flush(ctx)
	e.stopOnce.Do(func() { close(e.stop) })
	<-e.done
	return e.Stats()
}

// Stats returns a snapshot of the counters.
func (e *Emitter) Stats() Stats {
	e.mu.Lock()
	defer e.mu.Unlock()
	s := e.stats
	s.Queued = len(e.queue)
	return s
}

func (e *Emitter) stopped() bool {
	select {
	case <-e.stop:
		return true
	default:
		return false
	}
}

func (e *Emitter) signal() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

func (e *Emitter) run() {
	defer close(e.done)
	ticker := time.NewTicker(e.opts.FlushInterval)
	defer ticker.Stop()
	for {
		select {
		case <-e.stop:
			e.mu.Lock()
			e.stats.Failed += int64(len(e.queue))
			e.queue = nil
			e.mu.Unlock()
			return
		case <-e.wake:
		case <-ticker.C:
		}
		for {
			e.mu.Lock()
			n := len(e.queue)
			if n > e.opts.BatchSize {
				n = e.opts.BatchSize
			}
			if n == 0 {
				e.mu.Unlock()
				break
			}
			batch := make([]Event, n)
			copy(batch, e.queue[:n])
			for i := 0; i < n; i++ {
				e.queue[i] = Event{}
			}
			e.queue = e.queue[n:]
			e.inFlight = n
			e.mu.Unlock()
			accepted, rejected, retries, err := e.send(batch)
			e.mu.Lock()
			e.inFlight = 0
			e.stats.Accepted += accepted
			e.stats.Rejected += rejected
			e.stats.Retries += retries
			if err != nil {
				e.stats.Failed += int64(n)
			}
			more := len(e.queue) >= e.opts.BatchSize || e.flushes > 0 || e.closed
			e.mu.Unlock()
			if !more || e.stopped() {
				break
			}
		}
	}
}

type answer struct {
	Accepted []json.RawMessage `json:"accepted"`
	Rejected []json.RawMessage `json:"rejected"`
}

// send posts one batch with retries: accepted, rejected, retries made, and an error if the
// batch was given up.
func (e *Emitter) send(batch []Event) (int64, int64, int64, error) {
	body, err := json.Marshal(batch)
	if err != nil {
		return 0, 0, 0, err
	}
	var last error
	for attempt := 1; attempt <= e.opts.MaxAttempts; attempt++ {
		status, wait, text, postErr := e.post(body)
		if postErr == nil && (status == http.StatusAccepted || status == http.StatusBadRequest) {
			// 400: every event was refused; re-sending cannot help.
			var a answer
			_ = json.Unmarshal(text, &a)
			accepted, rejected := int64(len(a.Accepted)), int64(len(a.Rejected))
			if status == http.StatusBadRequest {
				accepted = 0
				if rejected == 0 { // not_a_batch, ...: refused as a whole.
					rejected = int64(len(batch))
				}
			}
			return accepted, rejected, int64(attempt - 1), nil
		}
		if postErr != nil {
			last = postErr
		} else {
			last = fmt.Errorf("meterd answered %d: %.200s", status, text)
		}
		retryable := postErr != nil || status == 408 || status == 429 || status == 502 ||
			status == 503 || status == 504
		if !retryable || attempt == e.opts.MaxAttempts {
			return 0, 0, int64(attempt - 1), last
		}
		backoff := time.Duration(math.Min(float64(e.opts.MaxBackoff),
			float64(100*time.Millisecond)*math.Pow(2, float64(attempt-1))))
		delay := backoff/2 + time.Duration(mathrand.Int63n(int64(backoff/2)+1))
		if wait > delay {
			delay = wait
		}
		timer := time.NewTimer(delay)
		select {
		case <-e.stop:
			timer.Stop()
			return 0, 0, int64(attempt - 1), errors.New("meterd: stopped by Close before meterd acknowledged")
		case <-timer.C:
		}
	}
	return 0, 0, int64(e.opts.MaxAttempts - 1), last
}

func (e *Emitter) post(body []byte) (int, time.Duration, []byte, error) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-e.stop: // Close's deadline cuts a request still waiting.
			cancel()
		case <-ctx.Done():
		}
	}()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, e.url, bytes.NewReader(body))
	if err != nil {
		return 0, 0, nil, err
	}
	req.Header.Set("Content-Type", "application/cloudevents-batch+json")
	req.Header.Set("Authorization", "Bearer "+e.opts.APIKey)
	resp, err := e.opts.Client.Do(req)
	if err != nil {
		return 0, 0, nil, err
	}
	defer resp.Body.Close()
	text, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return 0, 0, nil, err
	}
	return resp.StatusCode, retryAfter(resp.Header.Get("Retry-After")), text, nil
}

func retryAfter(value string) time.Duration {
	if value == "" {
		return 0
	}
	if seconds, err := strconv.Atoi(strings.TrimSpace(value)); err == nil && seconds >= 0 {
		return time.Duration(seconds) * time.Second
	}
	if at, err := http.ParseTime(value); err == nil {
		if d := time.Until(at); d > 0 {
			return d
		}
	}
	return 0
}

// newID returns a random UUID (version 4).
func newID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		// crypto/rand does not fail on supported platforms; fall back to time + math/rand.
		binaryTime := uint64(time.Now().UnixNano())
		for i := 0; i < 8; i++ {
			b[i] = byte(binaryTime >> (8 * i))
			b[8+i] = byte(mathrand.Intn(256))
		}
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
