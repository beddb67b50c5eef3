//go:build linux

package ipcluster_test

// The test binary doubles as master and worker: TestMain runs a cluster
// instead of the tests when IPCLUSTER_TEST_CLUSTER carries a spec. The
// master is started inside a lab's server namespace, and its workers (the
// same binary, re-executed by the master) inherit both the namespace and the
// spec.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster"
)

const envSpec = "IPCLUSTER_TEST_CLUSTER"

// spec is what a test asks the helper process to run.
type spec struct {
	Config   specConfig
	Scenario string // worker behaviour: "echo"
	// SkipConntrackCleanup makes the master leave conntrack alone, for the
	// test that shows what the cleanup is for.
	SkipConntrackCleanup bool
	// SlotScenarios overrides Scenario for some slots.
	SlotScenarios map[int]string
	// StatsLog, if set, is a file the master appends each EventStats to,
	// one JSON object a line.
	StatsLog string
	// Netns is the inode of the namespace the helper must find itself in.
	// It refuses to run anywhere else, so a broken lab can never write
	// rules into the machine's own namespace.
	Netns uint64
}

// specConfig is the JSON-able part of ipcluster.Config.
type specConfig struct {
	Name           string
	Workers        int
	Ports          []uint16 // TCP
	UDPPorts       []uint16
	Addr           string
	IPv4SlotPrefix int
	IPv6SlotPrefix int
	RunDir         string
	StopTimeout    time.Duration
	ConnectTimeout time.Duration
	Backend        string

	HeartbeatInterval time.Duration
	MonitorInterval   time.Duration

	// Health policies, as in ipcluster.Config.
	MemoryLimit         int64
	LagLimit            time.Duration
	StartupGrace        time.Duration
	PingTimeout         time.Duration
	RetireLimit         int
	RetireWindow        time.Duration
	DrainTimeout        time.Duration
	MemoryBudget        int64
	MemoryLowWatermark  float64
	MemoryHighWatermark float64
	RetiredNice         int
	Spares              int
}

func (s specConfig) config() ipcluster.Config {
	c := ipcluster.Config{
		Name:           s.Name,
		Workers:        s.Workers,
		IPv4SlotPrefix: s.IPv4SlotPrefix,
		IPv6SlotPrefix: s.IPv6SlotPrefix,
		RunDir:         s.RunDir,
		StopTimeout:    s.StopTimeout,
		ConnectTimeout: s.ConnectTimeout,
		Backend:        ipcluster.Backend(s.Backend),

		HeartbeatInterval: s.HeartbeatInterval,
		MonitorInterval:   s.MonitorInterval,

		MemoryLimit:         s.MemoryLimit,
		LagLimit:            s.LagLimit,
		StartupGrace:        s.StartupGrace,
		PingTimeout:         s.PingTimeout,
		RetireLimit:         s.RetireLimit,
		RetireWindow:        s.RetireWindow,
		DrainTimeout:        s.DrainTimeout,
		MemoryBudget:        s.MemoryBudget,
		MemoryLowWatermark:  s.MemoryLowWatermark,
		MemoryHighWatermark: s.MemoryHighWatermark,
		RetiredNice:         s.RetiredNice,
		Spares:              s.Spares,
		Logger:              slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	for _, p := range s.Ports {
		c.Ports = append(c.Ports, ipcluster.Port{Public: p})
	}
	for _, p := range s.UDPPorts {
		c.Ports = append(c.Ports, ipcluster.Port{Public: p, Proto: ipcluster.UDP})
	}
	if s.Addr != "" {
		c.Addr = netip.MustParseAddr(s.Addr)
	}
	return c
}

func TestMain(m *testing.M) {
	if s := os.Getenv(envSpec); s != "" {
		os.Exit(helperMain(s))
	}
	os.Exit(m.Run())
}

func helperMain(raw string) int {
	var s spec
	if err := json.Unmarshal([]byte(raw), &s); err != nil {
		fmt.Fprintf(os.Stderr, "helper: bad %s: %v\n", envSpec, err)
		return 2
	}
	var st syscall.Stat_t
	if err := syscall.Stat("/proc/self/ns/net", &st); err != nil || st.Ino != s.Netns {
		fmt.Fprintf(os.Stderr, "helper: refusing to run outside the test namespace (inode %d, want %d, err %v)\n", st.Ino, s.Netns, err)
		return 3
	}
	scenarios := map[string]func(*ipcluster.Worker) error{
		"echo": echoWorker,
		// linger: like echo, but a connection outlives the worker's
		// context, as a server finishing its clients' sessions would.
		"linger": func(w *ipcluster.Worker) error { return serveListeners(w, serveLingering) },
		// ballast: echo, holding 64 MiB of touched memory.
		"ballast": ballastWorker,
		// busy: echo, on one P kept busy by spinning goroutines.
		"busy": busyWorker,
	}
	for _, name := range append([]string{s.Scenario}, slices.Collect(maps.Values(s.SlotScenarios))...) {
		if scenarios[name] == nil {
			fmt.Fprintf(os.Stderr, "helper: unknown scenario %q\n", name)
			return 2
		}
	}
	work := func(w *ipcluster.Worker) error {
		if name, ok := s.SlotScenarios[w.Slot()]; ok {
			return scenarios[name](w)
		}
		return scenarios[s.Scenario](w)
	}
	if s.SkipConntrackCleanup {
		ipcluster.SkipConntrackCleanup()
	}
	cfg := s.Config.config()
	if s.StatsLog != "" && !ipcluster.IsWorker() {
		f, err := os.OpenFile(s.StatsLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			fmt.Fprintf(os.Stderr, "helper: %v\n", err)
			return 2
		}
		defer f.Close()
		enc := json.NewEncoder(f)
		cfg.OnEvent = func(ev ipcluster.Event) {
			if es, ok := ev.(ipcluster.EventStats); ok {
				_ = enc.Encode(es)
			}
		}
	}
	if err := ipcluster.Run(context.Background(), cfg, work); err != nil {
		fmt.Fprintf(os.Stderr, "helper: %v\n", err)
		return 1
	}
	return 0
}

// ballast keeps the ballast worker's memory reachable.
var ballast []byte

// ballastWorker touches every page of 64 MiB, so that it is resident, and
// serves as echo.
func ballastWorker(w *ipcluster.Worker) error {
	ballast = make([]byte, 64<<20)
	for i := 0; i < len(ballast); i += 4096 {
		ballast[i] = 1
	}
	return echoWorker(w)
}

// busyWorker runs on one P with four goroutines spinning on it, as a
// worker with a CPU-bound bug would, and serves as echo.
func busyWorker(w *ipcluster.Worker) error {
	runtime.GOMAXPROCS(1)
	for range 4 {
		go func() {
			n := 0
			for w.Context().Err() == nil {
				for range 1 << 16 {
					n++
				}
			}
			_ = n
		}()
	}
	return echoWorker(w)
}

// echoWorker answers each connection with one line naming the worker and the
// client address it sees, and every line it reads with the same line. On a
// UDP port it answers each datagram with that line followed by " seq=" and
// the datagram's text.
func echoWorker(w *ipcluster.Worker) error { return serveListeners(w, serveEcho) }

// serveListeners serves every port of w, each TCP connection with serve,
// until the worker must finish.
func serveListeners(w *ipcluster.Worker, serve func(*ipcluster.Worker, net.Conn)) error {
	errs := make(chan error, len(w.Ports()))
	for _, p := range w.Ports() {
		if p.Proto == ipcluster.UDP {
			go func() { errs <- serveEchoUDP(w, w.PacketConn(p.Public)) }()
			continue
		}
		ln := w.Listener(p.Public)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					errs <- err
					return
				}
				go serve(w, c)
			}
		}()
	}
	select {
	case <-w.Context().Done():
		return nil
	case <-w.Retired():
		return nil
	case err := <-errs:
		if w.Context().Err() != nil {
			return nil
		}
		return err
	}
}

