//go:build linux

// Package browser drives headless Chromium inside a netlab lab's client
// namespace, for tests that need a real browser: pages that run their own
// JavaScript against a server in the lab, each browser's connections
// leaving from one chosen lab client address.
//
// # Why a driver process
//
// The test process lives in the machine's own network namespace, and no
// test traffic may flow there, the browser's control channel included.
// chromedp starts Chromium itself, from a goroutine of its own, so the
// test process cannot start it in the lab. So Start re-executes the
// program's own executable (the test binary) inside lab.Client with
// [driverEnv] set; this package's init turns that process into the driver
// before any test (or TestMain) runs. The driver runs chromedp, which starts
// Chromium as its child, in the lab, and talks to it over
// --remote-debugging-pipe (chromedp v0.23's default): no DevTools port at
// all, on any loopback. The test talks to the driver over the driver's stdin
// and stdout, one JSON request and one JSON reply a line (see request and
// reply); Chromium's output goes to the driver's stderr, which Start keeps
// for errors and the log.
//
// # Why a uid per browser
//
// The product under test routes clients by the low bits of their source
// address, so two pages must come from two chosen addresses, and the
// server must see each page's real address: no proxy in between. Chromium
// has no option to choose its source address. So each browser's Chromium
// runs as a uid of its own, and the client namespace gets a policy routing
// rule for that uid (`ip rule add uidrange U-U lookup T`) whose table T
// routes the server's subnet out of [netlab.ClientLink] with the chosen
// address as the preferred source: the kernel then picks that address for
// every connection the browser opens. Rules, tables and uids are per
// browser, so several browsers can run in one lab at once. Close removes
// the rule and the table (the lab's namespace goes with the lab anyway).
package browser

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/netlab"
)

const (
	// driverEnv carries the driver's options (JSON) to the re-executed
	// binary; its presence makes init run the driver instead of the
	// program.
	driverEnv = "IPCLUSTER_BROWSER_DRIVER"

	// Timeout bounds every call to the browser (Navigate, Eval,
	// Screenshot) and Chromium's start.
	Timeout = 30 * time.Second
	// closeTimeout is how long Close waits for a graceful stop before
	// killing the driver and Chromium.
	closeTimeout = 5 * time.Second
	// grace is how much longer than a call's own timeout the test waits
	// for the driver's answer before it gives up on the driver.
	grace = 10 * time.Second

	// Default window size.
	DefaultWidth, DefaultHeight = 1200, 900

	// uidBase is the first uid given to a browser: far above any account
	// a machine has, so no real user's processes share it.
	uidBase = 2_000_000_000
	// tableBase is the first routing table (and rule priority) used for
	// a browser, in the lab's client namespace: below the main table's
	// rule (32766), above the local table's (0).
	tableBase = 1000
)

// seq numbers the browsers of this process: browser n runs as uid
// uidBase+n, with table and rule priority tableBase+n.
var seq atomic.Uint32

// Chromium returns the path of the Chromium binary, or skips the test when
// none is installed (fails it with IPCLUSTER_REQUIRE_TOOLS=1), like
// netlab.Tool.
func Chromium(t testing.TB) string {
	t.Helper()
	return netlab.Tool(t, "chromium", "chromium", "chromium-browser", "google-chrome")
}

// Options configures a Browser.
type Options struct {
	// Src is the lab client address (one of lab.ClientAddrs4 or
	// ClientAddrs6) that every connection of the browser to the server's
	// subnet, in Src's address family, leaves from. Required.
	Src netip.Addr
	// IgnoreCertErrors makes Chromium accept any TLS certificate, such as
	// the test's self-signed one. Default false.
	IgnoreCertErrors bool
	// Width and Height are the window's size in pixels: default
	// DefaultWidth x DefaultHeight.
	Width, Height int
}

// driverOptions is what the driver gets in driverEnv.
type driverOptions struct {
	Chromium         string
	Netns            uint64 // inode of the namespace the driver must run in
	UID              uint32 // Chromium's uid and gid
	Dir              string // its HOME and user data directory
	IgnoreCertErrors bool
	Width, Height    int
}

// request is one line the test sends to the driver.
type request struct {
	Op        string `json:"op"` // "navigate", "eval", "screenshot" or "close"
	Arg       string `json:"arg,omitempty"`
	TimeoutMS int64  `json:"timeout_ms,omitempty"`
}

