// Command feedprobe is bench/feed_probe.py's open-loop home-feed read load (--via ws) in Go, so
// that the probe's own CPU stays small beside the server it measures on the same machine. It
// reuses the readers fr<tag>_<n> that `python -m bench.feed_probe --run-tag TAG` set up.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorilla/websocket"
	"github.com/vmihailenco/msgpack/v5"
)

const (
	lead           = 200 * time.Millisecond // from the setup's end to the first due read
	progressEvery  = 5 * time.Second
	serverRatePerS = 200 // the server's default frames per second per connection
	// bench/feed_probe.py's MARKDOWN_HEADER: the rows of both probes share a table.
	markdownHeader = "| via | readers | rate/s | achieved/s | count | errors | p50 ms | p90 ms | p99 ms " +
		"| p99.9 ms | max ms | mean ms | send lag p99 ms |\n" +
		"|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)

type params struct {
	url, runTag, jsonPath           string
	readers, limit                  int
	rate, duration, warmup, timeout float64
}

// Read j is due at t0 + j/rate on reader j % readers, as in feed_probe.Schedule; reads due in
// the first --warmup seconds are sent and accounted but not timed.
func ceil(x float64) int                 { return int(math.Ceil(x - 1e-9)) } // 1000 * 0.3 is 300
func (p params) total() int              { return ceil(p.rate * (p.warmup + p.duration)) }
func (p params) measured(j int) bool     { return j >= ceil(p.rate*p.warmup) }
func (p params) due(j int) time.Duration { return time.Duration(math.Round(float64(j) * 1e9 / p.rate)) }
func seconds(s float64) time.Duration    { return time.Duration(s * 1e9) }

func parseFlags(args []string) (params, error) {
	var p params
	fs := flag.NewFlagSet("feedprobe", flag.ContinueOnError)
	fs.StringVar(&p.url, "url", "http://127.0.0.1:8000", "the PeerNet (with dev tokens)")
	fs.StringVar(&p.runTag, "run-tag", "", "the tag of the readers bench.feed_probe set up (required)")
	fs.IntVar(&p.readers, "readers", 100, "readers fr<tag>_0 .. fr<tag>_<readers-1>")
	fs.Float64Var(&p.rate, "rate", 0, "reads per second in total (required)")
	fs.Float64Var(&p.duration, "duration", 20, "measured seconds")
	fs.Float64Var(&p.warmup, "warmup", 3, "seconds of reads first, accounted but not timed")
	fs.Float64Var(&p.timeout, "timeout", 10, "seconds after the last due read to wait for replies")
	fs.IntVar(&p.limit, "limit", 0, "page size to ask for (0: none sent, the server's 20)")
	fs.StringVar(&p.jsonPath, "json", "", "also write the figures as JSON to this path")
	if err := fs.Parse(args); err != nil {
		return p, err // the flag package has printed it, with the usage
	}
	var problems []string
	if fs.NArg() > 0 {
		problems = append(problems, fmt.Sprintf("unexpected arguments %q", fs.Args()))
	}
	if !regexp.MustCompile(`^[a-z0-9]{1,12}$`).MatchString(p.runTag) {
		problems = append(problems, "--run-tag is required: at most 12 lowercase letters or digits")
	}
	if p.readers < 1 || p.rate <= 0 || p.duration <= 0 || p.warmup < 0 || p.timeout <= 0 {
		problems = append(problems, "--readers, --rate, --duration and --timeout must be positive, "+
			"--warmup not negative")
	}
	if p.limit < 0 || p.limit > 100 {
		problems = append(problems, "--limit must be from 1 to 100 (0: not sent)")
	}
	if len(problems) > 0 {
		err := errors.New(strings.Join(problems, "; "))
		fmt.Fprintf(fs.Output(), "feedprobe: %v\n", err)
		fs.Usage()
		return p, err
	}
	return p, nil
}

// ledger concludes every read exactly once, answered or failed; times are since t0.
type ledger struct {
	p                          params
	mu                         sync.Mutex
	open                       []bool
	latencies, lags, recent    []time.Duration
	sent, inFlight, left       int
	ok, warmupOK, late, failed int
	errs, warmupErrs           map[string]int
	lastArrival                time.Duration
	done                       chan struct{} // closed once every read is concluded
}

func (l *ledger) dispatch(j int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.open[j] = true
	l.inFlight++
}

func (l *ledger) markSent(j int, at time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sent++
	if l.p.measured(j) {
		l.lags = append(l.lags, at-l.p.due(j))
	}
}

// conclude ends read j (false when it had ended, or never began: a late or stray reply).
func (l *ledger) conclude(j int) bool {
	if j < 0 || j >= len(l.open) || !l.open[j] {
		return false
	}
	l.open[j] = false
	l.inFlight--
	if l.left--; l.left == 0 {
		close(l.done)
	}
	return true
}

func (l *ledger) answered(j int, at time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.conclude(j) {
		l.late++
		return
	}
	l.recent = append(l.recent, at-l.p.due(j))
	if !l.p.measured(j) {
		l.warmupOK++
		return
	}
	l.ok++
	l.latencies = append(l.latencies, at-l.p.due(j))
	l.lastArrival = max(l.lastArrival, at)
}

// fail ends reads with the reason; a read that had ended is left as it was.
func (l *ledger) fail(reason string, reads ...int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, j := range reads {
		if !l.conclude(j) {
			continue
		}
		l.failed++
		if l.p.measured(j) {
			l.errs[reason]++
		} else {
			l.warmupErrs[reason]++
		}
	}
}

func (l *ledger) progress(elapsed time.Duration) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	recent := summarize(l.recent)
	l.recent = l.recent[:0]
	return fmt.Sprintf("feedprobe %5.1fs: sent %d/%d, answered %d, errors %d, in flight %d, p99 %.2f ms "+
		"over the last %d replies, send lag p99 %.2f ms", elapsed.Seconds(), l.sent, len(l.open),
		l.ok+l.warmupOK, l.failed, l.inFlight, recent.P99, recent.Count, summarize(l.lags).P99)
}

