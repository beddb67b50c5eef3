//go:build linux

// Package netlab builds throwaway network namespaces for tests, benchmarks
// and the example sandbox: a server namespace and a client namespace joined
// by a veth pair, addressed from the benchmarking ranges 198.18.0.0/15 and
// fd00::/8.
//
// Nothing here touches the machine's own namespace: the veth pair is created
// inside the server namespace and its peer moved into the client namespace,
// and every address, rule and packet stays inside the lab.
package netlab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Interface names inside the lab (names are per namespace, so labs never
// collide).
const (
	ServerLink = "ipcs0"
	ClientLink = "ipcc0"
)

// NS is one named network namespace.
type NS struct {
	Name string // e.g. "ipct-1a2b3c4d", under /var/run/netns
	h    netns.NsHandle
}

// Do runs fn on an OS thread switched into ns, then switches back.
func (ns *NS) Do(fn func() error) error {
	return onThread(func() error {
		if err := netns.Set(ns.h); err != nil {
			return fmt.Errorf("enter namespace %s: %w", ns.Name, err)
		}
		return fn()
	})
}

// onThread runs fn on a locked OS thread and puts the thread back in its
// original namespace afterwards, whatever fn switched it to.
//
// The thread stays locked for the whole call so the Go scheduler cannot move
// the goroutine (or run another one) on a thread in the wrong namespace. If
// switching back fails the thread is left locked: the runtime then destroys
// it when the goroutine ends instead of reusing a thread stuck in the lab.
func onThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("get current namespace: %w", err)
			return
		}
		defer orig.Close()
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// Never unlock: this thread must die with the goroutine.
			errc <- errors.Join(ferr, fmt.Errorf("return to original namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Dial connects from inside ns. The socket is created on a thread in ns and
// keeps that namespace for its lifetime, whatever thread uses it later.
func (ns *NS) Dial(ctx context.Context, network string, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	var conn net.Conn
	err := ns.Do(func() error {
		d := net.Dialer{}
		if src.IsValid() {
			switch {
			case strings.HasPrefix(network, "udp"):
				d.LocalAddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
			default:
				d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
			}
		}
		var err error
		conn, err = d.DialContext(ctx, network, dst.String())
		return err
	})
	return conn, err
}

// Listen creates a listener inside ns.
func (ns *NS) Listen(network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := ns.Do(func() error {
		var err error
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

// Start starts cmd inside ns. The child is forked from a thread switched
// into ns, and a new process inherits the namespace of the thread that
// forked it; the whole process, and everything it runs, lives in the lab.
func (ns *NS) Start(cmd *exec.Cmd) error {
	return ns.Do(cmd.Start)
}

// Inode returns the namespace's inode, to compare with the inode of
// /proc/self/ns/net in a process that must run inside the lab.
func (ns *NS) Inode() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(ns.h), &st); err != nil {
		return 0, fmt.Errorf("stat namespace %s: %w", ns.Name, err)
	}
	return st.Ino, nil
}

// Sysctl writes a network sysctl of this namespace, e.g.
// ns.Sysctl("net/netfilter/nf_conntrack_tcp_be_liberal", "1").
// /proc/sys/net resolves to the namespace of the thread that opens it.
func (ns *NS) Sysctl(path, value string) error {
	if !strings.HasPrefix(path, "net/") || strings.Contains(path, "..") {
		return fmt.Errorf("sysctl %q: only net/... sysctls are per namespace", path)
	}
	return ns.Do(func() error {
		return os.WriteFile(filepath.Join("/proc/sys", path), []byte(value), 0o644)
	})
}

// Options configures a Lab.
type Options struct {
	// Clients is the number of client addresses per family. Default 64,
	// at most 1024.
	Clients int
}

// Lab is a server namespace and a client namespace joined by a veth pair.
type Lab struct {
	Server, Client *NS
	ServerAddr4    netip.Addr // 198.18.0.1/15 on the server's veth
	ServerAddr6    netip.Addr // fd00::1/32 on the server's veth
	// ClientAddrs4 are consecutive from 198.18.1.0, so their low bits take
	// every value.
	ClientAddrs4 []netip.Addr
	// ClientAddrs6 are fd00:0:0:<i>::2, each in its own /64, so the low
	// bits of their /64 prefixes take every value.
	ClientAddrs6 []netip.Addr
	// LocalAddrs4 and LocalAddrs6 are on the server namespace's loopback,
	// for clients on the same host: 198.19.0.0-15 and fd01:0:0:<i>::1.
	LocalAddrs4, LocalAddrs6 []netip.Addr

	closeOnce sync.Once
	closeErr  error
}

// New creates a lab. On error nothing is left behind.
func New(opts Options) (l *Lab, err error) {
	if opts.Clients == 0 {
		opts.Clients = 64
	}
	if opts.Clients < 1 || opts.Clients > 1024 {
		return nil, fmt.Errorf("netlab: Options.Clients %d is outside 1..1024", opts.Clients)
	}
	l = &Lab{ServerAddr4: netip.MustParseAddr("198.18.0.1"), ServerAddr6: netip.MustParseAddr("fd00::1")}
	defer func() {
		if err != nil {
			l.Close()
			l = nil
		}
	}()
	if l.Server, err = newNS(); err != nil {
		return nil, err
	}
	if l.Client, err = newNS(); err != nil {
		return nil, err
	}
	for i := 0; i < opts.Clients; i++ {
		l.ClientAddrs4 = append(l.ClientAddrs4, netip.AddrFrom4([4]byte{198, 18, byte(1 + i/256), byte(i % 256)}))
		l.ClientAddrs6 = append(l.ClientAddrs6, netip.MustParseAddr(fmt.Sprintf("fd00:0:0:%x::2", i)))
	}
	for i := 0; i < 16; i++ {
		l.LocalAddrs4 = append(l.LocalAddrs4, netip.AddrFrom4([4]byte{198, 19, 0, byte(i)}))
		l.LocalAddrs6 = append(l.LocalAddrs6, netip.MustParseAddr(fmt.Sprintf("fd01:0:0:%x::1", i)))
	}
	if err := l.wire(); err != nil {
		return nil, err
	}
	return l, nil
}

// wire creates the veth pair inside the server namespace, moves its peer to
// the client namespace and assigns the addresses.
func (l *Lab) wire() error {
	srv, err := netlink.NewHandleAt(l.Server.h)
	if err != nil {
		return fmt.Errorf("netlink handle in %s: %w", l.Server.Name, err)
	}
	defer srv.Close()
	cli, err := netlink.NewHandleAt(l.Client.h)
	if err != nil {
		return fmt.Errorf("netlink handle in %s: %w", l.Client.Name, err)
	}
	defer cli.Close()

	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: ServerLink},
		PeerName:      ClientLink,
		PeerNamespace: netlink.NsFd(int(l.Client.h)),
	}
	if err := srv.LinkAdd(veth); err != nil {
		return fmt.Errorf("create veth %s/%s in %s: %w", ServerLink, ClientLink, l.Server.Name, err)
	}
	type addrs struct {
		h     *netlink.Handle
		link  string
		list  []netip.Addr
		bits4 int
		bits6 int
	}
	for _, a := range []addrs{
		{srv, ServerLink, []netip.Addr{l.ServerAddr4, l.ServerAddr6}, 15, 32},
		{cli, ClientLink, append(append([]netip.Addr{}, l.ClientAddrs4...), l.ClientAddrs6...), 15, 32},
		{srv, "lo", append(append([]netip.Addr{}, l.LocalAddrs4...), l.LocalAddrs6...), 32, 128},
	} {
		link, err := a.h.LinkByName(a.link)
		if err != nil {
			return fmt.Errorf("find %s: %w", a.link, err)
		}
		for _, ip := range a.list {
			bits := a.bits4
			if ip.Is6() {
				bits = a.bits6
			}
			p := netip.PrefixFrom(ip, bits)
			// NODAD: an IPv6 address is usable at once instead of after
			// duplicate address detection, so tests need no sleep.
			addr := &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(bits, ip.BitLen())}, Flags: unix.IFA_F_NODAD}
			if err := a.h.AddrAdd(link, addr); err != nil {
				return fmt.Errorf("add %s to %s: %w", p, a.link, err)
			}
		}
	}
	for _, hl := range []struct {
		h    *netlink.Handle
		name string
	}{{srv, "lo"}, {srv, ServerLink}, {cli, "lo"}, {cli, ClientLink}} {
		link, err := hl.h.LinkByName(hl.name)
		if err != nil {
			return fmt.Errorf("find %s: %w", hl.name, err)
		}
		if err := hl.h.LinkSetUp(link); err != nil {
			return fmt.Errorf("bring up %s: %w", hl.name, err)
		}
	}
	return nil
}