// serveEchoUDP answers datagrams until the socket closes: when the worker,
// retired, has had no datagram for a while, or is told to finish.
func serveEchoUDP(w *ipcluster.Worker, pc net.PacketConn) error {
	buf := make([]byte, 512)
	for {
		n, addr, err := pc.ReadFrom(buf)
		if err != nil {
			return err
		}
		line := fmt.Sprintf("slot=%d pid=%d gen=%d remote=%s seq=%s\n", w.Slot(), os.Getpid(), w.Generation(), addr,
			strings.TrimSpace(string(buf[:n])))
		if _, err := pc.WriteTo([]byte(line), addr); err != nil {
			return err
		}
	}
}

func serveEcho(w *ipcluster.Worker, c net.Conn) {
	go func() {
		<-w.Context().Done()
		c.Close()
	}()
	serveLingering(w, c)
}

func serveLingering(w *ipcluster.Worker, c net.Conn) {
	defer c.Close()
	line := fmt.Sprintf("slot=%d pid=%d gen=%d remote=%s\n", w.Slot(), os.Getpid(), w.Generation(), c.RemoteAddr())
	if _, err := io.WriteString(c, line); err != nil {
		return
	}
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		if _, err := io.WriteString(c, line); err != nil {
			return
		}
	}
}

// reply is an echo worker's line.
type reply struct {
	Slot, PID, Gen int
	Remote         netip.AddrPort
}

func parseReply(line string) (reply, error) {
	var r reply
	var remote string
	if _, err := fmt.Sscanf(strings.TrimSpace(line), "slot=%d pid=%d gen=%d remote=%s", &r.Slot, &r.PID, &r.Gen, &remote); err != nil {
		return r, fmt.Errorf("parse worker reply %q: %w", line, err)
	}
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return r, fmt.Errorf("parse worker reply %q: %w", line, err)
	}
	r.Remote = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	return r, nil
}

// echoConn is an open client connection to the cluster.
type echoConn struct {
	net.Conn
	r     *bufio.Reader
	first reply
}

// probe sends a line on an established connection and reads the answer.
func (c *echoConn) probe() (reply, error) {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "ping\n"); err != nil {
		return reply{}, err
	}
	line, err := c.r.ReadString('\n')
	if err != nil {
		return reply{}, err
	}
	return parseReply(line)
}

var errNoReply = errors.New("no reply")

func readFirst(conn net.Conn) (*echoConn, error) {
	c := &echoConn{Conn: conn, r: bufio.NewReader(conn)}
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := c.r.ReadString('\n')
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("%w: %w", errNoReply, err)
	}
	c.first, err = parseReply(line)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

func itoa(i int) string { return strconv.Itoa(i) }