type stats struct {
	Count int     `json:"count"`
	P50   float64 `json:"p50"`
	P90   float64 `json:"p90"`
	P99   float64 `json:"p99"`
	P999  float64 `json:"p99_9"`
	Max   float64 `json:"max"`
	Mean  float64 `json:"mean"`
}

// summarize gives exact nearest-rank percentiles, in milliseconds.
func summarize(d []time.Duration) (s stats) {
	if s.Count = len(d); s.Count == 0 {
		return s
	}
	d = slices.Sorted(slices.Values(d))
	ms := func(x time.Duration) float64 { return float64(x) / 1e6 }
	at := func(p float64) float64 { return ms(d[max(0, int(math.Ceil(p/100*float64(len(d))))-1)]) }
	var sum time.Duration
	for _, x := range d {
		sum += x
	}
	s.P50, s.P90, s.P99, s.P999 = at(50), at(90), at(99), at(99.9)
	s.Max, s.Mean = ms(d[len(d)-1]), ms(sum)/float64(len(d))
	return s
}

// frame is what the probe reads of a server frame: the page's items are skipped unread.
type frame struct {
	T       string `msgpack:"t"`
	Rid     *int64 `msgpack:"rid"` // nil on pushes; the probe's own rids are ints
	Code    string `msgpack:"code"`
	Message string `msgpack:"message"`
}

type feedRequest struct {
	T     string `msgpack:"t"`
	Rid   int    `msgpack:"rid"`
	Limit int    `msgpack:"limit,omitempty"`
}

// conn is one reader's WebSocket past its welcome. Its own goroutine writes the reads it is
// handed, so that a slow socket delays that writer and never the schedule.
type conn struct {
	idx   int
	ws    *websocket.Conn
	sends chan int
	dead  atomic.Bool
	wrote sync.WaitGroup
}

func (c *conn) write(l *ledger, since func() time.Duration) {
	defer c.wrote.Done()
	var buf bytes.Buffer
	enc := msgpack.NewEncoder(&buf)
	for j := range c.sends {
		buf.Reset()
		_ = enc.Encode(feedRequest{T: "feed", Rid: j, Limit: l.p.limit}) // a Buffer cannot fail
		l.markSent(j, since())
		if err := c.ws.WriteMessage(websocket.BinaryMessage, buf.Bytes()); err != nil {
			l.fail("connection_lost", j)
		}
	}
}

func (c *conn) read(l *ledger, since func() time.Duration) {
	for {
		_, data, err := c.ws.ReadMessage()
		if err != nil {
			// dead first: a read dispatched after the sweep below sees it and fails itself.
			c.dead.Store(true)
			var mine []int
			for j := c.idx; j < len(l.open); j += l.p.readers {
				mine = append(mine, j)
			}
			l.fail("connection_lost", mine...)
			return
		}
		at := since()
		var f frame
		if msgpack.Unmarshal(data, &f) != nil || f.Rid == nil {
			continue // not a reply to a read (a feed push, a note)
		}
		switch f.T {
		case "feed_page":
			l.answered(int(*f.Rid), at)
		case "error":
			l.fail(f.Code, int(*f.Rid))
		default:
			l.fail("unexpected_"+f.T, int(*f.Rid))
		}
	}
}