// reply is one line the driver sends back: first one for the start (with
// PID), then one per request.
type reply struct {
	Err   string          `json:"err,omitempty"`
	Value json.RawMessage `json:"value,omitempty"` // eval's result; absent for undefined
	PNG   []byte          `json:"png,omitempty"`   // screenshot's
	PID   int             `json:"pid,omitempty"`   // Chromium's, in the start reply
}

// Browser is one headless Chromium in a lab's client namespace, with one
// page. Its methods may be called from any goroutine; calls are serialized.
type Browser struct {
	Src netip.Addr // as in Options

	t      testing.TB
	lab    *netlab.Lab
	opts   Options
	uid    uint32
	table  int
	dir    string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan []byte // the driver's replies, closed at its EOF
	exited chan struct{}
	stderr *tail
	pid    int // Chromium's

	mu        sync.Mutex // serializes calls
	dead      error      // set once the driver is unusable
	closeOnce sync.Once
	closeErr  error
}

// Start starts a driver and Chromium in lab.Client, on an empty page, and
// closes them when the test ends (t.Cleanup): the driver and Chromium are
// killed, the routing rule and table removed, the temporary directory
// deleted. A bad option or a failure to start fails the test.
func Start(t testing.TB, lab *netlab.Lab, opts Options) *Browser {
	t.Helper()
	bin := Chromium(t)
	b, err := start(t, lab, bin, opts)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func start(t testing.TB, lab *netlab.Lab, bin string, opts Options) (*Browser, error) {
	if !isClientAddr(lab, opts.Src) {
		return nil, fmt.Errorf("browser: Options.Src %v is not one of the lab's client addresses (lab.ClientAddrs4 or ClientAddrs6)", opts.Src)
	}
	if opts.Width < 0 || opts.Height < 0 || opts.Width > 10000 || opts.Height > 10000 {
		return nil, fmt.Errorf("browser: Options.Width and Height %dx%d are outside 0..10000 (0 for the default %dx%d)",
			opts.Width, opts.Height, DefaultWidth, DefaultHeight)
	}
	if opts.Width == 0 {
		opts.Width = DefaultWidth
	}
	if opts.Height == 0 {
		opts.Height = DefaultHeight
	}
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("browser: find the program to re-execute as the driver: %w", err)
	}
	ino, err := lab.Client.Inode()
	if err != nil {
		return nil, fmt.Errorf("browser: %w", err)
	}
	n := seq.Add(1)
	b := &Browser{
		Src: opts.Src, t: t, lab: lab, opts: opts,
		uid: uidBase + n, table: tableBase + int(n),
		lines: make(chan []byte, 1), exited: make(chan struct{}),
		stderr: &tail{max: 16 << 10},
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("browser from %v: %v", b.Src, err)
		}
		if t.Failed() {
			t.Logf("browser from %v: the driver's output (Chromium's included) ends with:\n%s", b.Src, b.stderr)
		}
	})

	// Not t.TempDir: its parents are 0700, out of the browser's uid's reach.
	if b.dir, err = os.MkdirTemp("", "ipcluster-browser-"); err != nil {
		return nil, fmt.Errorf("browser: %w", err)
	}
	if err := os.Chown(b.dir, int(b.uid), int(b.uid)); err != nil {
		return nil, fmt.Errorf("browser: give %s to uid %d: %w", b.dir, b.uid, err)
	}
	if err := b.route(true); err != nil {
		return nil, err
	}

	js, _ := json.Marshal(driverOptions{
		Chromium: bin, Netns: ino, UID: b.uid, Dir: b.dir,
		IgnoreCertErrors: opts.IgnoreCertErrors, Width: opts.Width, Height: opts.Height,
	})
	b.cmd = exec.Command(self)
	b.cmd.Args = []string{"ipcluster-browser-driver"}
	b.cmd.Env = append(os.Environ(), driverEnv+"="+string(js))
	b.cmd.Stderr = b.stderr
	// Its own process group: a ^C to the test run is the test's to handle.
	b.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if b.stdin, err = b.cmd.StdinPipe(); err != nil {
		return nil, fmt.Errorf("browser: %w", err)
	}
	stdout, err := b.cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("browser: %w", err)
	}
	if err := lab.Client.Start(b.cmd); err != nil {
		return nil, fmt.Errorf("browser: start the driver in %s: %w", lab.Client.Name, err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(nil, 256<<20) // screenshots
		for sc.Scan() {
			b.lines <- append([]byte(nil), sc.Bytes()...)
		}
		close(b.lines)
	}()
	go func() {
		_ = b.cmd.Wait()
		close(b.exited)
	}()

	r, err := b.await("start Chromium", Timeout+grace)
	if err != nil {
		return nil, err
	}
	b.pid = r.PID
	t.Logf("browser: Chromium (pid %d, uid %d) in %s, connections from %v", b.pid, b.uid, lab.Client.Name, b.Src)
	return b, nil
}

