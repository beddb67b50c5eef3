//go:build !plan9

package ipcluster

// Development mode without a process of its own: the mode switch, the
// worker it hands out, its stop and its bind errors, in this process on
// 127.0.0.1 (never the host's public addresses). runDev is called
// directly rather than Run, so that a broken switch can never start a
// master here. The re-exec test as an unprivileged user is
// dev_linux_test.go.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestDevModeSwitch(t *testing.T) {
	for _, tc := range []struct {
		env     string // "-": unset
		dev     bool
		want    bool
		why     string
		wantErr bool
	}{
		{env: "-", dev: false, want: false},
		{env: "-", dev: true, want: true, why: "Config.Dev"},
		{env: "", dev: false, want: false},
		{env: "1", dev: false, want: true, why: "IPCLUSTER_DEV=1"},
		{env: "true", dev: false, want: true, why: "IPCLUSTER_DEV=true"},
		{env: "1", dev: true, want: true, why: "IPCLUSTER_DEV=1"},
		// "0" never turns the mode off: Config.Dev decides.
		{env: "0", dev: false, want: false},
		{env: "0", dev: true, want: true, why: "Config.Dev"},
		{env: "false", dev: true, want: true, why: "Config.Dev"},
		{env: "yes", dev: true, wantErr: true},
	} {
		t.Run(fmt.Sprintf("env=%s,Dev=%v", tc.env, tc.dev), func(t *testing.T) {
			if tc.env == "-" {
				t.Setenv(EnvDev, "")
				os.Unsetenv(EnvDev)
			} else {
				t.Setenv(EnvDev, tc.env)
			}
			on, why, err := devMode(&Config{Dev: tc.dev})
			if tc.wantErr {
				if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "set it to 1 for development mode") {
					t.Fatalf("err = %v, want ErrInvalidConfig naming the fix", err)
				}
				return
			}
			if err != nil || on != tc.want || why != tc.why {
				t.Fatalf("devMode = %v, %q, %v; want %v, %q, nil", on, why, err, tc.want, tc.why)
			}
		})
	}
}

// TestDevRunValidates: a bad Config is still an error in development
// mode, and a bad IPCLUSTER_DEV too, before anything listens.
func TestDevRunValidates(t *testing.T) {
	work := func(*Worker) error { t.Error("work called"); return nil }
	err := Run(context.Background(), Config{Dev: true, Name: "dev", Workers: 3, Ports: []Port{{Public: 7000}}}, work)
	var ce *ConfigError
	if !errors.As(err, &ce) || ce.Field != "Workers" {
		t.Errorf("Workers 3: err = %v, want a ConfigError for Workers", err)
	}
	t.Setenv(EnvDev, "maybe")
	err = Run(context.Background(), Config{Name: "dev", Workers: 3, Ports: []Port{{Public: 7000}}}, work)
	if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), `IPCLUSTER_DEV="maybe"`) {
		t.Errorf("IPCLUSTER_DEV=maybe: err = %v, want ErrInvalidConfig naming the variable", err)
	}
}

// logBuffer is a slog destination tests can read while it is written.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// freePort returns a port the kernel just chose as free on 127.0.0.1, for
// both TCP and UDP.
func freePort(t *testing.T) uint16 {
	t.Helper()
	for range 20 {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		pc, err := net.ListenPacket("udp4", fmt.Sprintf("127.0.0.1:%d", port))
		ln.Close()
		if err == nil {
			pc.Close()
			return uint16(port)
		}
	}
	t.Fatal("no port free for both TCP and UDP on 127.0.0.1")
	return 0
}