func connect(client *http.Client, url, user string, timeout time.Duration) (*websocket.Conn, error) {
	body, _ := json.Marshal(map[string]string{"user": user})
	resp, err := client.Post(url+"/v1/dev/token", "application/json", bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("cannot reach %s: %w", url, err)
	}
	defer resp.Body.Close()
	var tok struct{ Token string }
	if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&tok) != nil || tok.Token == "" {
		return nil, fmt.Errorf("POST /v1/dev/token: %s (is the server running with dev tokens?)", resp.Status)
	}
	wsURL := strings.Replace(url, "http", "ws", 1) + "/v1/ws"
	ws, _, err := (&websocket.Dialer{HandshakeTimeout: timeout}).Dial(wsURL, nil)
	if err != nil {
		return nil, fmt.Errorf("cannot connect to %s: %w", wsURL, err)
	}
	hello, _ := msgpack.Marshal(map[string]string{"t": "hello", "token": tok.Token})
	_ = ws.SetReadDeadline(time.Now().Add(timeout))
	err = ws.WriteMessage(websocket.BinaryMessage, hello)
	for err == nil {
		var data []byte
		var f frame
		if _, data, err = ws.ReadMessage(); err == nil && msgpack.Unmarshal(data, &f) == nil {
			if f.T == "welcome" {
				return ws, ws.SetReadDeadline(time.Time{})
			}
			if f.T == "error" {
				err = fmt.Errorf("refused: %s: %s", f.Code, f.Message)
			}
		}
	}
	ws.Close()
	return nil, fmt.Errorf("hello: %w", err)
}

// setup opens every reader's connection, 16 at a time; all of them, or none.
func setup(p params) ([]*conn, error) {
	url, timeout := strings.TrimRight(p.url, "/"), seconds(p.timeout)
	client := &http.Client{Timeout: timeout}
	conns, errs := make([]*conn, p.readers), make([]error, p.readers)
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	for i := range conns {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			user := fmt.Sprintf("fr%s_%d", p.runTag, i)
			ws, err := connect(client, url, user, timeout)
			if err != nil {
				errs[i] = fmt.Errorf("%s: %w", user, err)
				return
			}
			// Room for all of the reader's reads: handing one over never blocks the schedule.
			conns[i] = &conn{idx: i, ws: ws, sends: make(chan int, p.total()/p.readers+1)}
		})
	}
	wg.Wait()
	failed := slices.DeleteFunc(errs, func(err error) bool { return err == nil })
	if len(failed) == 0 {
		return conns, nil
	}
	for _, c := range conns {
		if c != nil {
			c.ws.Close()
		}
	}
	return nil, fmt.Errorf("%d of %d readers, e.g. %w", len(failed), p.readers, failed[0])
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

type result struct {
	Via          string         `json:"via"`
	RunTag       string         `json:"run_tag"`
	Readers      int            `json:"readers"`
	OfferedRate  float64        `json:"offered_rate"`
	AchievedRate float64        `json:"achieved_rate"`
	Scheduled    int            `json:"scheduled"`
	Sent         int            `json:"sent"`
	Errors       int            `json:"errors"`
	Failed       int            `json:"failed"` // measured and warm-up
	ByReason     map[string]int `json:"errors_by_reason"`
	WarmupErrors map[string]int `json:"warmup_errors_by_reason"`
	LateReplies  int            `json:"late_replies"`
	Latency      stats          `json:"latency_ms"`
	SendLag      stats          `json:"send_lag_ms"`
	CPUPercent   float64        `json:"generator_cpu_percent"` // of one core, over the load
	Markdown     string         `json:"markdown"`
	Command      []string       `json:"command"`
}

