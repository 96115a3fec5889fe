// Command dmdriver is the harness's dm load process in Go (`python -m bench dm --driver go`), so
// that driving thousands of DMs a second costs the machine little beside the server it measures.
//
// It is not run by hand: bench/go_driver.py starts it and speaks the load processes' control
// protocol to it over stdin and stdout (each message a 4-byte big-endian length, then a MessagePack
// map). Python keeps the plan, the schedule and the accounting: it sends the users, then each
// phase's schedule as it computes it; this process connects the users, sends every DM at its due
// time on its sender's connection (with its cid, retried and resent as bench/client.py does),
// acks and pings as bench/peernet_client.py does, resumes after a reconnect, and reports raw
// events back: each DM's send lag, `ok` time or failure reason, and every `msg` received
// (k, recipient, seq, arrival). bench/ledger.py classifies them, as it does the Python workers'.
package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
	"github.com/vmihailenco/msgpack/v5"
	"github.com/vmihailenco/msgpack/v5/msgpcode"
)

const (
	handshakeTimeout = 10 * time.Second
	maxFrameBytes    = 1 << 20 // bench/peernet_client.py's MAX_FRAME_BYTES
	maxRetries       = 8       // bench/client.py's MAX_RETRIES
	tickEvery        = time.Second
	httpConcurrency  = 32
	writeTimeout     = 10 * time.Second
	sweepEvery       = 20 * time.Millisecond
	pollEvery        = 20 * time.Millisecond
	disconnected     = "disconnected_until_timeout" // bench/client.py's DISCONNECTED
)

// Errors after which the same request may simply be sent again: the server processed nothing.
var retriable = map[string]bool{"rate_limited": true, "unavailable": true}

func nowUs() int64 { return time.Now().UnixMicro() } // bench.client.now_us: epoch microseconds

// command is any message from the coordinator; each op uses its own fields.
type command struct {
	Op string `msgpack:"op"`
	// setup: every user of the plan by index, and the indices to connect
	HTTPURLs           []string `msgpack:"http_urls"`
	WSURLs             []string `msgpack:"ws_urls"`
	Users              []string `msgpack:"users"`
	Connect            []int    `msgpack:"connect"`
	Run                string   `msgpack:"run"`
	Size               int      `msgpack:"size"`
	ConnectConcurrency int      `msgpack:"connect_concurrency"`
	RequestTimeout     float64  `msgpack:"request_timeout"`
	// phase
	Phase   int   `msgpack:"phase"`
	T0      int64 `msgpack:"t0_us"`
	WarmEnd int64 `msgpack:"warm_end_us"`
	// events: the phase's next scheduled DMs in order, k counting on from the previous chunk
	At     []int64 `msgpack:"at"`
	Actor  []int32 `msgpack:"actor"`
	Target []int32 `msgpack:"target"`
	// expect
	Deadline int64 `msgpack:"deadline_us"`
}

// control is this process's end of the channel to the coordinator.
type control struct {
	mu sync.Mutex
	r  *bufio.Reader
	w  *bufio.Writer
}

func (c *control) send(m map[string]any) {
	data, err := msgpack.Marshal(m)
	if err != nil {
		fatal(fmt.Errorf("encoding %v: %w", m["op"], err))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(data)))
	_, _ = c.w.Write(n[:])
	_, _ = c.w.Write(data)
	if err := c.w.Flush(); err != nil {
		fatal(fmt.Errorf("the coordinator is gone: %w", err)) // nobody is left to report to
	}
}

func (c *control) recv() (command, error) {
	var cmd command
	var n [4]byte
	if _, err := io.ReadFull(c.r, n[:]); err != nil {
		return cmd, err
	}
	data := make([]byte, binary.BigEndian.Uint32(n[:]))
	if _, err := io.ReadFull(c.r, data); err != nil {
		return cmd, err
	}
	return cmd, msgpack.Unmarshal(data, &cmd)
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "dmdriver: %v\n", err)
	os.Exit(1)
}