// devConfig is a development-mode Config on 127.0.0.1 with its defaults,
// as Run passes it to runDev.
func devConfig(t *testing.T, log io.Writer, ports ...Port) (cfg, set Config) {
	t.Helper()
	set = Config{
		Name:    "dev",
		Dev:     true,
		Ports:   ports,
		Addr:    netip.MustParseAddr("127.0.0.1"),
		Workers: 4,
		// Fields that mean nothing without a master: ignored, logged.
		WorkerUser: "nobody",
		Spares:     1,
		Backend:    BackendNFTables,
		Logger:     slog.New(slog.NewTextHandler(log, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	cfg = set.withDefaults()
	cfg.StopTimeout = 10 * time.Second
	if err := cfg.validate(); err != nil {
		t.Fatal(err)
	}
	return cfg, set
}

// startDev runs runDev on its own goroutine; the returned channel gets
// its result.
func startDev(t *testing.T, ctx context.Context, cfg, set *Config, work func(*Worker) error) <-chan error {
	t.Helper()
	t.Setenv(EnvDev, "")
	done := make(chan error, 1)
	go func() { done <- runDev(ctx, cfg, set, "Config.Dev", work) }()
	return done
}

func waitErr(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(30 * time.Second):
		t.Fatal("development mode did not stop within 30s")
		return nil
	}
}

// TestDevWorker: with Workers 4, development mode calls the work function
// once, as slot 0, on the public ports themselves (TCP and UDP); the
// handle counts connections, logs RequestRetire, and a done context stops
// it as a worker told to finish: Retired closed, Context cancelled,
// sockets closed.
func TestDevWorker(t *testing.T) {
	var log logBuffer
	port := freePort(t)
	cfg, set := devConfig(t, &log, Port{Public: port}, Port{Public: port, Proto: UDP})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	type call struct{ w *Worker }
	calls := make(chan call, 4)
	done := startDev(t, ctx, &cfg, &set, func(w *Worker) error {
		calls <- call{w}
		go func() {
			buf := make([]byte, 512)
			pc := w.PacketConn(port)
			for {
				n, addr, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo(append([]byte("udp "), buf[:n]...), addr)
			}
		}()
		ln := w.Listener(port)
		for {
			c, err := ln.Accept()
			if err != nil {
				return nil
			}
			go func() {
				defer c.Close()
				fmt.Fprintf(c, "slot=%d conns=%d\n", w.Slot(), w.Connections())
				io.Copy(io.Discard, c)
			}()
		}
	})

	var w *Worker
	select {
	case c := <-calls:
		w = c.w
	case err := <-done:
		t.Fatalf("runDev returned before calling work: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("work not called within 30s")
	}
	// No worker came before this one, and it serves every client.
	if b, err := io.ReadAll(w.Handoff()); len(b) != 0 || err != nil {
		t.Errorf("Handoff in development mode: %q, %v; want an empty state", b, err)
	}
	for _, a := range []string{"198.18.0.1", "198.18.0.2", "2001:db8::3"} {
		if !w.Owns(netip.MustParseAddr(a)) {
			t.Errorf("Owns(%s) false in development mode: the one worker serves every client", a)
		}
	}

	addr := fmt.Sprintf("127.0.0.1:%d", port)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != "slot=0 conns=1\n" {
		t.Errorf("TCP answer %q, %v; want slot=0 conns=1", line, err)
	}
	uc, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	uc.SetDeadline(time.Now().Add(20 * time.Second))
	uc.Write([]byte("ping"))
	buf := make([]byte, 64)
	if n, err := uc.Read(buf); err != nil || string(buf[:n]) != "udp ping" {
		t.Errorf("UDP answer %q, %v; want \"udp ping\"", buf[:n], err)
	}
	if got := w.Ports(); len(got) != 2 {
		t.Errorf("Ports() = %v, want both", got)
	}
	if w.Slot() != 0 || w.Generation() != 0 || w.Version() != "dev" {
		t.Errorf("Slot, Generation, Version = %d, %d, %q; want 0, 0, \"dev\"", w.Slot(), w.Generation(), w.Version())
	}
	w.Ready() // a no-op, safe
	w.SetStats(func() any { return 1 })
	w.RequestRetire("test asks")
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(log.String(), "RequestRetire ignored") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case <-w.Retired():
		t.Error("Retired closed by RequestRetire: development mode does not retire")
	default:
	}

	c.Close() // the drain waits for accepted connections
	cancel()
	if err := waitErr(t, done); err != nil {
		t.Errorf("runDev = %v, want nil after the context ended", err)
	}
	select {
	case <-w.Retired():
	default:
		t.Error("Retired not closed on stop")
	}
	if w.Context().Err() == nil {
		t.Error("Context not cancelled on stop")
	}
	if _, err := net.Dial("tcp", addr); err == nil {
		t.Error("public port still accepts after the stop")
	}
	if len(calls) != 0 {
		t.Errorf("work called %d more times, want once with Workers 4", len(calls))
	}
	out := log.String()
	for _, want := range []string{
		"level=WARN msg=\"development mode: the work function runs in this process, on the public ports; stickiness, deploys, health retirements and rules are off\"",
		"development mode runs one worker, slot 0, whatever Config.Workers says",
		"development mode ignores these Config fields\" cluster=dev dev=true fields=\"[Backend WorkerUser Spares]\"",
		"RequestRetire ignored",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if n := strings.Count(out, "stickiness, deploys"); n != 1 {
		t.Errorf("the warning is logged %d times, want once", n)
	}
}

// TestDevServeHTTP: Worker.ServeHTTP serves in development mode and
// returns nil once the mode stops.
func TestDevServeHTTP(t *testing.T) {
	var log logBuffer
	port := freePort(t)
	cfg, set := devConfig(t, &log, Port{Public: port})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	done := startDev(t, ctx, &cfg, &set, func(w *Worker) error {
		err := w.ServeHTTP(&http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(rw, "slot %d\n", w.Slot())
		})})
		served <- err
		return err
	})
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	var body []byte
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			body, _ = io.ReadAll(resp.Body)
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %v", url, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if string(body) != "slot 0\n" {
		t.Errorf("body %q, want \"slot 0\\n\"", body)
	}
	http.DefaultClient.CloseIdleConnections()
	cancel()
	if err := waitErr(t, done); err != nil {
		t.Errorf("runDev = %v, want nil", err)
	}
	if err := <-served; err != nil {
		t.Errorf("ServeHTTP = %v, want nil", err)
	}
}