func isClientAddr(lab *netlab.Lab, a netip.Addr) bool {
	for _, c := range append(append([]netip.Addr(nil), lab.ClientAddrs4...), lab.ClientAddrs6...) {
		if a == c {
			return true
		}
	}
	return false
}

// route adds (or, with add false, removes) the browser's rule and table in
// the lab's client namespace.
func (b *Browser) route(add bool) error {
	family, dst := netlink.FAMILY_V4, netip.MustParsePrefix("198.18.0.0/15")
	if b.Src.Is6() {
		family, dst = netlink.FAMILY_V6, netip.MustParsePrefix("fd00::/32")
	}
	rule := netlink.NewRule()
	rule.Family = family
	rule.Priority = b.table
	rule.Table = b.table
	rule.UIDRange = netlink.NewRuleUIDRange(b.uid, b.uid)
	return b.lab.Client.Do(func() error {
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return fmt.Errorf("browser: netlink socket in %s: %w", b.lab.Client.Name, err)
		}
		defer h.Close()
		link, err := h.LinkByName(netlab.ClientLink)
		if err != nil {
			return fmt.Errorf("browser: find %s in %s: %w", netlab.ClientLink, b.lab.Client.Name, err)
		}
		r := &netlink.Route{
			LinkIndex: link.Attrs().Index,
			Dst:       &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(dst.Bits(), dst.Addr().BitLen())},
			Src:       b.Src.AsSlice(),
			Scope:     netlink.SCOPE_LINK,
			Table:     b.table,
		}
		if !add {
			// What is already gone (or was never added) is not an error.
			var errs []error
			if err := h.RuleDel(rule); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("browser: remove rule uidrange %d lookup %d: %w", b.uid, b.table, err))
			}
			if err := h.RouteDel(r); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("browser: remove route %v src %v table %d: %w", dst, b.Src, b.table, err))
			}
			return errors.Join(errs...)
		}
		if err := h.RouteAdd(r); err != nil {
			return fmt.Errorf("browser: add route %v dev %s src %v table %d in %s: %w", dst, netlab.ClientLink, b.Src, b.table, b.lab.Client.Name, err)
		}
		if err := h.RuleAdd(rule); err != nil {
			return fmt.Errorf("browser: add rule uidrange %d-%d lookup %d in %s: %w", b.uid, b.uid, b.table, b.lab.Client.Name, err)
		}
		return nil
	})
}

// await waits up to d for the driver's next reply.
func (b *Browser) await(what string, d time.Duration) (reply, error) {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case line, ok := <-b.lines:
		if !ok {
			// Let Wait finish, so the exit status and stderr are complete.
			select {
			case <-b.exited:
			case <-time.After(closeTimeout):
			}
			b.dead = fmt.Errorf("browser: %s: the driver exited (%v); its output (Chromium's included) ends with:\n%s",
				what, b.cmd.ProcessState, b.stderr)
			return reply{}, b.dead
		}
		var r reply
		if err := json.Unmarshal(line, &r); err != nil {
			b.dead = fmt.Errorf("browser: %s: bad reply from the driver %q: %w", what, line, err)
			return reply{}, b.dead
		}
		if r.Err != "" {
			return r, fmt.Errorf("browser: %s: %s", what, r.Err)
		}
		return r, nil
	case <-timer.C:
		b.dead = fmt.Errorf("browser: %s: no answer from the driver in %v; its output (Chromium's included) ends with:\n%s",
			what, d, b.stderr)
		b.kill()
		return reply{}, b.dead
	}
}

// call sends one request and waits for its reply.
func (b *Browser) call(what string, req request) (reply, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dead != nil {
		return reply{}, fmt.Errorf("browser: %s: the browser is gone: %w", what, b.dead)
	}
	req.TimeoutMS = Timeout.Milliseconds()
	line, _ := json.Marshal(req)
	if _, err := b.stdin.Write(append(line, '\n')); err != nil {
		b.dead = fmt.Errorf("browser: %s: write to the driver: %w; its output ends with:\n%s", what, err, b.stderr)
		return reply{}, b.dead
	}
	return b.await(what, Timeout+grace)
}