// phase is what one phase has done and seen so far; the driver's mu guards it.
type phase struct {
	n           int
	t0, warmEnd int64
	chunks      chan command // the schedule as it arrives; closed at its end
	expect      chan int64   // the drain deadline, once every process's DMs are resolved
	actor       []int32      // by k, as the chunks arrive
	target      []int32
	sent, late  int
	outstanding int // dispatched, neither acknowledged nor failed
	ackK        []int
	ackUs       []int64
	failK       []int
	failReason  []string
	lagUs       []int64
	recvK       []int
	recvIdx     []int
	recvSeq     []int64
	recvUs      []int64
	first       map[uint64]struct{} // (k, recipient) seen at least once
	firstByK    []uint16            // distinct recipients seen, by k
	acked       []bool              // by k
	have        int                 // first copies of acknowledged DMs
	need        int                 // deliveries owed by acknowledged DMs: each to its two participants
	newLat      []int64             // latencies to other users since the last progress, measured only
}

func (ph *phase) grow(n int) {
	for len(ph.acked) < n {
		ph.acked = append(ph.acked, false)
		ph.firstByK = append(ph.firstByK, 0)
	}
}

type driver struct {
	ctl     *control
	cfg     command
	conns   []*conn // by user index; nil for users not connected
	timeout time.Duration
	started time.Time

	mu         sync.Mutex // guards everything below, and the phase
	ph         *phase
	foreign    int
	stray      int
	errs       map[string]int
	closeCodes map[string]int

	sweepMu  sync.Mutex
	deadline []timeout // in dispatch order, so in deadline order
}

type timeout struct {
	at  time.Time
	c   *conn
	rid int64
}

func (d *driver) countError(code string) {
	d.mu.Lock()
	d.errs[code]++
	d.mu.Unlock()
}

func (d *driver) acknowledged(k int, at int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	ph := d.ph
	if ph == nil {
		return
	}
	ph.outstanding--
	ph.ackK = append(ph.ackK, k)
	ph.ackUs = append(ph.ackUs, at)
	ph.grow(k + 1)
	ph.acked[k] = true
	ph.have += int(ph.firstByK[k])
	ph.need += 2
}

func (d *driver) failed(k int, reason string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if ph := d.ph; ph != nil {
		ph.outstanding--
		ph.failK = append(ph.failK, k)
		ph.failReason = append(ph.failReason, reason)
	}
}

// received records a `msg` as worker.LoadWorker._message does: foreign (another run's body),
// stray (between phases), late (an earlier phase's), else a receipt.
func (d *driver) received(idx int, body, from string, seq int64, at int64) {
	run, phaseN, k, sched, ok := parseBody(body)
	d.mu.Lock()
	defer d.mu.Unlock()
	if !ok || run != d.cfg.Run {
		d.foreign++
		return
	}
	ph := d.ph
	if ph == nil {
		d.stray++
		return
	}
	if phaseN != ph.n {
		ph.late++
		return
	}
	ph.recvK = append(ph.recvK, k)
	ph.recvIdx = append(ph.recvIdx, idx)
	ph.recvSeq = append(ph.recvSeq, seq)
	ph.recvUs = append(ph.recvUs, at)
	key := uint64(k)<<24 | uint64(idx)
	if _, seen := ph.first[key]; seen {
		return
	}
	ph.first[key] = struct{}{}
	if k < 1<<30 {
		ph.grow(k + 1)
		ph.firstByK[k]++
		if ph.acked[k] {
			ph.have++
		}
	}
	if sched >= ph.warmEnd && from != d.cfg.Users[idx] {
		ph.newLat = append(ph.newLat, at-sched)
	}
}

