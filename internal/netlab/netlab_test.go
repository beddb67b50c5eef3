//go:build linux

package netlab

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// nsInode returns the inode of the network namespace at p, e.g.
// /proc/thread-self/ns/net.
func nsInode(t testing.TB, p string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestNewAndClose(t *testing.T) {
	l := NewT(t, Options{Clients: 4})
	if l.Server.Name == l.Client.Name {
		t.Fatalf("server and client share the name %s", l.Server.Name)
	}
	for _, ns := range []*NS{l.Server, l.Client} {
		if !validName(ns.Name) {
			t.Errorf("name %q is not ipct-<8 hex digits>", ns.Name)
		}
		ino, err := ns.Inode()
		if err != nil {
			t.Fatal(err)
		}
		// The name leads to the namespace itself (a symlink to its bind
		// mount).
		if got := nsInode(t, filepath.Join("/var/run/netns", ns.Name)); got != ino {
			t.Errorf("/var/run/netns/%s has inode %d, want the namespace's %d", ns.Name, got, ino)
		}
		if _, err := exec.LookPath("ip"); err == nil {
			out, err := exec.Command("ip", "netns", "list").CombinedOutput()
			if err != nil || !slices.ContainsFunc(strings.Split(string(out), "\n"), func(line string) bool {
				f := strings.Fields(line)
				return len(f) > 0 && f[0] == ns.Name
			}) {
				t.Errorf("ip netns list does not show %s: %q, %v", ns.Name, out, err)
			}
			out, err = exec.Command("ip", "netns", "exec", ns.Name, "readlink", "/proc/self/ns/net").CombinedOutput()
			if want := fmt.Sprintf("net:[%d]", ino); err != nil || strings.TrimSpace(string(out)) != want {
				t.Errorf("ip netns exec %s: %q, %v; want %q", ns.Name, out, err, want)
			}
		}
	}

	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	for _, ns := range []*NS{l.Server, l.Client} {
		for _, dir := range []string{"/var/run/netns", mountDir} {
			if _, err := os.Lstat(filepath.Join(dir, ns.Name)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("namespace %s left behind in %s: %v", ns.Name, dir, err)
			}
		}
		if err := ns.Do(func() error { return nil }); !errors.Is(err, errClosed) {
			t.Errorf("Do after Close: %v, want errClosed", err)
		}
		if _, err := ns.Inode(); !errors.Is(err, errClosed) {
			t.Errorf("Inode after Close: %v, want errClosed", err)
		}
	}
}

func TestOptions(t *testing.T) {
	for _, n := range []int{-1, maxClients + 1} {
		if l, err := New(Options{Clients: n}); err == nil {
			l.Close()
			t.Errorf("New accepted Clients=%d", n)
		}
	}
	var zero NS
	if err := zero.Do(func() error { return nil }); !errors.Is(err, errClosed) {
		t.Errorf("Do on a zero NS: %v, want errClosed", err)
	}
}

// TestIsolation checks that the lab is wired as documented, and only
// inside its own namespaces.
func TestIsolation(t *testing.T) {
	// The host may well use the same ranges (fd00::/64 is a common ULA
	// choice), so compare its interfaces before and after instead of
	// looking for the lab's addresses in it.
	hostBefore := hostInterfaces(t)
	l := NewT(t, Options{})
	if after := hostInterfaces(t); !slices.Equal(after, hostBefore) {
		t.Errorf("the test's own namespace changed:\nbefore %v\nafter  %v", hostBefore, after)
	}
	for _, name := range []string{ServerLink, ClientLink} {
		if _, err := netlink.LinkByName(name); err == nil {
			t.Errorf("link %s exists in the test's own namespace", name)
		}
	}

	want := func(list []netip.Addr, bits4, bits6 int) []string {
		var s []string
		for _, a := range list {
			bits := bits4
			if a.Is6() {
				bits = bits6
			}
			s = append(s, netip.PrefixFrom(a, bits).String())
		}
		return s
	}
	for _, tc := range []struct {
		ns        *NS
		link      string
		absent    string
		addrs     []string
		permNeigh int // permanent neighbour entries on link
	}{
		{l.Server, ServerLink, ClientLink, want([]netip.Addr{l.ServerAddr4, l.ServerAddr6}, 15, 32), 2 * len(l.ClientAddrs4)},
		{l.Server, "lo", "", append(want([]netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()}, 8, 128), want(append(slices.Clone(l.LocalAddrs4), l.LocalAddrs6...), 32, 128)...), 0},
		{l.Client, ClientLink, ServerLink, want(append(slices.Clone(l.ClientAddrs4), l.ClientAddrs6...), 15, 32), 2},
		{l.Client, "lo", "", want([]netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()}, 8, 128), 0},
	} {
		h, err := tc.ns.netlink()
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		link, err := h.LinkByName(tc.link)
		if err != nil {
			t.Fatalf("%s in %s: %v", tc.link, tc.ns.Name, err)
		}
		if link.Attrs().Flags&net.FlagUp == 0 {
			t.Errorf("%s in %s is down", tc.link, tc.ns.Name)
		}
		if tc.absent != "" {
			if _, err := h.LinkByName(tc.absent); err == nil {
				t.Errorf("%s exists in %s", tc.absent, tc.ns.Name)
			}
		}
		addrs, err := h.AddrList(link, netlink.FAMILY_ALL)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, a := range addrs {
			if a.IP.IsLinkLocalUnicast() {
				continue // the kernel's own fe80::
			}
			p, _ := netip.AddrFromSlice(a.IP)
			bits, _ := a.Mask.Size()
			got = append(got, netip.PrefixFrom(p.Unmap(), bits).String())
		}
		slices.Sort(got)
		w := slices.Clone(tc.addrs)
		slices.Sort(w)
		if !slices.Equal(got, w) {
			t.Errorf("%s in %s has addresses\n%v\nwant\n%v", tc.link, tc.ns.Name, got, w)
		}
		neighs, err := h.NeighList(link.Attrs().Index, netlink.FAMILY_ALL)
		if err != nil {
			t.Fatal(err)
		}
		perm := 0
		for _, n := range neighs {
			if n.State&netlink.NUD_PERMANENT != 0 {
				perm++
			}
		}
		if perm != tc.permNeigh {
			t.Errorf("%s in %s has %d permanent neighbour entries, want %d", tc.link, tc.ns.Name, perm, tc.permNeigh)
		}
	}
}