// Navigate loads url in the page and waits for its load event.
func (b *Browser) Navigate(url string) error {
	_, err := b.call("navigate to "+url, request{Op: "navigate", Arg: url})
	return err
}

// Eval evaluates the JavaScript expression expr in the page, awaits its
// value if it is a promise, and JSON-decodes the value into out, which may
// be nil to ignore it. A value of undefined leaves out alone. A thrown
// exception or a rejected promise is an error.
func (b *Browser) Eval(expr string, out any) error {
	what := "evaluate " + abbrev(expr)
	r, err := b.call(what, request{Op: "eval", Arg: expr})
	if err != nil || out == nil || len(r.Value) == 0 {
		return err
	}
	if err := json.Unmarshal(r.Value, out); err != nil {
		return fmt.Errorf("browser: %s: decode %s into %T: %w", what, abbrev(string(r.Value)), out, err)
	}
	return nil
}

// Screenshot writes a PNG of the page's viewport to path.
func (b *Browser) Screenshot(path string) error {
	r, err := b.call("screenshot", request{Op: "screenshot"})
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, r.PNG, 0o644); err != nil {
		return fmt.Errorf("browser: write screenshot: %w", err)
	}
	return nil
}

// Close stops Chromium and the driver (gracefully, then by SIGKILL after
// a few seconds), removes the browser's routing rule and table and its
// temporary directory. Safe to call more than once; Start's cleanup calls
// it.
func (b *Browser) Close() error {
	b.closeOnce.Do(func() { b.closeErr = b.close() })
	return b.closeErr
}

func (b *Browser) close() error {
	var errs []error
	if b.cmd != nil && b.cmd.Process != nil {
		b.mu.Lock()
		if b.dead == nil {
			line, _ := json.Marshal(request{Op: "close"})
			_, _ = b.stdin.Write(append(line, '\n'))
		}
		b.dead = errors.New("browser: closed")
		b.mu.Unlock()
		_ = b.stdin.Close() // EOF: the driver stops Chromium and exits
		select {
		case <-b.exited:
		case <-time.After(closeTimeout):
			b.t.Logf("browser: the driver did not stop in %v; killing it", closeTimeout)
		}
		b.kill()
		select {
		case <-b.exited:
		case <-time.After(closeTimeout):
			errs = append(errs, fmt.Errorf("browser: driver pid %d still running %v after SIGKILL", b.cmd.Process.Pid, closeTimeout))
		}
	}
	errs = append(errs, b.route(false))
	if b.dir != "" {
		if err := os.RemoveAll(b.dir); err != nil {
			errs = append(errs, fmt.Errorf("browser: remove %s: %w", b.dir, err))
		}
	}
	return errors.Join(errs...)
}

// kill SIGKILLs the driver and every process of the browser's uid in the
// lab's client namespace: Chromium and its helpers, which are this
// browser's alone (the uid is).
func (b *Browser) kill() {
	if b.cmd != nil && b.cmd.Process != nil {
		select {
		case <-b.exited:
		default:
			_ = b.cmd.Process.Kill()
		}
	}
	ino, err := b.lab.Client.Inode()
	if err != nil {
		return
	}
	deadline := time.Now().Add(closeTimeout)
	for {
		var left []int
		for _, pid := range netlab.PIDsIn(ino) {
			if uidOf(pid) == b.uid && netlab.Running(pid) {
				_ = unix.Kill(pid, unix.SIGKILL)
				left = append(left, pid)
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// uidOf returns the real uid of pid, or 0 (root: never a browser's) if it
// cannot be read.
func uidOf(pid int) uint32 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			if f := strings.Fields(rest); len(f) > 0 {
				n, _ := strconv.ParseUint(f[0], 10, 32)
				return uint32(n)
			}
		}
	}
	return 0
}

// abbrev shortens s for an error message.
func abbrev(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 80 {
		return strconv.Quote(s[:77] + "...")
	}
	return strconv.Quote(s)
}

// tail keeps the last max bytes written to it.
type tail struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (w *tail) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	if over := len(w.buf) - w.max; over > 0 {
		w.buf = append(w.buf[:0], w.buf[over:]...)
	}
	return len(p), nil
}

func (w *tail) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return string(bytes.TrimSpace(w.buf))
}