// parseBody reads bench.plan.encode_body's header: run.phase.k.sched_us.padding
func parseBody(body string) (run string, phase, k int, sched int64, ok bool) {
	var parts [4]string
	rest := body
	for i := range parts {
		dot := strings.IndexByte(rest, '.')
		if dot < 0 {
			return
		}
		parts[i], rest = rest[:dot], rest[dot+1:]
	}
	var err1, err2, err3 error
	phase, err1 = strconv.Atoi(parts[1])
	k, err2 = strconv.Atoi(parts[2])
	sched, err3 = strconv.ParseInt(parts[3], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || k < 0 {
		return "", 0, 0, 0, false
	}
	return parts[0], phase, k, sched, true
}

// appendBody is bench.plan.encode_body: the header, padded with x to `size` characters.
func appendBody(b []byte, run string, phase, k int, sched int64, size int) []byte {
	start := len(b)
	b = append(b, run...)
	b = append(b, '.')
	b = strconv.AppendInt(b, int64(phase), 10)
	b = append(b, '.')
	b = strconv.AppendInt(b, int64(k), 10)
	b = append(b, '.')
	b = strconv.AppendInt(b, sched, 10)
	b = append(b, '.')
	for len(b)-start < size {
		b = append(b, 'x')
	}
	return b
}

// --- one user's connection ---------------------------------------------------------------------

type pending struct {
	rid      int64
	k        int
	data     []byte
	sentGen  int // 0: never written
	attempts int
	lastCode string
}

type outFrame struct {
	gen  int
	data []byte
}

// conn is bench/client.py's ReconnectingConnection with bench/peernet_client.py's adapter: one
// WebSocket kept open until stop, reconnected with backoff and `resume`, requests carried across
// reconnects. Its reader goroutine reads and reconnects; its writer goroutine writes what is
// queued, so a slow socket delays that user and never the schedule.
type conn struct {
	d                  *driver
	idx                int
	user, token, wsURL string
	wake               chan struct{}

	mu        sync.Mutex
	ws        *websocket.Conn // nil while down
	want      bool
	gen       int
	welcomed  bool
	heartbeat time.Duration
	lastSend  time.Time
	lastSeq   int64
	ackedSeq  int64
	seqs      map[int64]struct{}
	nextRid   int64
	pending   map[int64]*pending
	queue     []outFrame
	stats     connStats
}

type connStats struct {
	connects, reconnects, resent, retried, framesIn, framesOut, badFrames, resumes, resumesIncomplete int
}

func (c *conn) enqueueLocked(data []byte) {
	c.queue = append(c.queue, outFrame{c.gen, data})
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *conn) writeLocked(p *pending) {
	if c.ws == nil {
		return // sent once reconnected
	}
	p.sentGen = c.gen
	c.enqueueLocked(p.data)
}

func (c *conn) writeLoop() {
	for range c.wake {
		c.mu.Lock()
		batch, ws, gen := c.queue, c.ws, c.gen
		c.queue = nil
		c.mu.Unlock()
		if ws == nil {
			continue
		}
		n := 0
		for _, f := range batch {
			if f.gen != gen {
				continue // queued for a connection that dropped: what may be resent was
			}
			_ = ws.SetWriteDeadline(time.Now().Add(writeTimeout))
			if ws.WriteMessage(websocket.BinaryMessage, f.data) != nil {
				break // the reader sees the connection drop and reconnects
			}
			n++
		}
		if n > 0 {
			c.mu.Lock()
			c.stats.framesOut += n
			c.lastSend = time.Now()
			c.mu.Unlock()
		}
	}
}

func (c *conn) handshake() (*websocket.Conn, error) {
	ws, _, err := (&websocket.Dialer{HandshakeTimeout: handshakeTimeout}).Dial(c.wsURL, nil)
	if err != nil {
		return nil, fmt.Errorf("%s: cannot connect: %w", c.user, err)
	}
	ws.SetReadLimit(maxFrameBytes)
	hello := map[string]any{"t": "hello", "token": c.token}
	c.mu.Lock()
	if c.welcomed {
		hello["resume"] = c.lastSeq
	}
	c.mu.Unlock()
	data, _ := msgpack.Marshal(hello)
	_ = ws.SetReadDeadline(time.Now().Add(handshakeTimeout))
	if err = ws.WriteMessage(websocket.BinaryMessage, data); err == nil {
		_, data, err = ws.ReadMessage()
	}
	var f inFrame
	if err == nil {
		var dec frameDecoder
		if dec.decode(data, &f) != nil || f.t != "welcome" {
			err = fmt.Errorf("expected welcome, got %.200q", data)
		}
	}
	if err != nil {
		ws.Close()
		var ce *websocket.CloseError
		if errors.As(err, &ce) {
			return nil, fmt.Errorf("%s: handshake closed with %d", c.user, ce.Code)
		}
		return nil, fmt.Errorf("%s: %w", c.user, err)
	}
	_ = ws.SetReadDeadline(time.Time{})
	c.mu.Lock()
	c.welcomed = true
	if f.heartbeat > 0 {
		c.heartbeat = time.Duration(f.heartbeat) * time.Millisecond
	}
	c.mu.Unlock()
	return ws, nil
}

func (c *conn) connected(ws *websocket.Conn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	c.stats.connects++
	c.ws = ws
	c.queue = nil
	c.lastSend = time.Now()
}

// flushPending (re)sends what this connection has not written: new requests made while it was
// down, and DMs written on a connection that dropped (idempotent by their cid).
func (c *conn) flushPending() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range c.pending {
		if p.sentGen != c.gen {
			if p.sentGen != 0 {
				c.stats.resent++
			}
			c.writeLocked(p)
		}
	}
}