// hostInterfaces lists the interfaces and addresses of the test's own
// namespace, sorted.
func hostInterfaces(t *testing.T) []string {
	t.Helper()
	ifaces, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	var s []string
	for _, ifc := range ifaces {
		s = append(s, ifc.Name)
		addrs, err := ifc.Addrs()
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range addrs {
			s = append(s, ifc.Name+" "+a.String())
		}
	}
	slices.Sort(s)
	return s
}

func TestAddressLayout(t *testing.T) {
	l := NewT(t, Options{Clients: maxClients})
	for i, tc := range []struct {
		got  netip.Addr
		want string
	}{
		{l.ServerAddr4, "198.18.0.1"},
		{l.ServerAddr6, "fd00::1"},
		{l.ClientAddrs4[0], "198.18.1.0"},
		{l.ClientAddrs4[255], "198.18.1.255"},
		{l.ClientAddrs4[256], "198.18.2.0"},
		{l.ClientAddrs4[1023], "198.18.4.255"},
		{l.ClientAddrs6[0], "fd00::2"},
		{l.ClientAddrs6[1], "fd00:0:0:1::2"},
		{l.ClientAddrs6[1023], "fd00:0:0:3ff::2"},
		{l.LocalAddrs4[0], "198.19.0.0"},
		{l.LocalAddrs4[15], "198.19.0.15"},
		{l.LocalAddrs6[0], "fd01::1"},
		{l.LocalAddrs6[15], "fd01:0:0:f::1"},
	} {
		if tc.got.String() != tc.want {
			t.Errorf("case %d: %s, want %s", i, tc.got, tc.want)
		}
	}
	if len(l.ClientAddrs4) != maxClients || len(l.ClientAddrs6) != maxClients || len(l.LocalAddrs4) != 16 || len(l.LocalAddrs6) != 16 {
		t.Errorf("got %d/%d client and %d/%d local addresses", len(l.ClientAddrs4), len(l.ClientAddrs6), len(l.LocalAddrs4), len(l.LocalAddrs6))
	}
	bench4 := netip.MustParsePrefix("198.18.0.0/15")
	ula := netip.MustParsePrefix("fd00::/8")
	seen := map[netip.Addr]bool{}
	for _, list := range [][]netip.Addr{{l.ServerAddr4, l.ServerAddr6}, l.ClientAddrs4, l.ClientAddrs6, l.LocalAddrs4, l.LocalAddrs6} {
		for _, a := range list {
			if !bench4.Contains(a) && !ula.Contains(a) {
				t.Errorf("%s is outside 198.18.0.0/15 and fd00::/8", a)
			}
			if seen[a] {
				t.Errorf("%s is used twice", a)
			}
			seen[a] = true
		}
	}
	// Every address of the biggest lab is reachable at once.
	checkReachable(t, l.Client, l.Server, l.ClientAddrs4, l.ServerAddr4, 16)
	checkReachable(t, l.Client, l.Server, l.ClientAddrs6, l.ServerAddr6, 16)
}

