//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
	"golang.org/x/sys/unix"
)

// mode is a load mode.
type mode int

const (
	keepalive   mode = iota // persistent connections, requests back to back
	clientClose             // a connection per request, the client closes first
	serverClose             // a connection per request, Connection: close: the server closes first
)

var modeNames = []string{"keepalive", "client-close", "server-close"}

func (m mode) String() string { return modeNames[m] }

const (
	// opTimeout bounds every connect and every request: a cell never
	// waits longer than this for a straggler.
	opTimeout = 3 * time.Second
	// slowConnect is a connect that needed a SYN retransmission (the
	// first one comes after 1s).
	slowConnect = 900 * time.Millisecond
	// maxSamples per goroutine; beyond, latencies are reservoir-sampled.
	maxSamples = 1 << 15
)

var (
	reqKeep  = []byte("GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
	reqClose = []byte("GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
)

// flow is one source address and the destination it connects to.
type flow struct {
	src *net.TCPAddr
	dst string
}

// cellResult is one cell of one round.
type cellResult struct {
	ops        int // requests (keepalive) or connections completed in the window
	rate       float64
	p50, p99   time.Duration
	errs, slow int
	ctPeak     int
	remapped   int // conntrack entries with a NAT-rewritten client port, after the cell
	firstErr   error
}

// worker state, one per load goroutine.
type loadStats struct {
	ops, errs, slow int
	seen            int
	lat             []time.Duration
	rng             *rand.Rand
	firstErr        error
}

func (s *loadStats) record(d time.Duration) {
	s.ops++
	s.seen++
	if len(s.lat) < maxSamples {
		s.lat = append(s.lat, d)
		return
	}
	if i := s.rng.IntN(s.seen); i < maxSamples {
		s.lat[i] = d
	}
}

func (s *loadStats) fail(err error) {
	s.errs++
	if s.firstErr == nil {
		s.firstErr = err
	}
}

// runCell runs conc goroutines of load for dur and returns what they saw.
// Each goroutine runs on a thread switched into the client namespace for
// the whole cell (netlab's Do), so every socket it creates belongs to the
// client namespace without a namespace switch per connection.
func runCell(ctx context.Context, client *netlab.NS, m mode, flows []flow, conc int, dur time.Duration, ct *conntrack) cellResult {
	stats := make([]*loadStats, conc)
	start := time.Now()
	end := start.Add(dur)
	stopSampling := make(chan struct{})
	peak := make(chan int, 1)
	go func() {
		p := 0
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			p = max(p, ct.read())
			select {
			case <-stopSampling:
				peak <- max(p, ct.read())
				return
			case <-t.C:
			}
		}
	}()
	var wg sync.WaitGroup
	for g := range conc {
		s := &loadStats{rng: rand.New(rand.NewPCG(uint64(g), uint64(start.UnixNano())))}
		stats[g] = s
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := client.Do(func() error { loadLoop(ctx, m, flows, g, conc, end, s); return nil }); err != nil {
				s.fail(err)
			}
		}()
	}
	wg.Wait()
	close(stopSampling)
	r := cellResult{ctPeak: <-peak}
	var lat []time.Duration
	for _, s := range stats {
		r.ops += s.ops
		r.errs += s.errs
		r.slow += s.slow
		lat = append(lat, s.lat...)
		if r.firstErr == nil {
			r.firstErr = s.firstErr
		}
	}
	r.rate = float64(r.ops) / dur.Seconds()
	slices.Sort(lat)
	if n := len(lat); n > 0 {
		r.p50 = lat[n/2]
		r.p99 = lat[min(n-1, n*99/100)]
	}
	return r
}

// dialer connects from src. IP_BIND_ADDRESS_NO_PORT defers the choice of
// the local port from bind to connect, where the kernel picks it for the
// whole 4-tuple and may reuse a TIME_WAIT port (tcp_tw_reuse). Without it,
// bind picks a port that is free for every destination and skips those in
// TIME_WAIT, so a single source address runs out of ports after ~60k
// client-closed connections, whatever the path.
func dialer(src *net.TCPAddr) *net.Dialer {
	return &net.Dialer{
		Timeout:   opTimeout,
		LocalAddr: src,
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
			}); err != nil {
				return err
			}
			return serr
		},
	}
}