func (c *conn) readLoop(ws *websocket.Conn) {
	var dec frameDecoder
	for {
		c.flushPending()
		var err error
		for {
			var data []byte
			if _, data, err = ws.ReadMessage(); err != nil {
				break
			}
			c.dispatch(&dec, data, nowUs())
		}
		code := websocket.CloseAbnormalClosure
		if ce, ok := err.(*websocket.CloseError); ok {
			code = ce.Code
		}
		ws.Close()
		c.mu.Lock()
		c.ws = nil
		want := c.want
		if want {
			c.stats.reconnects++
		}
		c.mu.Unlock()
		c.d.mu.Lock()
		c.d.closeCodes[strconv.Itoa(code)]++
		c.d.mu.Unlock()
		if !want {
			return
		}
		if ws = c.reconnect(); ws == nil {
			return
		}
		c.connected(ws)
	}
}

func (c *conn) reconnect() *websocket.Conn {
	delay := 50 * time.Millisecond
	for {
		c.mu.Lock()
		want := c.want
		c.mu.Unlock()
		if !want {
			return nil
		}
		ws, err := c.handshake()
		if err == nil {
			return ws
		}
		c.d.countError("reconnect:" + errorKind(err))
		time.Sleep(delay)
		delay = min(2*delay, 2*time.Second)
	}
}

func errorKind(err error) string {
	var ce *websocket.CloseError
	switch {
	case errors.As(err, &ce):
		return "closed_" + strconv.Itoa(ce.Code)
	case strings.Contains(err.Error(), "expected welcome"):
		return "handshake"
	default:
		return "connect"
	}
}

func (c *conn) dispatch(dec *frameDecoder, data []byte, at int64) {
	var f inFrame
	bad := dec.decode(data, &f) != nil
	c.mu.Lock()
	c.stats.framesIn++
	if bad {
		c.stats.badFrames++
		c.mu.Unlock()
		return
	}
	switch f.t {
	case "ok":
		p := c.pending[f.rid]
		if !f.hasRid || p == nil {
			c.mu.Unlock()
			return
		}
		delete(c.pending, f.rid)
		c.mu.Unlock()
		c.d.acknowledged(p.k, at)
		return
	case "error":
		c.mu.Unlock()
		c.d.countError(f.code)
		if f.hasRid {
			c.refused(f.rid, f.code)
		}
		return
	case "msg", "note":
		if f.hasSeq {
			c.seqs[f.seq] = struct{}{}
			c.lastSeq = max(c.lastSeq, f.seq)
		}
	case "resumed":
		c.stats.resumes++
		if f.hasComplete && !f.complete {
			c.stats.resumesIncomplete++ // part of the gap is past retention
		}
	}
	c.mu.Unlock()
	if f.t == "msg" {
		c.d.received(c.idx, f.body, f.from, f.seq, at)
	}
}

// refused: the server answered a request with an error. A retriable refusal (nothing was
// processed) is sent again after a backoff, up to maxRetries times; anything else fails it.
func (c *conn) refused(rid int64, code string) {
	c.mu.Lock()
	p := c.pending[rid]
	if p == nil {
		c.mu.Unlock()
		return
	}
	if retriable[code] && p.attempts < maxRetries {
		p.attempts++
		p.lastCode = code
		c.stats.retried++
		delay := time.Duration(0.05 * math.Pow(2, float64(min(p.attempts, 5))) * float64(time.Second))
		c.mu.Unlock()
		time.AfterFunc(delay, func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			if c.pending[rid] == p {
				c.writeLocked(p)
			}
		})
		return
	}
	delete(c.pending, rid)
	c.mu.Unlock()
	c.d.failed(p.k, code)
}

