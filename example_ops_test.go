//go:build linux

package ipcluster_test

import (
	"bufio"
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
)

// examples/echo, built and run as a master in a lab: one scrape of the
// master's /metrics carries the example's own echo_connections_total
// (its worker registry, through Worker.SetOperatorHandler) for every slot,
// labelled slot and pid.
func TestExampleEchoMetricsEverySlot(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 2})
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = "/usr/local/go/bin/go" // sudo's PATH may have none (test.sh does the same)
	}
	bin := filepath.Join(t.TempDir(), "echo")
	if out, err := exec.Command(goBin, "build", "-o", bin, "./examples/echo").CombinedOutput(); err != nil {
		t.Fatalf("go build ./examples/echo: %v\n%s", err, out)
	}
	addr := netip.AddrPortFrom(lab.ServerAddr4, httpPort)
	logf, err := os.Create(filepath.Join(t.TempDir(), "master.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	args := []string{"-workers", "2", "-port", "7000", "-addr", lab.ServerAddr4.String(), "-rundir", t.TempDir(), "-http", addr.String()}
	if b := os.Getenv(envTestBackend); b != "" {
		args = append(args, "-backend", b)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := lab.Server.Start(cmd); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("master log:\n%s", b)
		}
	})
	// One connection from each client address: slots 0 and 1.
	slots := map[string]bool{}
	deadline := time.Now().Add(15 * time.Second)
	for len(slots) < 2 && time.Now().Before(deadline) {
		for _, src := range lab.ClientAddrs4[:2] {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			conn, err := lab.Client.Dial(ctx, "tcp", src, netip.AddrPortFrom(lab.ServerAddr4, 7000))
			cancel()
			if err != nil {
				continue
			}
			_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
			line, _ := bufio.NewReader(conn).ReadString('\n')
			conn.Close()
			if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "slot=") {
				slots[strings.TrimPrefix(f[0], "slot=")] = true
			}
		}
		if len(slots) < 2 {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if len(slots) < 2 {
		t.Fatalf("reached slots %v of the example, want 0 and 1", slots)
	}
	s := waitMetrics(t, lab, addr, "echo_connections_total of both slots", func(s map[string]float64) bool {
		a, okA := sum(s, "echo_connections_total", `slot="0"`)
		b, okB := sum(s, "echo_connections_total", `slot="1"`)
		return okA && okB && a >= 1 && b >= 1
	})
	for series, v := range s {
		if strings.HasPrefix(series, "echo_connections_total") {
			t.Logf("%s %g", series, v)
			if !strings.Contains(series, `pid="`) {
				t.Errorf("%s has no pid label", series)
			}
		}
	}
}