func TestReachability(t *testing.T) {
	l := NewT(t, Options{})
	if len(l.ClientAddrs4) != defaultClients || len(l.ClientAddrs6) != defaultClients {
		t.Fatalf("default lab has %d/%d client addresses, want %d", len(l.ClientAddrs4), len(l.ClientAddrs6), defaultClients)
	}
	t.Run("ipv4", func(t *testing.T) { checkReachable(t, l.Client, l.Server, l.ClientAddrs4, l.ServerAddr4, 1) })
	t.Run("ipv6", func(t *testing.T) { checkReachable(t, l.Client, l.Server, l.ClientAddrs6, l.ServerAddr6, 1) })
	t.Run("same-host-ipv4", func(t *testing.T) { checkReachable(t, l.Server, l.Server, l.LocalAddrs4, l.ServerAddr4, 1) })
	t.Run("same-host-ipv6", func(t *testing.T) { checkReachable(t, l.Server, l.Server, l.LocalAddrs6, l.ServerAddr6, 1) })
}

// checkReachable listens in to on dst and dials it from each of srcs in
// from, parallel at a time, checking that the server sees the right source.
func checkReachable(t *testing.T, from, to *NS, srcs []netip.Addr, dst netip.Addr, parallel int) {
	t.Helper()
	ln, err := to.Listen("tcp", netip.AddrPortFrom(dst, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// Each connection sends the source it was dialed from; the server
	// answers with the remote address it sees.
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				io.Copy(io.Discard, io.LimitReader(c, 1)) // wait for the client
				fmt.Fprintln(c, c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap())
			}()
		}
	}()
	addr := ln.Addr().(*net.TCPAddr).AddrPort()
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for _, src := range srcs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			// Generous: a working lab answers in well under a
			// millisecond; this only bounds a broken one.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := from.Dial(ctx, "tcp", src, addr)
			if err != nil {
				t.Errorf("dial %s from %s: %v", addr, src, err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write([]byte{1}); err != nil {
				t.Errorf("%s: %v", src, err)
				return
			}
			line, err := bufio.NewReader(c).ReadString('\n')
			if got := strings.TrimSpace(line); err != nil || got != src.String() {
				t.Errorf("server saw %q (%v), want %s", got, err, src)
			}
		})
	}
	wg.Wait()
}