// keepalive: acks drive unread counts; a `ping` frame keeps an otherwise idle connection alive
// (Serve's proxy answers WebSocket pings itself, so those would not count as traffic).
func (c *conn) keepalive(now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ws == nil {
		return
	}
	if c.lastSeq > c.ackedSeq {
		c.ackedSeq = c.lastSeq
		data, _ := msgpack.Marshal(map[string]any{"t": "ack", "seq": c.lastSeq})
		c.enqueueLocked(data)
	} else if now.Sub(c.lastSend) > c.heartbeat/2 {
		c.lastSend = now
		data, _ := msgpack.Marshal(map[string]any{"t": "ping"})
		c.enqueueLocked(data)
	}
}

// --- frames ------------------------------------------------------------------------------------

// inFrame is what the driver reads of a server frame; everything else is skipped undecoded.
type inFrame struct {
	t, code, from, body   string
	rid, seq, heartbeat   int64
	hasRid, hasSeq        bool
	complete, hasComplete bool
}

type frameDecoder struct {
	r   bytes.Reader
	dec *msgpack.Decoder
}

func (fd *frameDecoder) decode(data []byte, f *inFrame) error {
	fd.r.Reset(data)
	if fd.dec == nil {
		fd.dec = msgpack.NewDecoder(&fd.r)
	} else {
		fd.dec.Reset(&fd.r)
	}
	d := fd.dec
	n, err := d.DecodeMapLen()
	if err != nil || n < 0 {
		return errors.New("not a map")
	}
	for range n {
		key, err := d.DecodeString()
		if err != nil {
			return err
		}
		switch key {
		case "t":
			f.t, err = decodeStr(d)
		case "code":
			f.code, err = decodeStr(d)
		case "from": // a user in `msg`, a seq in `resumed`
			f.from, err = decodeStr(d)
		case "body":
			f.body, err = decodeStr(d)
		case "rid":
			f.rid, f.hasRid, err = decodeInt(d)
		case "seq":
			f.seq, f.hasSeq, err = decodeInt(d)
		case "heartbeat":
			f.heartbeat, _, err = decodeInt(d)
		case "complete":
			var v any
			if v, err = d.DecodeInterfaceLoose(); err == nil {
				f.complete, f.hasComplete = v.(bool)
			}
		default:
			err = d.Skip()
		}
		if err != nil {
			return err
		}
	}
	if f.t == "" {
		return errors.New("no t")
	}
	return nil
}

// decodeStr reads a string, or skips anything else.
func decodeStr(d *msgpack.Decoder) (string, error) {
	c, err := d.PeekCode()
	if err != nil {
		return "", err
	}
	if msgpcode.IsString(c) {
		return d.DecodeString()
	}
	return "", d.Skip()
}

// decodeInt reads an integer, or skips anything else (a string rid is never the driver's).
func decodeInt(d *msgpack.Decoder) (int64, bool, error) {
	v, err := d.DecodeInterfaceLoose()
	switch x := v.(type) {
	case int64:
		return x, true, err
	case uint64:
		return int64(x), true, err
	}
	return 0, false, err
}

// encodeDM is worker.LoadWorker._act's frame with the connection's rid.
func encodeDM(buf *bytes.Buffer, enc *msgpack.Encoder, rid int64, to string, body []byte, cid []byte) []byte {
	buf.Reset()
	_ = enc.EncodeMapLen(5) // a Buffer cannot fail
	_ = enc.EncodeString("t")
	_ = enc.EncodeString("dm")
	_ = enc.EncodeString("to")
	_ = enc.EncodeString(to)
	_ = enc.EncodeString("body")
	_ = enc.EncodeString(string(body))
	_ = enc.EncodeString("cid")
	_ = enc.EncodeString(string(cid))
	_ = enc.EncodeString("rid")
	_ = enc.EncodeInt(rid)
	return bytes.Clone(buf.Bytes())
}

