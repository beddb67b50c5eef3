//go:build linux

package ipcluster_test

import (
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// runHelper runs a master for cfg in the lab to completion and returns its
// exit error and output.
func runHelper(t *testing.T, lab *netlab.Lab, cfg specConfig, prepare func(*exec.Cmd)) (string, error) {
	t.Helper()
	c := &cluster{t: t, lab: lab, done: make(chan struct{})}
	ino, err := lab.Server.Inode()
	if err != nil {
		t.Fatal(err)
	}
	c.spec = spec{Config: cfg, Scenario: "echo", Netns: ino}
	c.start(prepare)
	if err := c.wait(20 * time.Second); err != nil && c.cmd.ProcessState == nil {
		_ = c.cmd.Process.Kill()
		t.Fatalf("bad config did not make the master exit: %v\n%s", err, c.log())
	}
	return c.log(), c.err
}

// Each bad Config is refused with its error, and leaves no rule, run
// directory or process behind.
func TestBadConfigLeavesNothing(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 1})
	good := specConfig{Name: "t", Workers: 2, Ports: tcpPorts(8080)}
	nobodyBin := copyTestBinary(t)
	for _, tc := range []struct {
		name, want string
		edit       func(*specConfig)
		prepare    func(*exec.Cmd)
	}{
		{name: "workers", want: "Config.Workers", edit: func(c *specConfig) { c.Workers = 6 }},
		{name: "no ports", want: "Config.Ports", edit: func(c *specConfig) { c.Ports = nil }},
		{name: "duplicate port", want: "Config.Ports[1].Public", edit: func(c *specConfig) { c.Ports = tcpPorts(80, 80) }},
		{name: "name", want: "Config.Name", edit: func(c *specConfig) { c.Name = "name-that-is-too-long" }},
		{name: "addr", want: "Config.Addr", edit: func(c *specConfig) { c.Addr = netip.MustParseAddr("224.1.1.1") }},
		{name: "prefix", want: "Config.IPv6SlotPrefix", edit: func(c *specConfig) { c.IPv6SlotPrefix = 200 }},
		{name: "backend", want: "Config.Backend", edit: func(c *specConfig) { c.Backend = "ipfw" }},
		{name: "http addr", want: "Config.HTTPAddr", edit: func(c *specConfig) { c.HTTPAddr = "localhost:9100" }},
		{name: "heap dir", want: "Config.HeapProfileDir: open the heap snapshot directory", edit: func(c *specConfig) {
			c.HeapProfileDir = os.Args[0] // a file
		}},
		{name: "no binaries", want: "iptables-restore not found", edit: func(c *specConfig) { c.Backend = "iptables" }, prepare: func(cmd *exec.Cmd) {
			cmd.Env = append(cmd.Env, "PATH="+t.TempDir())
		}},
		{name: "no privilege", want: "CAP_NET_ADMIN", prepare: func(cmd *exec.Cmd) {
			cmd.Path = nobodyBin
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			cfg.RunDir = filepath.Join(t.TempDir(), "run")
			if tc.edit != nil {
				tc.edit(&cfg)
			}
			out, err := runHelper(t, lab, cfg, tc.prepare)
			if err == nil {
				t.Fatalf("master accepted a bad config:\n%s", out)
			}
			if !strings.Contains(out, tc.want) {
				t.Errorf("error does not name %q:\n%s", tc.want, out)
			}
			for _, v6 := range []bool{false, true} {
				if o := iptablesLeft(t, lab, v6, "IPC-"); o != "" {
					t.Errorf("rules written for a bad config:\n%s", o)
				}
			}
			if _, err := os.Stat(cfg.RunDir); !os.IsNotExist(err) {
				t.Errorf("run directory created for a bad config: %v", err)
			}
			if strings.Contains(out, "worker ready") || strings.Contains(out, "spawned") {
				t.Errorf("workers started for a bad config:\n%s", out)
			}
		})
	}
}

