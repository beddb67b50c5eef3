//go:build linux

package ipcluster_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/procfs"
)

// devRun is the test binary re-executed as a program in development mode
// (helperMain, the "echo" scenario): as nobody inside a lab's server
// namespace when the test runs as root, else as the test's own user on
// 127.0.0.1.
type devRun struct {
	cmd  *exec.Cmd
	out  bytes.Buffer // its stdout and stderr
	done chan struct{}
	err  error
	uid  int // the uid it must run as
	// dial connects to its public port from a client: the lab's client
	// namespace, or this host's loopback.
	dial func(ctx context.Context, network string) (net.Conn, error)
}

// startDev re-executes the test binary with cfg in development mode;
// with env set (say IPCLUSTER_DEV=1) added to its environment. lab is
// nil without root.
func startDevRun(t *testing.T, lab *netlab.Lab, cfg specConfig, env ...string) *devRun {
	t.Helper()
	r := &devRun{done: make(chan struct{}), uid: os.Getuid()}
	s := spec{Config: cfg, Scenario: "echo"}
	// The helper refuses to run in any namespace but this one.
	var st syscall.Stat_t
	if err := syscall.Stat("/proc/self/ns/net", &st); err != nil {
		t.Fatal(err)
	}
	s.Netns = st.Ino
	if lab != nil {
		ino, err := lab.Server.Inode()
		if err != nil {
			t.Fatal(err)
		}
		s.Netns = ino
	}
	raw, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	// /proc/self/exe: the kernel resolves it for the child, so nobody
	// needs only the file, not go test's private build directory.
	r.cmd = exec.Command("/proc/self/exe", "-test.run=^$")
	r.cmd.Dir = "/"
	r.cmd.Env = append(append(os.Environ(), env...), envSpec+"="+string(raw))
	r.cmd.Stdout, r.cmd.Stderr = &r.out, &r.out
	start := r.cmd.Start
	if lab != nil {
		r.uid = nobodyUID
		r.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobodyUID, Gid: nobodyUID}}
		start = func() error { return lab.Server.Start(r.cmd) }
	}
	if err := start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		r.err = r.cmd.Wait()
		close(r.done)
	}()
	t.Cleanup(func() {
		r.stop(t)
		if t.Failed() {
			t.Logf("development-mode program's output:\n%s", r.out.String())
		}
	})
	return r
}

// stop sends SIGTERM and waits for the program to exit.
func (r *devRun) stop(t *testing.T) error {
	select {
	case <-r.done:
		return r.err
	default:
	}
	_ = r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.done:
	case <-time.After(20 * time.Second):
		_ = r.cmd.Process.Kill()
		<-r.done
		t.Errorf("development-mode program did not stop within 20s of SIGTERM")
	}
	return r.err
}

// wait waits for the program to exit by itself.
func (r *devRun) wait(t *testing.T) error {
	select {
	case <-r.done:
		return r.err
	case <-time.After(20 * time.Second):
		t.Fatal("development-mode program still running after 20s")
		return nil
	}
}