// --- setup ---------------------------------------------------------------------------------------

func (d *driver) token(client *http.Client, idx int) (string, error) {
	url := d.cfg.HTTPURLs[idx%len(d.cfg.HTTPURLs)] + "/v1/dev/token"
	body, _ := json.Marshal(map[string]string{"user": d.cfg.Users[idx]})
	resp, err := client.Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		return "", fmt.Errorf("%s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusForbidden || resp.StatusCode == http.StatusNotFound {
		return "", fmt.Errorf("%s answered %d: start the server with dev tokens enabled "+
			"(`peernet serve --dev-tokens`)", url, resp.StatusCode)
	}
	var tok struct{ Token string }
	if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&tok) != nil || tok.Token == "" {
		return "", fmt.Errorf("%s answered %s without a token", url, resp.Status)
	}
	return tok.Token, nil
}

// each runs f over the indices, at most `limit` at a time, and returns the first error.
func each(indices []int, limit int, f func(int) error) error {
	sem := make(chan struct{}, max(1, limit))
	var mu sync.Mutex
	var first error
	var wg sync.WaitGroup
	for _, i := range indices {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			if err := f(i); err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return first
}

func (d *driver) setup() error {
	cfg := d.cfg
	if len(cfg.HTTPURLs) == 0 || len(cfg.WSURLs) != len(cfg.HTTPURLs) {
		return errors.New("setup: no URLs")
	}
	d.conns = make([]*conn, len(cfg.Users))
	client := &http.Client{Timeout: 30 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: httpConcurrency}}
	tokens := make([]string, len(cfg.Users))
	err := each(cfg.Connect, httpConcurrency, func(i int) (err error) {
		tokens[i], err = d.token(client, i)
		return err
	})
	if err != nil {
		return err
	}
	for _, i := range cfg.Connect {
		d.conns[i] = &conn{d: d, idx: i, user: cfg.Users[i], token: tokens[i],
			wsURL: cfg.WSURLs[i%len(cfg.WSURLs)], wake: make(chan struct{}, 1), want: true,
			heartbeat: 25 * time.Second, seqs: map[int64]struct{}{}, nextRid: 1,
			pending: map[int64]*pending{}}
	}
	return each(cfg.Connect, cfg.ConnectConcurrency, func(i int) error {
		c := d.conns[i]
		ws, err := c.handshake()
		if err != nil {
			return err
		}
		c.connected(ws)
		go c.writeLoop()
		go c.readLoop(ws)
		return nil
	})
}

// --- the load ------------------------------------------------------------------------------------

