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
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
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
	// EventsLog, if set, is a file the master (not its workers) appends
	// every event to, one JSON line each (see logEvents, readEvents).
	EventsLog string
	// OnceDir holds the per-slot markers of the *once scenarios (see once
	// and makeOnce).
	OnceDir string
	// HealthCheck names a Config.HealthCheck for the master: "dial".
	HealthCheck string
	// VersionFile, if set, holds the master's Config.Version, read when it
	// starts: a test "ships new code" by rewriting it before a deploy.
	VersionFile string
	// VersionScenarios overrides the scenario of workers spawned as a
	// version, for every slot. Besides the worker scenarios it knows
	// "exit" (exit at once, before Run), "noready" (never call Run) and
	// "crash2s" (echo, then exit 2s after being called).
	VersionScenarios map[string]string
	// VersionWorkers overrides Config.Workers of a master whose version
	// (VersionFile) is a key: a build shipped with a bad Config.
	VersionWorkers map[string]int
	// Exe, if set, is the binary the harness starts as the master instead
	// of this test binary (a copy a test may replace, as a deploy does).
	Exe string `json:"-"`
	// ReportDir is a directory (writable by every user) where scenarios
	// that find something out write it: "tryrules"; or where the test
	// tells them something: "gated".
	ReportDir string
	// FailFile, if set, makes every worker that starts while the file
	// exists exit at once, before Run: a test breaks a slot's
	// replacements by creating it.
	FailFile string
	// Env, if set, is added to the master's environment (the harness's own
	// systemd variables never are: see cluster.start).
	Env []string `json:"-"`
	// SysProcAttr, if set, is the master's (a test starts it as another
	// user, or with ambient capabilities).
	SysProcAttr *syscall.SysProcAttr `json:"-"`
	// Netns is the inode of the namespace the helper must find itself in.
	// It refuses to run anywhere else, so a broken lab can never write
	// rules into the machine's own namespace.
	Netns uint64
}

// specConfig is the spec's ipcluster.Config: the real type, so that every
// field a test may set is there without a mirror to keep in step. Its JSON
// carries every field but the funcs (OnEvent, HealthCheck) and the pointers
// (Logger, WorkerStdout, WorkerStderr), which cannot cross the environment:
// helperMain sets those, from the spec's other fields. Durations travel as
// nanoseconds, Addr and Ports as text ("198.18.0.1", "8080/tcp").
type specConfig ipcluster.Config

// tcpPorts and udpPorts are Config.Ports for the given port numbers.
func tcpPorts(ports ...uint16) []ipcluster.Port { return portsOf(ipcluster.TCP, ports) }
func udpPorts(ports ...uint16) []ipcluster.Port { return portsOf(ipcluster.UDP, ports) }

func portsOf(proto ipcluster.Protocol, ports []uint16) []ipcluster.Port {
	var ps []ipcluster.Port
	for _, p := range ports {
		ps = append(ps, ipcluster.Port{Public: p, Proto: proto})
	}
	return ps
}

// MarshalJSON writes the fields JSON can carry as an object keyed by field
// name, and refuses a config with a func or pointer set: the helper would
// silently run without it.
func (c specConfig) MarshalJSON() ([]byte, error) {
	v := reflect.ValueOf(c)
	fields := map[string]any{}
	for i := range v.NumField() {
		f := v.Type().Field(i)
		if k := f.Type.Kind(); k == reflect.Func || k == reflect.Pointer {
			if !v.Field(i).IsZero() {
				return nil, fmt.Errorf("spec: Config.%s cannot be passed to the helper: set it in helperMain from a spec field", f.Name)
			}
			continue
		}
		fields[f.Name] = v.Field(i).Interface()
	}
	return json.Marshal(fields)
}