// TestDevWorkReturns: a work function that returns while serving ends
// development mode, with its error.
func TestDevWorkReturns(t *testing.T) {
	var log logBuffer
	cfg, set := devConfig(t, &log, Port{Public: freePort(t)})
	boom := errors.New("boom")
	done := startDev(t, context.Background(), &cfg, &set, func(w *Worker) error { return boom })
	if err := waitErr(t, done); !errors.Is(err, boom) {
		t.Errorf("runDev = %v, want the work function's error", err)
	}
	if !strings.Contains(log.String(), "the work function returned; stopping") {
		t.Errorf("log does not say the function returned:\n%s", log.String())
	}
}

// TestDevBindErrors: a public port that cannot be bound is an error that
// names the port and the fix, and leaves nothing open.
func TestDevBindErrors(t *testing.T) {
	var log logBuffer
	port := freePort(t)
	busy, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	// UDP first, so the failure on TCP must close the UDP socket.
	cfg, set := devConfig(t, &log, Port{Public: port, Proto: UDP}, Port{Public: port})
	done := startDev(t, context.Background(), &cfg, &set, func(w *Worker) error {
		t.Error("work called although a port could not be bound")
		return nil
	})
	err = waitErr(t, done)
	want := fmt.Sprintf("ipcluster: development mode: listen on public port %d/tcp at 127.0.0.1:%d: ", port, port)
	if err == nil || !strings.HasPrefix(err.Error(), want) || !strings.Contains(err.Error(), "another process listens there") ||
		!errors.Is(err, syscall.EADDRINUSE) && runtime.GOOS != "windows" {
		t.Errorf("err = %v; want it to start %q, wrap EADDRINUSE and say another process listens", err, want)
	}
	if pc, err := net.ListenPacket("udp4", fmt.Sprintf("127.0.0.1:%d", port)); err != nil {
		t.Errorf("UDP port still bound after the failure: %v", err)
	} else {
		pc.Close()
	}

	// The kernel's refusals, as net.Listen reports them.
	opErr := func(errno syscall.Errno) error {
		return &net.OpError{Op: "listen", Net: "tcp", Err: os.NewSyscallError("bind", errno)}
	}
	for _, tc := range []struct {
		port uint16
		err  error
		want string
	}{
		{80, opErr(syscall.EACCES), "ports below 1024 need privilege: use a port of 1024 or more while developing (8080 for 80, 8443 for 443), " +
			"or on Linux grant the binary CAP_NET_BIND_SERVICE (sudo setcap cap_net_bind_service+ep <binary>) or lower net.ipv4.ip_unprivileged_port_start to 80"},
		{8080, opErr(syscall.EACCES), "the system refuses this port to this user"},
		{8080, opErr(syscall.EADDRNOTAVAIL), "Config.Addr is not an address of this machine"},
	} {
		err := devListenError(Port{Public: tc.port}, fmt.Sprintf(":%d", tc.port), tc.err)
		if !strings.Contains(err.Error(), fmt.Sprintf("public port %d/tcp at :%d", tc.port, tc.port)) || !strings.Contains(err.Error(), "; "+tc.want) || !errors.Is(err, tc.err) {
			t.Errorf("%d, %v: %v; want it to name the port, say %q and wrap the error", tc.port, tc.err, err, tc.want)
		}
	}
}

// TestDevInWorkerRefused: a process a master started as a worker never
// runs development mode (its master is in production mode).
func TestDevInWorkerRefused(t *testing.T) {
	var log logBuffer
	cfg, set := devConfig(t, &log, Port{Public: freePort(t)})
	t.Setenv(EnvWorker, "dev")
	err := runDev(context.Background(), &cfg, &set, "Config.Dev", func(*Worker) error { t.Error("work called"); return nil })
	if err == nil || !strings.Contains(err.Error(), "in a worker process its master started") {
		t.Errorf("err = %v, want a refusal", err)
	}
}