// schedule sends each DM at its due time on its sender's connection, whatever became of the
// earlier ones (open loop), then reports once every one is acknowledged or failed.
func (d *driver) schedule(ph *phase) {
	cpu0 := cpuTime()
	var buf bytes.Buffer
	enc := msgpack.NewEncoder(&buf)
	var body, cid []byte
	k := 0
	for chunk := range ph.chunks {
		for i, at := range chunk.At {
			due := ph.t0 + at
			if wait := due - nowUs(); wait > 0 {
				time.Sleep(time.Duration(wait) * time.Microsecond) // never early
			}
			actor, target := int(chunk.Actor[i]), int(chunk.Target[i])
			now := nowUs()
			d.mu.Lock()
			ph.sent++
			ph.outstanding++
			ph.lagUs = append(ph.lagUs, max(1, now-due))
			d.mu.Unlock()
			c := d.conns[actor]
			if c == nil {
				d.failed(k, "not_connected")
				k++
				continue
			}
			body = appendBody(body[:0], d.cfg.Run, ph.n, k, due, d.cfg.Size)
			cid = fmt.Appendf(cid[:0], "%s-%d-%d", d.cfg.Run, ph.n, k)
			c.mu.Lock()
			rid := c.nextRid
			c.nextRid++
			p := &pending{rid: rid, k: k, data: encodeDM(&buf, enc, rid, d.cfg.Users[target], body, cid)}
			c.pending[rid] = p
			c.writeLocked(p)
			c.mu.Unlock()
			d.sweepMu.Lock()
			d.deadline = append(d.deadline, timeout{time.Now().Add(d.timeout), c, rid})
			d.sweepMu.Unlock()
			k++
		}
	}
	for {
		d.mu.Lock()
		left := ph.outstanding
		d.mu.Unlock()
		if left <= 0 {
			break
		}
		time.Sleep(pollEvery)
	}
	d.mu.Lock()
	sent := map[string]any{"op": "sent", "sent": ph.sent, "acked_k": ph.ackK, "acked_us": ph.ackUs,
		"failed_k": ph.failK, "failed_reason": ph.failReason, "lag_us": ph.lagUs}
	n := ph.sent
	d.mu.Unlock()
	// Its own CPU alone, beside the load generator's in the summary (which adds the coordinator).
	cpu, wall := cpuTime()-cpu0, time.Duration(nowUs()-ph.t0)*time.Microsecond
	fmt.Fprintf(os.Stderr, "dmdriver: phase %d: %d DMs sent and resolved in %.1f s; own CPU %.3f s "+
		"(%.1f%% of one core, %.3f ms per DM)\n", ph.n, n, wall.Seconds(), cpu.Seconds(),
		100*cpu.Seconds()/max(wall.Seconds(), 1e-9), cpu.Seconds()*1e3/float64(max(n, 1)))
	d.ctl.send(sent)
	// Then the deliveries still owed, until each acknowledged DM reached both participants or
	// the drain deadline passed.
	deadline := <-ph.expect
	for nowUs() < deadline {
		d.mu.Lock()
		done := ph.have >= ph.need
		d.mu.Unlock()
		if done {
			break
		}
		time.Sleep(pollEvery)
	}
	d.mu.Lock()
	d.ph = nil
	result := map[string]any{"op": "result", "recv_k": ph.recvK, "recv_idx": ph.recvIdx,
		"recv_seq": ph.recvSeq, "recv_us": ph.recvUs, "late": ph.late, "foreign": d.foreign,
		"stray": d.stray}
	d.mu.Unlock()
	gaps, stats := d.connStats()
	result["inbox_gaps"], result["stats"] = gaps, stats
	d.ctl.send(result)
}

// sweep fails the requests unanswered for --request-timeout, with bench/client.py's reasons.
func (d *driver) sweep() {
	for range time.Tick(sweepEvery) {
		now := time.Now()
		d.sweepMu.Lock()
		n := 0
		for n < len(d.deadline) && !d.deadline[n].at.After(now) {
			n++
		}
		due := d.deadline[:n:n]
		d.deadline = d.deadline[n:]
		d.sweepMu.Unlock()
		for _, t := range due {
			c := t.c
			c.mu.Lock()
			p := c.pending[t.rid]
			if p == nil {
				c.mu.Unlock()
				continue
			}
			delete(c.pending, t.rid)
			reason := "timeout"
			if p.attempts > 0 {
				reason = p.lastCode + "_until_timeout"
			} else if c.ws == nil {
				reason = disconnected
			}
			c.mu.Unlock()
			d.failed(p.k, reason)
		}
	}
}

// tick keeps the connections alive and reports progress, about once a second.
func (d *driver) tick() {
	for now := range time.Tick(tickEvery) {
		for _, c := range d.conns {
			if c != nil {
				c.keepalive(now)
			}
		}
		d.mu.Lock()
		ph := d.ph
		if ph == nil {
			d.mu.Unlock()
			continue
		}
		msg := map[string]any{"op": "progress", "sent": ph.sent, "acked": len(ph.ackK),
			"failed": len(ph.failK), "delivered": len(ph.first), "lat_us": ph.newLat}
		ph.newLat = nil
		d.mu.Unlock()
		d.ctl.send(msg)
	}
}