// UnmarshalJSON is the inverse of MarshalJSON.
func (c *specConfig) UnmarshalJSON(b []byte) error {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(b, &fields); err != nil {
		return err
	}
	v := reflect.ValueOf(c).Elem()
	for name, raw := range fields {
		f := v.FieldByName(name)
		if !f.IsValid() {
			return fmt.Errorf("spec: Config has no field %s", name)
		}
		if err := json.Unmarshal(raw, f.Addr().Interface()); err != nil {
			return fmt.Errorf("spec: Config.%s: %w", name, err)
		}
	}
	return nil
}

// config is the Config the helper runs, with its logger.
func (s specConfig) config() ipcluster.Config {
	c := ipcluster.Config(s)
	c.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	return c
}

func TestMain(m *testing.M) {
	if os.Getenv(envCapsProbe) != "" {
		os.Exit(capsProbeMain())
	}
	if s := os.Getenv(envSpec); s != "" {
		os.Exit(helperMain(s))
	}
	if s := os.Getenv(envDial); s != "" {
		os.Exit(dialMain(s))
	}
	if s := os.Getenv(envFakeWorker); s != "" {
		os.Exit(fakeWorkerMain(s))
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
	helperSpec = s
	scenarios := map[string]func(*ipcluster.Worker) error{
		"echo": echoWorker,
		// linger: like echo, but a connection outlives the worker's
		// context, as a server finishing its clients' sessions would.
		"linger": func(w *ipcluster.Worker) error { return serveListeners(w, serveLingering) },
		// ballast: echo, holding 64 MiB of touched memory.
		"ballast": ballastWorker,
		// busy: echo, on one P kept busy by spinning goroutines.
		"busy": busyWorker,
		// cpu20: echo, burning a fifth of a core (20ms of every 100ms).
		"cpu20": cpu20Worker,
		// leakonce: the first worker of a slot with a marker in OnceDir
		// grows by 2 MiB every 50ms until retired (at most 512 MiB); all
		// serve as echo.
		"leakonce": leakOnceWorker,
		// busyonce: the first worker of a slot with a marker in OnceDir
		// is busy until retired; the others are plain echo.
		"busyonce": busyOnceWorker,
		// deafonce: the first worker of a slot with a marker in OnceDir
		// keeps its heartbeats but never accepts a connection, as a
		// worker whose serving goroutines are deadlocked; the others
		// are plain echo.
		"deafonce": deafOnceWorker,
		// tryrules: tries to add an nf_tables table and an iptables
		// chain, to regain capabilities by re-executing its binary and
		// to open the master's memory, writes what happened to
		// ReportDir/tryrules-<pid>, and serves as echo.
		"tryrules": tryRulesWorker,
		// http: HTTP through Worker.ServeHTTP (see httpWorker).
		"http": httpWorker,
		"crash2s": func(w *ipcluster.Worker) error {
			time.AfterFunc(2*time.Second, func() { os.Exit(5) })
			return echoWorker(w)
		},
		// panic: the work function panics at once, as a bad build's
		// start-up would; panic1s: echo, and a panic after 1s; return:
		// the function returns nil at once (the worker then asks to be
		// retired).
		"panic": func(w *ipcluster.Worker) error { panic("helper: work panics at start") },
		"panic1s": func(w *ipcluster.Worker) error {
			time.AfterFunc(time.Second, func() { panic("helper: work panics after 1s") })
			return echoWorker(w)
		},
		"return": func(w *ipcluster.Worker) error { return nil },
		// gated (with WorkerReady): echo, calling Worker.Ready only
		// once the test creates ReportDir/ready-<pid>; readyecho: echo,
		// ready at once.
		"gated": gatedWorker,
		// ops: echo, with an operator handler serving a registry of its
		// own (see opsWorker).
		"ops": opsWorker,
		// heapleakonce: the first worker of a slot with a marker in
		// OnceDir keeps Go heap in leakHeapForSnapshots until retired
		// (heap_test.go); all serve as echo.
		"heapleakonce": heapLeakOnceWorker,
		"readyecho": func(w *ipcluster.Worker) error {
			w.Ready()
			return echoWorker(w)
		},
		// handoff (with WorkerReady): take the slot's state, report it,
		// offer its own, call Ready, echo; handoffblock: its OnHandoff
		// never returns; handoffbig: it writes 3 MiB; handoffslow: it
		// writes after a second (handoff_test.go).
		"handoff":      handoffWorker(""),
		"handoffblock": handoffWorker("block"),
		"handoffbig":   handoffWorker("big"),
		"handoffslow":  handoffWorker("slow"),
	}
	if ipcluster.IsWorker() && s.FailFile != "" {
		if _, err := os.Stat(s.FailFile); err == nil {
			fmt.Fprintln(os.Stderr, "helper: exiting at start, as", s.FailFile, "exists")
			return 4
		}
	}
	if ipcluster.IsWorker() {
		switch name := s.VersionScenarios[os.Getenv(ipcluster.EnvBuild)]; name {
		case "":
		case "exit":
			fmt.Fprintln(os.Stderr, "helper: exiting at start, as version", os.Getenv(ipcluster.EnvBuild))
			return 4
		case "noready":
			select {} // killed by the master after ConnectTimeout
		default:
			s.Scenario, s.SlotScenarios = name, nil
		}
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
	if s.VersionFile != "" && !ipcluster.IsWorker() {
		b, err := os.ReadFile(s.VersionFile)
		if err != nil {
			fmt.Fprintf(os.Stderr, "helper: %v\n", err)
			return 2
		}
		cfg.Version = strings.TrimSpace(string(b))
		if n, ok := s.VersionWorkers[cfg.Version]; ok {
			cfg.Workers = n
		}
	}
	switch s.HealthCheck {
	case "":
	case "dial":
		cfg.HealthCheck = dialCheck(cfg)
	default:
		fmt.Fprintf(os.Stderr, "helper: unknown health check %q\n", s.HealthCheck)
		return 2
	}
	if s.EventsLog != "" && !ipcluster.IsWorker() {
		f, err := os.OpenFile(s.EventsLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			fmt.Fprintf(os.Stderr, "helper: %v\n", err)
			return 2
		}
		defer f.Close()
		cfg.OnEvent = logEvents(f)
	}
	if err := ipcluster.Run(context.Background(), cfg, work); err != nil {
		fmt.Fprintf(os.Stderr, "helper: %v\n", err)
		return 1
	}
	return 0
}

// helperSpec is the spec of this helper process (master or worker), for the
// scenarios that need more than the Worker.
var helperSpec spec

// logEvents returns an OnEvent function that appends each event to f as one
// line of JSON: {"type":"EventStats","at":<when received>,"event":{...}}.
func logEvents(f *os.File) func(ipcluster.Event) {
	var mu sync.Mutex
	return func(ev ipcluster.Event) {
		at := time.Now()
		body, err := marshalEvent(ev)
		if err != nil {
			body, _ = json.Marshal(map[string]string{"marshal_error": err.Error()})
		}
		t := reflect.TypeOf(ev)
		if t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		line, _ := json.Marshal(struct {
			Type  string          `json:"type"`
			At    time.Time       `json:"at"`
			Event json.RawMessage `json:"event"`
		}{t.Name(), at, body})
		mu.Lock()
		defer mu.Unlock()
		// One write per line: a reader sees whole lines, and at worst a
		// partial last one.
		if _, err := f.Write(append(line, '\n')); err != nil {
			fmt.Fprintf(os.Stderr, "helper: events log: %v\n", err)
		}
	}
}

var errorType = reflect.TypeFor[error]()

// marshalEvent is json.Marshal, except that the error fields of a struct
// (EventRulesFailed.Err), which would marshal as {}, become their message
// (or null).
func marshalEvent(ev ipcluster.Event) ([]byte, error) {
	v := reflect.Indirect(reflect.ValueOf(ev))
	if v.Kind() != reflect.Struct {
		return json.Marshal(ev)
	}
	hasErr := false
	for i := range v.NumField() {
		if v.Type().Field(i).Type == errorType {
			hasErr = true
		}
	}
	if !hasErr {
		return json.Marshal(ev)
	}
	m := map[string]any{}
	for i := range v.NumField() {
		f := v.Type().Field(i)
		if !f.IsExported() {
			continue
		}
		fv := v.Field(i).Interface()
		if f.Type == errorType {
			if err, _ := fv.(error); err != nil {
				fv = err.Error()
			}
		}
		m[f.Name] = fv
	}
	return json.Marshal(m)
}

// once reports whether w is the first worker of its slot to call it: the
// one that removes the slot's marker file in dir (see makeOnce). It is
// false for every worker if dir is "".
func once(w *ipcluster.Worker, dir string) bool {
	if dir == "" {
		return false
	}
	return os.Remove(filepath.Join(dir, "slot-"+itoa(w.Slot()))) == nil
}

// mapped keeps the memory of mapTouched for the life of the process.
var mapped struct {
	sync.Mutex
	regions [][]byte
}

// mapTouched maps size bytes of anonymous memory, touches every page so
// that it is resident, and keeps it.
func mapTouched(size int) error {
	b, err := syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return fmt.Errorf("mmap %d bytes: %w", size, err)
	}
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
	mapped.Lock()
	mapped.regions = append(mapped.regions, b)
	mapped.Unlock()
	return nil
}

// leakOnceWorker: if once, grows by 2 MiB every 50ms until the worker is
// retired or told to finish, up to 512 MiB; serves as echo.
func leakOnceWorker(w *ipcluster.Worker) error {
	if once(w, helperSpec.OnceDir) {
		go func() {
			tick := time.NewTicker(50 * time.Millisecond)
			defer tick.Stop()
			for total := 0; total < 512<<20; total += 2 << 20 {
				select {
				case <-w.Retired():
					return
				case <-w.Context().Done():
					return
				case <-tick.C:
				}
				if err := mapTouched(2 << 20); err != nil {
					w.Logger().Error("leakonce", "err", err)
					return
				}
			}
		}()
	}
	return echoWorker(w)
}

// gatedWorker serves as echo, and calls Ready once the test has created
// ReportDir/ready-<pid> (see openGate).
func gatedWorker(w *ipcluster.Worker) error {
	gate := filepath.Join(helperSpec.ReportDir, "ready-"+itoa(os.Getpid()))
	go func() {
		for {
			if _, err := os.Stat(gate); err == nil {
				w.Logger().Info("helper: gate open; calling Ready")
				w.Ready()
				w.Ready() // safe to call more than once
				return
			}
			select {
			case <-w.Context().Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return echoWorker(w)
}

// deafOnceWorker: if once, never accepts, and returns when retired or told
// to finish; else echo.
func deafOnceWorker(w *ipcluster.Worker) error {
	if once(w, helperSpec.OnceDir) {
		select {
		case <-w.Retired():
		case <-w.Context().Done():
		}
		return nil
	}
	return echoWorker(w)
}

// dialCheck is a Config.HealthCheck that connects to the worker's first TCP
// port itself (through the guard, with DialWorker) and reads its greeting.
func dialCheck(cfg ipcluster.Config) func(context.Context, ipcluster.WorkerStats) error {
	return func(ctx context.Context, ws ipcluster.WorkerStats) error {
		port := ws.Ports[cfg.Ports[0]]
		conn, err := ipcluster.DialWorker(ctx, "tcp", netip.AddrPortFrom(cfg.Addr, port).String())
		if err != nil {
			return err
		}
		defer conn.Close()
		if dl, ok := ctx.Deadline(); ok {
			_ = conn.SetDeadline(dl)
		}
		line, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil {
			return fmt.Errorf("worker %d on port %d: %w", ws.PID, port, err)
		}
		_, err = parseReply(line)
		return err
	}
}

// busyOnceWorker: if once, busy as busyWorker until retired or told to
// finish; serves as echo.
func busyOnceWorker(w *ipcluster.Worker) error {
	if once(w, helperSpec.OnceDir) {
		runtime.GOMAXPROCS(1)
		spin(w.Context().Done(), w.Retired())
	}
	return echoWorker(w)
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
func cpu20Worker(w *ipcluster.Worker) error {
	go func() {
		n := 0
		for w.Context().Err() == nil {
			for end := time.Now().Add(20 * time.Millisecond); time.Now().Before(end); {
				n++
			}
			time.Sleep(80 * time.Millisecond)
		}
		_ = n
	}()
	return echoWorker(w)
}

func busyWorker(w *ipcluster.Worker) error {
	runtime.GOMAXPROCS(1)
	spin(w.Context().Done())
	return echoWorker(w)
}

// spin starts four goroutines that spin until one of stop is closed.
func spin(stop ...<-chan struct{}) {
	stopped := func() bool {
		for _, c := range stop {
			select {
			case <-c:
				return true
			default:
			}
		}
		return false
	}
	for range 4 {
		go func() {
			n := 0
			for !stopped() {
				for range 1 << 16 {
					n++
				}
			}
			_ = n
		}()
	}
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

// serveLingering answers the connection with the worker's line, and each
// line it reads with the same line. Some lines are also commands:
//
//	alloc N   map N MiB of touched memory, kept for the life of the process
//	retire    w.RequestRetire("test")
func serveLingering(w *ipcluster.Worker, c net.Conn) {
	defer c.Close()
	line := fmt.Sprintf("slot=%d pid=%d gen=%d remote=%s\n", w.Slot(), os.Getpid(), w.Generation(), c.RemoteAddr())
	if _, err := io.WriteString(c, line); err != nil {
		return
	}
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		switch f := strings.Fields(sc.Text()); {
		case len(f) == 2 && f[0] == "alloc":
			n, err := strconv.Atoi(f[1])
			if err == nil && n > 0 && n <= 4096 {
				err = mapTouched(n << 20)
			} else if err == nil {
				err = fmt.Errorf("alloc %d MiB: out of range", n)
			}
			if err != nil {
				w.Logger().Error("alloc command", "err", err)
			}
		case len(f) == 1 && f[0] == "retire":
			w.RequestRetire("test")
		}
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
func (c *echoConn) probe() (reply, error) { return c.command("ping") }

// command sends one line (see serveLingering) and reads the answer.
func (c *echoConn) command(cmd string) (reply, error) {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, cmd+"\n"); err != nil {
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

// The spec's Config reaches the helper whole: every field JSON can carry
// comes back as it went, and a func the helper cannot receive is refused
// rather than dropped.
func TestSpecConfigJSON(t *testing.T) {
	in := specConfig{Name: "t", Workers: 4, Ports: append(tcpPorts(8080), udpPorts(5353)...),
		Addr: netip.MustParseAddr("198.18.0.1"), Backend: ipcluster.BackendIPTables, AllowDirect: true,
		StopTimeout: 3 * time.Second, MemoryLowWatermark: 0.5, WorkerReady: true, HTTPAddr: "198.18.0.1:9100"}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	var out specConfig
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("unmarshal %s: %v", b, err)
	}
	if !reflect.DeepEqual(in, out) {
		t.Errorf("round trip through %s:\n got %+v\nwant %+v", b, out, in)
	}
	in.OnEvent = func(ipcluster.Event) {}
	if _, err := json.Marshal(in); err == nil || !strings.Contains(err.Error(), "Config.OnEvent") {
		t.Errorf("marshal with OnEvent set: %v, want an error naming Config.OnEvent", err)
	}
}