// connect dials the program's public port until it answers (it is
// starting), bounded by 20s, or the program exits.
func (r *devRun) connect(t *testing.T, network string) net.Conn {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := r.dial(ctx, network)
		cancel()
		if err == nil {
			return c
		}
		select {
		case <-r.done:
			t.Fatalf("development-mode program exited (%v) before it answered", r.err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("dial the development-mode program: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// devLab is a lab as root (its server namespace's unprivileged ports start
// at 1024, as Linux's default), or nil without root.
func devLab(t *testing.T) *netlab.Lab {
	if os.Geteuid() != 0 {
		return nil
	}
	lab := netlab.NewT(t, netlab.Options{Clients: 1})
	if err := lab.Server.Sysctl("net/ipv4/ip_unprivileged_port_start", "1024"); err != nil {
		t.Fatal(err)
	}
	return lab
}

// TestDevModeUnprivileged: with IPCLUSTER_DEV=1, a program runs its work
// function in its own process as an unprivileged user (nobody, in a lab,
// when the test runs as root), on its public TCP and UDP ports: a client
// gets an answer from slot 0, and SIGTERM stops it cleanly.
func TestDevModeUnprivileged(t *testing.T) {
	lab := devLab(t)
	cfg := specConfig{Name: "dev", Workers: 4, StopTimeout: 5 * time.Second}
	var dst netip.AddrPort
	if lab != nil {
		cfg.Addr = lab.ServerAddr4
		dst = netip.AddrPortFrom(lab.ServerAddr4, 7000)
	} else {
		// The host's namespace: loopback only, on a port the kernel
		// just gave out as free.
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dst = ln.Addr().(*net.TCPAddr).AddrPort()
		ln.Close()
		cfg.Addr = dst.Addr()
	}
	cfg.Ports = []ipcluster.Port{{Public: dst.Port()}, {Public: dst.Port(), Proto: ipcluster.UDP}}
	r := startDevRun(t, lab, cfg, ipcluster.EnvDev+"=1")
	r.dial = func(ctx context.Context, network string) (net.Conn, error) {
		if lab != nil {
			return lab.Client.Dial(ctx, network, lab.ClientAddrs4[0], dst)
		}
		var d net.Dialer
		return d.DialContext(ctx, network, dst.String())
	}

	c := r.connect(t, "tcp")
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	want := fmt.Sprintf("slot=0 pid=%d gen=0 remote=", r.cmd.Process.Pid)
	if err != nil || !strings.HasPrefix(line, want) {
		t.Fatalf("answer %q, %v; want one from the program itself (%q...)", line, err, want)
	}
	if lab != nil && !strings.Contains(line, "remote="+lab.ClientAddrs4[0].String()+":") {
		t.Errorf("answer %q: the worker does not see the client's own address %s", line, lab.ClientAddrs4[0])
	}
	st, err := procfs.ReadStatus(r.cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if st.UID != [4]int{r.uid, r.uid, r.uid, r.uid} || st.CapEff != 0 && r.uid != 0 {
		t.Errorf("program runs as uids %v with effective capabilities %#x, want uid %d and none", st.UID, st.CapEff, r.uid)
	}

	uc := r.connect(t, "udp")
	defer uc.Close()
	_ = uc.SetDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 512)
	var n int
	for range 20 { // a datagram may be lost; this is bounded
		if _, err := uc.Write([]byte("ping\n")); err != nil {
			t.Fatal(err)
		}
		_ = uc.SetReadDeadline(time.Now().Add(time.Second))
		if n, err = uc.Read(buf); err == nil {
			break
		}
	}
	if !strings.HasPrefix(string(buf[:n]), "slot=0 ") {
		t.Errorf("UDP answer %q, %v; want one from slot 0", buf[:n], err)
	}

	c.Close()
	if err := r.stop(t); err != nil {
		t.Errorf("program exited with %v after SIGTERM, want 0", err)
	}
	out := r.out.String()
	for _, want := range []string{
		`level=WARN msg="development mode: the work function runs in this process, on the public ports; stickiness, deploys, health retirements and rules are off" cluster=dev dev=true by="IPCLUSTER_DEV=1"`,
		"development mode runs one worker, slot 0, whatever Config.Workers says",
		"development mode stopping",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
}

// TestDevModeLowPort: as nobody, a public port below 1024 cannot be bound
// (Config.Dev this time): the program fails with an error that names the
// port and the fix. Root only: it needs a lab to know the namespace's
// ip_unprivileged_port_start.
func TestDevModeLowPort(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a lab whose ip_unprivileged_port_start is known; TestDevBindErrors checks the text without")
	}
	lab := devLab(t)
	cfg := specConfig{Name: "dev", Dev: true, Addr: lab.ServerAddr4, Ports: []ipcluster.Port{{Public: 80}}}
	r := startDevRun(t, lab, cfg)
	if err := r.wait(t); err == nil {
		t.Fatal("program on port 80 as nobody exited 0, want a failure")
	}
	want := fmt.Sprintf("helper: ipcluster: development mode: listen on public port 80/tcp at %s:80: listen tcp4 %s:80: bind: permission denied; ports below 1024 need privilege: use a port of 1024 or more while developing",
		lab.ServerAddr4, lab.ServerAddr4)
	if !strings.Contains(r.out.String(), want) {
		t.Errorf("output lacks %q:\n%s", want, r.out.String())
	}
}