// copyTestBinary puts the test binary where an unprivileged user can run it.
func copyTestBinary(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ipcluster-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	path := filepath.Join(dir, "ipcluster.test")
	dst, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// Hostile or broken peers on the control socket lose their own connection
// and nothing else.
func TestControlSocketRejectsBadPeers(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	c := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4})
	st := c.waitReady()
	fi, err := os.Stat(c.socket)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket mode %v, want 0600", fi.Mode().Perm())
	}

	refusal := func(t *testing.T, hello proto.Hello) string {
		t.Helper()
		conn, err := net.Dial("unix", c.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		if err := proto.Write(conn, proto.TypeHello, &hello); err != nil {
			t.Fatal(err)
		}
		m, err := proto.NewReader(conn).Read()
		if err != nil {
			t.Fatalf("no answer to hello: %v", err)
		}
		r, ok := m.Body.(*proto.Refuse)
		if !ok {
			t.Fatalf("hello %+v accepted (%s)", hello, m.Type)
		}
		return r.Reason
	}
	t.Run("version mismatch", func(t *testing.T) {
		reason := refusal(t, proto.Hello{Version: 99, Role: proto.RoleClient, Cluster: "t", PID: os.Getpid()})
		if !strings.Contains(reason, "version 99") || !strings.Contains(reason, "version "+strconv.Itoa(proto.Version)) {
			t.Errorf("refusal %q does not name both versions", reason)
		}
	})
	t.Run("forged pid", func(t *testing.T) {
		reason := refusal(t, proto.Hello{Version: proto.Version, Role: proto.RoleWorker, Cluster: "t", PID: 1})
		if !strings.Contains(reason, "kernel says") {
			t.Errorf("refusal %q", reason)
		}
	})
	t.Run("unknown protocol", func(t *testing.T) {
		reason := refusal(t, proto.Hello{Version: proto.Version, Role: proto.RoleWorker, Cluster: "t", PID: os.Getpid(),
			Ports: []proto.Port{{Public: 8080, Proto: "sctp", Worker: 40000}}})
		if !strings.Contains(reason, `protocol "sctp"`) {
			t.Errorf("refusal %q", reason)
		}
	})
	t.Run("no protocol", func(t *testing.T) {
		// A version 1 port map: no protocol, so TCP and UDP ports of one
		// number cannot be told apart.
		reason := refusal(t, proto.Hello{Version: proto.Version, Role: proto.RoleWorker, Cluster: "t", PID: os.Getpid(),
			Ports: []proto.Port{{Public: 8080, Worker: 40000}}})
		if !strings.Contains(reason, `protocol ""`) {
			t.Errorf("refusal %q", reason)
		}
	})
	t.Run("wrong cluster", func(t *testing.T) {
		reason := refusal(t, proto.Hello{Version: proto.Version, Role: proto.RoleClient, Cluster: "other", PID: os.Getpid()})
		if !strings.Contains(reason, `"other"`) {
			t.Errorf("refusal %q", reason)
		}
	})
	closedByMaster := func(t *testing.T, payload []byte) {
		t.Helper()
		conn, err := net.Dial("unix", c.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_, _ = conn.Write(payload)
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadAll(conn); err != nil {
			t.Errorf("master did not close the connection: %v", err)
		}
	}
	t.Run("garbage", func(t *testing.T) { closedByMaster(t, []byte("\x00\x00\x00\x05hello")) })
	t.Run("oversized", func(t *testing.T) { closedByMaster(t, []byte("\x7f\xff\xff\xff")) })
	t.Run("empty frame", func(t *testing.T) { closedByMaster(t, []byte("\x00\x00\x00\x00")) })

	// The cluster did not notice.
	st2, err := c.status()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(workerPIDs(st), workerPIDs(st2)) || !st2.Ready {
		t.Errorf("bad peers disturbed the cluster: %v → %v", workerPIDs(st), workerPIDs(st2))
	}
	checkSticky(t, lab.Client, lab.ClientAddrs4, lab.ServerAddr4, []uint16{8080}, 2, 32, 1)
}