func (d *driver) connStats() (int, map[string]any) {
	var s connStats
	gaps := 0
	for _, c := range d.conns {
		if c == nil {
			continue
		}
		c.mu.Lock()
		cs := c.stats
		if len(c.seqs) > 0 {
			gaps += int(c.lastSeq) - len(c.seqs)
		}
		c.mu.Unlock()
		s.connects += cs.connects
		s.reconnects += cs.reconnects
		s.resent += cs.resent
		s.retried += cs.retried
		s.framesIn += cs.framesIn
		s.framesOut += cs.framesOut
		s.badFrames += cs.badFrames
		s.resumes += cs.resumes
		s.resumesIncomplete += cs.resumesIncomplete
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return gaps, map[string]any{
		"connects": s.connects, "reconnects": s.reconnects, "resent": s.resent, "retried": s.retried,
		"frames_in": s.framesIn, "frames_out": s.framesOut, "bad_frames": s.badFrames,
		"unknown_frames": 0, "resumes": s.resumes, "resumes_incomplete": s.resumesIncomplete,
		"errors": maps(d.errs), "close_codes": maps(d.closeCodes),
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func maps(m map[string]int) map[string]int {
	out := make(map[string]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func (d *driver) teardown() {
	var wg sync.WaitGroup
	for _, c := range d.conns {
		if c == nil {
			continue
		}
		c.mu.Lock()
		c.want = false
		ws := c.ws
		c.mu.Unlock()
		if ws != nil {
			wg.Go(func() {
				_ = ws.WriteControl(websocket.CloseMessage,
					websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
				ws.Close()
			})
		}
	}
	wg.Wait()
}

func run() error {
	// Few, larger collections: the driver's heap is small, and its CPU is what it is here to save.
	debug.SetGCPercent(400)
	d := &driver{ctl: &control{r: bufio.NewReaderSize(os.Stdin, 1<<20), w: bufio.NewWriterSize(os.Stdout, 1<<20)},
		errs: map[string]int{}, closeCodes: map[string]int{}, started: time.Now()}
	var err error
	if d.cfg, err = d.ctl.recv(); err != nil || d.cfg.Op != "setup" {
		return fmt.Errorf("expected a setup message first (this is a load process of `python -m bench "+
			"dm --driver go`, not a command to run by hand): %v", err)
	}
	d.timeout = time.Duration(d.cfg.RequestTimeout * float64(time.Second))
	if err := d.setup(); err != nil {
		d.ctl.send(map[string]any{"op": "failed", "error": err.Error()})
		d.teardown()
		return nil
	}
	online := 0
	for _, c := range d.conns {
		if c != nil {
			online++
		}
	}
	d.ctl.send(map[string]any{"op": "ready", "connections": online,
		"setup_s": math.Round(time.Since(d.started).Seconds()*1000) / 1000})
	go d.sweep()
	go d.tick()
	for {
		cmd, err := d.ctl.recv()
		if err != nil {
			d.teardown()
			return fmt.Errorf("control channel: %w", err)
		}
		switch cmd.Op {
		case "phase":
			ph := &phase{n: cmd.Phase, t0: cmd.T0, warmEnd: cmd.WarmEnd, chunks: make(chan command, 1<<16),
				expect: make(chan int64, 1), first: map[uint64]struct{}{}}
			d.mu.Lock()
			d.ph = ph
			d.mu.Unlock()
			go d.schedule(ph)
		case "events":
			d.mu.Lock()
			ph := d.ph
			d.mu.Unlock()
			if ph != nil {
				ph.chunks <- cmd
			}
		case "events_end":
			d.mu.Lock()
			ph := d.ph
			d.mu.Unlock()
			if ph != nil {
				close(ph.chunks)
			}
		case "expect":
			d.mu.Lock()
			ph := d.ph
			d.mu.Unlock()
			if ph != nil {
				ph.expect <- cmd.Deadline
			}
		default: // stop
			d.teardown()
			d.ctl.send(map[string]any{"op": "bye"})
			return nil
		}
	}
}

func main() {
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: dmdriver (started by `python -m bench dm --driver go`; it reads "+
			"its orders on stdin)")
		os.Exit(2)
	}
	// A CPU profile of the whole run, for whoever works on the driver's own cost.
	if path := os.Getenv("DMDRIVER_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil && pprof.StartCPUProfile(f) == nil {
			defer pprof.StopCPUProfile()
		}
	}
	if err := run(); err != nil {
		pprof.StopCPUProfile()
		fatal(err)
	}
}