// loadLoop is one load goroutine. Goroutine g uses flows g, g+conc,
// g+2·conc, ... in turn (keepalive: flow g only, on one connection).
// Only operations completed by end count; all are bounded by opTimeout.
func loadLoop(ctx context.Context, m mode, flows []flow, g, conc int, end time.Time, s *loadStats) {
	dialers := make([]*net.Dialer, len(flows))
	for i, f := range flows {
		dialers[i] = dialer(f.src)
	}
	br := bufio.NewReaderSize(nil, 1024)
	if m == keepalive {
		f := g % len(flows)
		var c net.Conn
		defer func() {
			if c != nil {
				c.Close()
			}
		}()
		for time.Now().Before(end) && ctx.Err() == nil {
			if c == nil {
				t0 := time.Now()
				var err error
				c, err = dialers[f].DialContext(ctx, "tcp4", flows[f].dst)
				if time.Since(t0) >= slowConnect {
					s.slow++
				}
				if err != nil {
					s.fail(fmt.Errorf("connect %s → %s: %w", flows[f].src, flows[f].dst, err))
					c = nil
					continue
				}
				br.Reset(c)
			}
			t0 := time.Now()
			_ = c.SetDeadline(t0.Add(opTimeout))
			err := roundTrip(c, br, reqKeep)
			if err != nil {
				s.fail(fmt.Errorf("request %s → %s: %w", flows[f].src, flows[f].dst, err))
				c.Close()
				c = nil
				continue
			}
			if t1 := time.Now(); !t1.After(end) {
				s.record(t1.Sub(t0))
			}
		}
		return
	}
	req := reqKeep
	if m == serverClose {
		req = reqClose
	}
	for k := 0; time.Now().Before(end) && ctx.Err() == nil; k++ {
		f := (g + k*conc) % len(flows)
		t0 := time.Now()
		c, err := dialers[f].DialContext(ctx, "tcp4", flows[f].dst)
		if time.Since(t0) >= slowConnect {
			s.slow++
		}
		if err != nil {
			s.fail(fmt.Errorf("connect %s → %s: %w", flows[f].src, flows[f].dst, err))
			continue
		}
		_ = c.SetDeadline(t0.Add(opTimeout))
		br.Reset(c)
		err = roundTrip(c, br, req)
		if err == nil && m == serverClose {
			// Wait for the server's FIN, so the server is the one that
			// closed first and holds the TIME_WAIT.
			err = expectEOF(br)
		}
		c.Close()
		if err != nil {
			s.fail(fmt.Errorf("request %s → %s: %w", flows[f].src, flows[f].dst, err))
			continue
		}
		if t1 := time.Now(); !t1.After(end) {
			s.record(t1.Sub(t0))
		}
	}
}

// roundTrip writes one request and reads its whole response.
func roundTrip(c net.Conn, br *bufio.Reader, req []byte) error {
	if _, err := c.Write(req); err != nil {
		return err
	}
	_, err := readResponse(br)
	return err
}

var (
	errBadResponse = errors.New("malformed HTTP response")
	clHeader       = []byte("content-length:")
)

// readResponse reads one HTTP/1.1 200 response with a Content-Length and
// returns its body. Minimal on purpose: the bench's own server is the only
// peer.
func readResponse(br *bufio.Reader) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		return nil, err
	}
	if !bytes.HasPrefix(line, []byte("HTTP/1.1 200 ")) {
		return nil, fmt.Errorf("%w: status %q", errBadResponse, bytes.TrimSpace(line))
	}
	clen := -1
	for {
		line, err = br.ReadSlice('\n')
		if err != nil {
			return nil, err
		}
		if len(line) <= 2 { // "\r\n": end of the header
			break
		}
		if len(line) > len(clHeader) && bytes.EqualFold(line[:len(clHeader)], clHeader) {
			if clen, err = strconv.Atoi(string(bytes.TrimSpace(line[len(clHeader):]))); err != nil {
				return nil, fmt.Errorf("%w: %q", errBadResponse, bytes.TrimSpace(line))
			}
		}
	}
	if clen < 0 || clen > 4096 {
		return nil, fmt.Errorf("%w: content length %d", errBadResponse, clen)
	}
	body := make([]byte, clen)
	_, err = io.ReadFull(br, body)
	return body, err
}

// expectEOF reads until the peer closes.
func expectEOF(br *bufio.Reader) error {
	var b [64]byte
	for {
		n, err := br.Read(b[:])
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if n > 0 {
			return fmt.Errorf("%w: %d bytes after the response", errBadResponse, n)
		}
	}
}

// probe makes one request from src to dst and returns the body.
func probe(ctx context.Context, lab *netlab.Lab, src netip.Addr, dst netip.AddrPort) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	c, err := lab.Client.Dial(ctx, "tcp4", src, dst)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(opTimeout))
	if _, err := c.Write(reqClose); err != nil {
		return "", err
	}
	body, err := readResponse(bufio.NewReader(c))
	return string(body), err
}