func TestDial(t *testing.T) {
	l := NewT(t, Options{Clients: 2})

	t.Run("udp", func(t *testing.T) {
		var pc net.PacketConn
		err := l.Server.Do(func() error {
			var err error
			pc, err = net.ListenPacket("udp", netip.AddrPortFrom(l.ServerAddr6, 0).String())
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		src := l.ClientAddrs6[1]
		c, err := l.Client.Dial(context.Background(), "udp", src, pc.LocalAddr().(*net.UDPAddr).AddrPort())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// UDP may lose a datagram (a busy CI machine drops from a full
		// queue): send until one arrives, for at most 5s.
		var from net.Addr
		for deadline := time.Now().Add(5 * time.Second); from == nil; {
			if time.Now().After(deadline) {
				t.Fatal("no datagram arrived within 5s")
			}
			if _, err := c.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			pc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			if _, addr, err := pc.ReadFrom(make([]byte, 1)); err == nil {
				from = addr
			}
		}
		if got := from.(*net.UDPAddr).AddrPort().Addr(); got != src {
			t.Errorf("datagram from %s, want %s", got, src)
		}
	})

	t.Run("kernel-chooses-source", func(t *testing.T) {
		ln, err := l.Server.Listen("tcp4", netip.AddrPortFrom(l.ServerAddr4, 0).String())
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		c, err := l.Client.Dial(context.Background(), "tcp4", netip.Addr{}, ln.Addr().(*net.TCPAddr).AddrPort())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if got := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr(); !slices.Contains(l.ClientAddrs4, got) {
			t.Errorf("connected from %s, not a client address", got)
		}
	})

	t.Run("context", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if c, err := l.Client.Dial(ctx, "tcp", l.ClientAddrs4[0], netip.AddrPortFrom(l.ServerAddr4, 9)); err == nil {
			c.Close()
			t.Error("dial with a cancelled context succeeded")
		}
		// Nobody has 198.18.0.99: the SYN waits for an ARP reply that
		// never comes, until the deadline.
		ctx, cancel = context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		start := time.Now()
		c, err := l.Client.Dial(ctx, "tcp", l.ClientAddrs4[0], netip.MustParseAddrPort("198.18.0.99:9"))
		if err == nil {
			c.Close()
			t.Fatal("dial to an absent host succeeded")
		}
		// Either the context's error or the socket's own deadline
		// (set from the context's), whichever fires first.
		var ne net.Error
		if !errors.Is(err, context.DeadlineExceeded) && !(errors.As(err, &ne) && ne.Timeout()) {
			t.Errorf("dial to an absent host: %v, want a timeout", err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("dial took %v despite a 200ms deadline", d)
		}
	})

	t.Run("unsupported", func(t *testing.T) {
		if _, err := l.Client.Dial(context.Background(), "unix", netip.Addr{}, netip.AddrPortFrom(l.ServerAddr4, 9)); err == nil {
			t.Error("unix dial accepted")
		}
	})
}

func TestDo(t *testing.T) {
	l := NewT(t, Options{Clients: 1})
	own := nsInode(t, "/proc/self/ns/net")
	want, err := l.Client.Inode()
	if err != nil {
		t.Fatal(err)
	}

	var got uint64
	if err := l.Client.Do(func() error {
		got = nsInode(t, "/proc/thread-self/ns/net")
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Errorf("Do ran in namespace %d, want %d", got, want)
	}

	sentinel := errors.New("sentinel")
	if err := l.Client.Do(func() error { return sentinel }); !errors.Is(err, sentinel) {
		t.Errorf("Do returned %v, want fn's error", err)
	}
	if err := l.Client.Do(func() error { runtime.Goexit(); return nil }); !errors.Is(err, errGoexit) {
		t.Errorf("Do after Goexit returned %v, want errGoexit", err)
	}
	func() {
		defer func() {
			if v := recover(); v != "boom" {
				t.Errorf("recovered %v, want the panic from fn", v)
			}
		}()
		l.Client.Do(func() error { panic("boom") })
		t.Error("Do did not re-panic")
	}()

	// Switch many threads in and out concurrently, then check that no
	// thread the runtime hands out is still in the lab.
	var wg sync.WaitGroup
	for range 64 {
		wg.Go(func() {
			if err := l.Client.Do(func() error { time.Sleep(time.Millisecond); return nil }); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	var mu sync.Mutex
	leaked := 0
	release := make(chan struct{})
	for range 64 {
		wg.Go(func() {
			runtime.LockOSThread() // hold distinct threads at once
			defer runtime.UnlockOSThread()
			var st unix.Stat_t
			if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
				t.Error(err)
			} else if st.Ino != own {
				mu.Lock()
				leaked++
				mu.Unlock()
			}
			<-release
		})
	}
	close(release)
	wg.Wait()
	if leaked > 0 {
		t.Errorf("%d threads were left outside the test's namespace", leaked)
	}
}

func TestStart(t *testing.T) {
	l := NewT(t, Options{Clients: 1})
	own := nsInode(t, "/proc/self/ns/net")
	for _, ns := range []*NS{l.Server, l.Client} {
		want, err := ns.Inode()
		if err != nil {
			t.Fatal(err)
		}
		if want == own {
			t.Fatalf("%s is the test's own namespace", ns.Name)
		}
		var out bytes.Buffer
		cmd := exec.Command("/bin/sh", "-c", "readlink /proc/self/ns/net")
		cmd.Stdout = &out
		cmd.Stderr = os.Stderr
		if err := ns.Start(cmd); err != nil {
			t.Fatal(err)
		}
		if err := cmd.Wait(); err != nil {
			t.Fatal(err)
		}
		if got, w := strings.TrimSpace(out.String()), fmt.Sprintf("net:[%d]", want); got != w {
			t.Errorf("child of %s runs in %s, want %s", ns.Name, got, w)
		}
	}
	// The test itself never moved.
	if got := nsInode(t, "/proc/thread-self/ns/net"); got != own {
		t.Errorf("test thread is in namespace %d, the process in %d", got, own)
	}
}

func TestSysctl(t *testing.T) {
	l := NewT(t, Options{Clients: 1})
	const name = "net/ipv4/ip_local_port_range"
	host, err := os.ReadFile("/proc/sys/" + name)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(strings.Fields(string(host)), " ") == "20000 30000" {
		t.Skip("the host already uses the test value")
	}
	if err := l.Server.Sysctl(name, "20000 30000"); err != nil {
		t.Fatal(err)
	}
	read := func(ns *NS) string {
		var b []byte
		if err := ns.Do(func() error {
			var err error
			b, err = os.ReadFile("/proc/sys/" + name)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return strings.Join(strings.Fields(string(b)), " ")
	}
	if got := read(l.Server); got != "20000 30000" {
		t.Errorf("in the server namespace: %q", got)
	}
	if got := read(l.Client); got == "20000 30000" {
		t.Error("the value leaked into the client namespace")
	}
	if now, _ := os.ReadFile("/proc/sys/" + name); !bytes.Equal(now, host) {
		t.Errorf("the value leaked into the host: %q", now)
	}
	for _, bad := range []string{"kernel/hostname", "net/../kernel/hostname", "/proc/sys/net/ipv4/ip_forward", "net/", "net//ipv4/ip_forward", "vm/swappiness", ""} {
		if err := l.Server.Sysctl(bad, "1"); err == nil {
			t.Errorf("Sysctl accepted %q", bad)
		}
	}
	if err := l.Server.Sysctl("net/ipv4/no_such_sysctl", "1"); err == nil {
		t.Error("Sysctl wrote a sysctl that does not exist")
	}
}

// helperEnv makes the test binary, re-executed by TestWatchdog, run
// TestWatchdogHelper for real.
const helperEnv = "NETLAB_TEST_WATCHDOG_HELPER"

// TestWatchdogHelper creates labs, prints their names and sleeps until it
// is killed. It does nothing in a normal run. With helperEnv=restart, it
// kills its watchdog between two labs, so that the second lab's watchdog
// must look after both.
func TestWatchdogHelper(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		t.Skip("helper for TestWatchdog")
	}
	labs := 1
	if mode == "restart" {
		labs = 2
	}
	names := []string{"names"}
	for i := range labs {
		if i > 0 {
			guard.mu.Lock()
			p := guard.proc
			guard.mu.Unlock()
			if err := p.Kill(); err != nil {
				t.Fatal(err)
			}
			// Reaped by startWatchdog's goroutine; after that, Signal
			// reports the process done.
			for p.Signal(syscall.Signal(0)) == nil {
				time.Sleep(time.Millisecond)
			}
		}
		l, err := New(Options{Clients: 1})
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, l.Server.Name, l.Client.Name)
	}
	fmt.Println(strings.Join(names, " "))
	time.Sleep(time.Hour) // until killed
}

// TestWatchdog kills a process that has labs open and checks that their
// namespaces are removed anyway.
func TestWatchdog(t *testing.T) {
	if why := missingPrivileges(); why != "" {
		t.Skip(why)
	}
	if os.Getenv(helperEnv) != "" {
		t.Skip("in the helper")
	}
	for _, tc := range []struct {
		mode string
		sig  syscall.Signal
	}{{"once", syscall.SIGKILL}, {"once", syscall.SIGINT}, {"restart", syscall.SIGKILL}} {
		t.Run(tc.mode+"-"+unix.SignalName(tc.sig), func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestWatchdogHelper$", "-test.count=1")
			cmd.Env = append(os.Environ(), helperEnv+"="+tc.mode)
			cmd.Stderr = os.Stderr
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			killed := false
			defer func() {
				if !killed {
					cmd.Process.Kill()
					cmd.Wait()
				}
			}()
			line, err := bufio.NewReader(stdout).ReadString('\n')
			names := strings.Fields(line)
			if err != nil || len(names) < 3 || names[0] != "names" {
				t.Fatalf("helper said %q, %v", line, err)
			}
			names = names[1:]
			for _, name := range names {
				if !validName(name) {
					t.Fatalf("helper said %q", line)
				}
				if _, err := os.Stat(filepath.Join(netnsDir, name)); err != nil {
					t.Fatalf("helper's namespace: %v", err)
				}
			}
			if err := cmd.Process.Signal(tc.sig); err != nil {
				t.Fatal(err)
			}
			err = cmd.Wait()
			killed = true
			if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != tc.sig {
				t.Fatalf("helper ended with %v, want killed by %v", err, tc.sig)
			}
			const patience = 10 * time.Second
			deadline := time.Now().Add(patience)
			for _, name := range names {
				for {
					_, err := os.Lstat(filepath.Join(netnsDir, name))
					if errors.Is(err, os.ErrNotExist) {
						break
					}
					if time.Now().After(deadline) {
						removeNamed(name) // the watchdog's job, so nothing is left
						t.Fatalf("%s still exists %v after its process was killed: %v", name, patience, err)
					}
					time.Sleep(10 * time.Millisecond)
				}
			}
		})
	}
}

// TestConcurrent creates labs in parallel and uses a namespace while it is
// being closed.
func TestConcurrent(t *testing.T) {
	labs := make([]*Lab, 6)
	labs[0] = NewT(t, Options{Clients: 4}) // skips without privileges
	errs := make([]error, len(labs))
	var wg sync.WaitGroup
	for i := 1; i < len(labs); i++ {
		wg.Go(func() { labs[i], errs[i] = New(Options{Clients: 4}) })
	}
	wg.Wait()
	for i, l := range labs {
		if errs[i] != nil {
			t.Error(errs[i])
		} else if i > 0 {
			t.Cleanup(func() {
				if err := l.Close(); err != nil {
					t.Error(err)
				}
			})
		}
	}
	if t.Failed() {
		return
	}
	seen := map[string]bool{}
	for _, l := range labs {
		for _, ns := range []*NS{l.Server, l.Client} {
			if seen[ns.Name] {
				t.Errorf("name %s used twice", ns.Name)
			}
			seen[ns.Name] = true
		}
	}

	l := labs[0]
	want, err := l.Client.Inode()
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	for range 8 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				var got uint64
				err := l.Client.Do(func() error {
					got = nsInode(t, "/proc/thread-self/ns/net")
					return nil
				})
				if errors.Is(err, errClosed) {
					continue
				}
				if err != nil || got != want {
					t.Errorf("Do during Close: namespace %d, %v; want %d", got, err, want)
					return
				}
			}
		})
	}
	time.Sleep(10 * time.Millisecond)
	if err := l.Close(); err != nil {
		t.Error(err)
	}
	time.Sleep(10 * time.Millisecond)
	close(stop)
	wg.Wait()
}