// load sends each read at its due time, whatever became of the earlier ones, then waits up
// to --timeout for the replies still due.
func load(p params, conns []*conn) result {
	l := &ledger{p: p, open: make([]bool, p.total()), left: p.total(), errs: map[string]int{},
		warmupErrs: map[string]int{}, done: make(chan struct{})}
	t0 := time.Now().Add(lead)
	since := func() time.Duration { return time.Since(t0) }
	for _, c := range conns {
		c.wrote.Add(1)
		go c.write(l, since)
		go c.read(l, since)
	}
	cpu0, wall0 := cpuTime(), time.Now()
	stop := make(chan struct{})
	go func() {
		time.Sleep(time.Until(t0))
		tick := time.NewTicker(progressEvery)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				fmt.Fprintln(os.Stderr, l.progress(since()))
			}
		}
	}()
	for j := range p.total() {
		if wait := p.due(j) - since(); wait > 0 {
			time.Sleep(wait) // never returns early: no read is sent before it is due
		}
		c := conns[j%p.readers]
		l.dispatch(j)
		if c.dead.Load() {
			l.fail("connection_lost", j)
		} else {
			c.sends <- j
		}
	}
	select {
	case <-l.done:
	case <-time.After(seconds(p.timeout)):
		all := make([]int, p.total())
		for j := range all {
			all[j] = j
		}
		l.fail("timeout", all...) // the answered ones are left as they were
	}
	cpu, wall := cpuTime()-cpu0, time.Since(wall0)
	close(stop)
	for _, c := range conns {
		close(c.sends)
		c.wrote.Wait()
		_ = c.ws.WriteControl(websocket.CloseMessage,
			websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
		c.ws.Close()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	r := result{Via: "ws-go", RunTag: p.runTag, Readers: p.readers, OfferedRate: p.rate,
		Scheduled: p.total(), Sent: l.sent, Failed: l.failed, ByReason: l.errs, WarmupErrors: l.warmupErrs,
		LateReplies: l.late, Latency: summarize(l.latencies), SendLag: summarize(l.lags),
		CPUPercent: math.Round(1000*cpu.Seconds()/wall.Seconds()) / 10}
	for _, n := range l.errs {
		r.Errors += n
	}
	// As feed_probe: measured reads answered per second over the measured window, stretched to
	// the last measured reply when that came later.
	if start, end := seconds(p.warmup), max(seconds(p.warmup+p.duration), l.lastArrival); l.ok > 0 {
		r.AchievedRate = float64(l.ok) / (end - start).Seconds()
	}
	lat := r.Latency
	r.Markdown = fmt.Sprintf("| %s | %d | %s | %.1f | %d | %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |",
		r.Via, r.Readers, strconv.FormatFloat(p.rate, 'g', -1, 64), r.AchievedRate, lat.Count, r.Errors,
		lat.P50, lat.P90, lat.P99, lat.P999, lat.Max, lat.Mean, r.SendLag.P99)
	return r
}

func run(args []string) int {
	p, err := parseFlags(args)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	} else if err != nil {
		return 2
	}
	if perReader := p.rate / float64(p.readers); perReader > 0.75*serverRatePerS {
		fmt.Fprintf(os.Stderr, "feedprobe: WARNING %.0f reads/s per reader's WebSocket is near or over "+
			"the server's %d frames/s per connection: add --readers\n", perReader, serverRatePerS)
	}
	conns, err := setup(p)
	if err != nil {
		fmt.Fprintf(os.Stderr, "feedprobe: setup failed: %v\n", err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "feedprobe: %d reads at %g/s over %d readers (%g s warm-up, %g s measured)\n",
		p.total(), p.rate, p.readers, p.warmup, p.duration)
	r := load(p, conns)
	r.Command = append([]string{"feedprobe"}, args...)
	fmt.Fprintln(os.Stderr, markdownHeader)
	fmt.Println(r.Markdown)
	reasons := func(m map[string]int) []byte { b, _ := json.Marshal(m); return b }
	fmt.Fprintf(os.Stderr, "feedprobe: own CPU %.1f%% of one core over the load; failures by reason: "+
		"%s (warm-up: %s); %d late replies\n", r.CPUPercent, reasons(r.ByReason), reasons(r.WarmupErrors),
		r.LateReplies)
	if p.jsonPath != "" {
		data, _ := json.MarshalIndent(r, "", "  ")
		if err := os.WriteFile(p.jsonPath, append(data, '\n'), 0o644); err != nil {
			fmt.Fprintf(os.Stderr, "feedprobe: %v\n", err)
			return 1
		}
	}
	if r.Failed > 0 {
		fmt.Fprintf(os.Stderr, "feedprobe: %d reads FAILED\n", r.Failed)
		return 1
	}
	return 0
}

func main() { os.Exit(run(os.Args[1:])) }