// newNS creates a named namespace without leaving the caller in it.
func newNS() (*NS, error) {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, err
	}
	name := "ipct-" + hex.EncodeToString(b[:])
	h := netns.None() // not 0: that is a valid fd, and IsOpen would say so
	// NewNamed switches the calling thread into the new namespace.
	err := onThread(func() error {
		var err error
		h, err = netns.NewNamed(name)
		return err
	})
	if err != nil {
		if h.IsOpen() {
			h.Close()
			_ = netns.DeleteNamed(name)
		}
		return nil, fmt.Errorf("create namespace %s: %w", name, err)
	}
	return &NS{Name: name, h: h}, nil
}

// Close removes the namespaces. Safe to call more than once. Processes
// still running inside keep their namespace alive until they exit; the
// caller stops them first.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() {
		var errs []error
		for _, ns := range []*NS{l.Server, l.Client} {
			if ns == nil {
				continue
			}
			if err := ns.h.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close %s: %w", ns.Name, err))
			}
			if err := netns.DeleteNamed(ns.Name); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", ns.Name, err))
			}
		}
		l.closeErr = errors.Join(errs...)
	})
	return l.closeErr
}

// NewT creates a lab for a test and removes it when the test ends, passed
// or failed. Without root it skips the test, unless IPCLUSTER_REQUIRE_NETNS=1
// (as in CI), where it fails instead.
func NewT(t testing.TB, opts Options) *Lab {
	t.Helper()
	if os.Geteuid() != 0 {
		msg := "network namespace tests need root (run: sudo go test ./...)"
		if os.Getenv("IPCLUSTER_REQUIRE_NETNS") == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	l, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Error(err)
		}
	})
	return l
}