func TestValidName(t *testing.T) {
	for name, want := range map[string]bool{
		"ipct-0123abcd":  true,
		"ipct-0123ABCD":  false,
		"ipct-0123abc":   false,
		"ipct-0123abcde": false,
		"ipct-../../x":   false,
		"other-0123abcd": false,
		"":               false,
	} {
		if got := validName(name); got != want {
			t.Errorf("validName(%q) = %v", name, got)
		}
	}
}

// ipnetnsEnv runs TestIPNetnsHelper for real; its value is the inode of
// the parent's mount namespace, which the helper must not be in.
const ipnetnsEnv = "NETLAB_TEST_IPNETNS_HELPER"

// TestIPNetns creates and removes namespaces while `ip netns add` and `ip
// netns del` run concurrently on names of their own, in a mount namespace
// of its own where /run/netns starts as a plain directory: the first `ip
// netns add` then bind-mounts /run/netns over itself, copying every mount
// below it. Nothing may be left behind: no name, no mount, no error.
func TestIPNetns(t *testing.T) {
	if os.Getenv(ipnetnsEnv) != "" {
		t.Skip("in the helper")
	}
	if why := missingPrivileges(); why != "" {
		if os.Getenv(requireEnv) == "1" {
			t.Fatal(why)
		}
		t.Skip(why)
	}
	Tool(t, "iproute2", "ip")
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/mnt", &st); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestIPNetnsHelper$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), ipnetnsEnv+"="+strconv.FormatUint(st.Ino, 10))
	// A mount namespace of its own (which Go makes recursively private
	// before exec), so that nothing the helper mounts or unmounts, /run
	// included, is seen by the host.
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	out, err := cmd.CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("--- PASS: TestIPNetnsHelper")) {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	t.Logf("helper:\n%s", out)
}

