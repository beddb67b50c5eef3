//go:build linux

package netlab

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

func TestLabCreatesAndRemovesNamespaces(t *testing.T) {
	l := NewT(t, Options{Clients: 4})
	for _, ns := range []*NS{l.Server, l.Client} {
		if _, err := os.Stat(filepath.Join("/var/run/netns", ns.Name)); err != nil {
			t.Errorf("namespace %s not visible: %v", ns.Name, err)
		}
	}
	// The veth pair exists only inside the lab.
	for _, name := range []string{ServerLink, ClientLink} {
		if _, err := netlink.LinkByName(name); err == nil {
			t.Errorf("link %s exists in the test's own namespace", name)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	for _, ns := range []*NS{l.Server, l.Client} {
		if _, err := os.Stat(filepath.Join("/var/run/netns", ns.Name)); !os.IsNotExist(err) {
			t.Errorf("namespace %s left behind: %v", ns.Name, err)
		}
	}
}

func TestLabReachability(t *testing.T) {
	l := NewT(t, Options{})
	for _, tc := range []struct {
		from *NS
		srcs []netip.Addr
		dst  netip.Addr
	}{
		{l.Client, l.ClientAddrs4, l.ServerAddr4},
		{l.Client, l.ClientAddrs6, l.ServerAddr6},
		{l.Server, l.LocalAddrs4, l.ServerAddr4},
		{l.Server, l.LocalAddrs6, l.ServerAddr6},
	} {
		ln, err := l.Server.Listen("tcp", netip.AddrPortFrom(tc.dst, 0).String())
		if err != nil {
			t.Fatal(err)
		}
		dst := ln.Addr().(*net.TCPAddr).AddrPort()
		seen := make(chan netip.Addr, len(tc.srcs))
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				seen <- c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
				c.Close()
			}
		}()
		for _, src := range tc.srcs {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			c, err := tc.from.Dial(ctx, "tcp", src, dst)
			cancel()
			if err != nil {
				t.Fatalf("dial %s from %s: %v", dst, src, err)
			}
			c.Close()
			if got := <-seen; got != src {
				t.Errorf("server saw %s, want %s", got, src)
			}
		}
		ln.Close()
	}
	if len(l.ClientAddrs4) != 64 || len(l.ClientAddrs6) != 64 {
		t.Errorf("default lab has %d/%d client addresses, want 64", len(l.ClientAddrs4), len(l.ClientAddrs6))
	}
}

func TestStartRunsInsideNamespace(t *testing.T) {
	l := NewT(t, Options{Clients: 1})
	want, err := l.Server.Inode()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd := exec.Command("readlink", "/proc/self/ns/net")
	cmd.Stdout = &out
	if err := l.Server.Start(cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	got := strings.TrimSpace(out.String())
	if !strings.Contains(got, "["+itoa(want)+"]") {
		t.Errorf("child runs in %s, want inode %d", got, want)
	}
	var own syscall.Stat_t
	if err := syscall.Stat("/proc/self/ns/net", &own); err != nil {
		t.Fatal(err)
	}
	if own.Ino == want {
		t.Error("the test process itself is inside the lab")
	}
}

func TestSysctl(t *testing.T) {
	l := NewT(t, Options{Clients: 1})
	if err := l.Server.Sysctl("net/ipv4/ip_local_port_range", "20000\t30000"); err != nil {
		t.Fatal(err)
	}
	var got []byte
	err := l.Server.Do(func() error {
		var err error
		got, err = os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
		return err
	})
	if err != nil || strings.Join(strings.Fields(string(got)), " ") != "20000 30000" {
		t.Errorf("sysctl inside the lab: %q, %v", got, err)
	}
	host, _ := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if strings.Join(strings.Fields(string(host)), " ") == "20000 30000" {
		t.Error("sysctl leaked into the host namespace")
	}
	if err := l.Server.Sysctl("kernel/hostname", "x"); err == nil {
		t.Error("a non-net sysctl was accepted")
	}
}

func itoa(v uint64) string { return strconv.FormatUint(v, 10) }