// TestIPNetnsHelper is TestIPNetns's child, in a mount namespace of its
// own.
func TestIPNetnsHelper(t *testing.T) {
	parent := os.Getenv(ipnetnsEnv)
	if parent == "" {
		t.Skip("helper for TestIPNetns")
	}
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/mnt", &st); err != nil {
		t.Fatal(err)
	}
	if strconv.FormatUint(st.Ino, 10) == parent {
		t.Fatal("the helper shares its parent's mount namespace; it would change the host's mounts")
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		t.Fatal(err)
	}
	// A /run of its own: /run/netns a plain directory in it, as on a
	// machine where `ip netns add` has not run since boot.
	if err := unix.Mount("netlab-test", "/run", "tmpfs", 0, "mode=0755"); err != nil {
		t.Fatal(err)
	}
	baseline := mountIDs(t)
	ip := Tool(t, "iproute2", "ip")
	ipNetns := func(args ...string) error {
		out, err := exec.Command(ip, append([]string{"netns"}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("ip netns %s: %w: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	const rounds, workers, perWorker = 8, 3, 3
	var created int
	for round := range rounds {
		// /run/netns a plain directory again, so this round's first `ip
		// netns add` copies what is mounted below it.
		for unix.Unmount("/run/netns", unix.MNT_DETACH) == nil {
		}
		if err := os.MkdirAll("/run/netns", 0o755); err != nil {
			t.Fatal(err)
		}
		// Namespaces that exist when `ip netns add` copies /run/netns...
		var early []*NS
		for range 2 {
			ns, err := newNS()
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			early = append(early, ns)
		}
		// ... and namespaces made and removed while it does, and while
		// other names come and go.
		var wg sync.WaitGroup
		errs := make(chan error, 2*workers*perWorker+len(early))
		for w := range workers {
			wg.Go(func() {
				for range perWorker {
					ns, err := newNS()
					if err != nil {
						errs <- err
						continue
					}
					errs <- ns.close()
				}
			})
			wg.Go(func() {
				for i := range perWorker {
					name := fmt.Sprintf("netlab-test-%d-%d-%d", round, w, i)
					if err := ipNetns("add", name); err != nil {
						errs <- err
						continue
					}
					errs <- ipNetns("del", name)
				}
			})
		}
		wg.Wait()
		for _, ns := range early {
			errs <- ns.close()
		}
		close(errs)
		for err := range errs {
			if err != nil {
				t.Errorf("round %d: %v", round, err)
			}
		}
		created += len(early) + workers*perWorker
	}
	// A recursive bind mount of /run holds a copy of every namespace
	// mounted below it, which removal must unmount too.
	ns, err := newNS()
	if err != nil {
		t.Fatal(err)
	}
	rcopy := t.TempDir()
	if err := unix.Mount("/run", rcopy, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		t.Fatal(err)
	}
	if err := ns.close(); err != nil {
		t.Errorf("with /run bind-mounted on %s: %v", rcopy, err)
	}
	if err := unix.Unmount(rcopy, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	created++

	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		t.Errorf("left in /run/netns: %s", e.Name())
	}
	if ents, err := os.ReadDir(mountDir); err == nil {
		for _, e := range ents {
			t.Errorf("left in %s: %s", mountDir, e.Name())
		}
	}
	for id, point := range mountIDs(t) {
		// /run/netns itself, over which `ip netns add` mounted it, is
		// iproute2's; the rounds left mounts of it, not below it.
		if _, ok := baseline[id]; !ok && point != "/run/netns" {
			t.Errorf("left mounted: %s", point)
		}
	}
	t.Logf("%d rounds: %d namespaces created and removed, %d `ip netns add`/`del` pairs alongside", rounds, created, rounds*workers*perWorker)
}

// mountIDs returns the mount points of the calling thread's mount
// namespace by mount ID.
func mountIDs(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/thread-self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if f := strings.Fields(line); len(f) > 4 {
			ids[f[0]] = f[4]
		}
	}
	return ids
}
