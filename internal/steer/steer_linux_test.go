//go:build linux

package steer

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// envChild makes the test binary run childMain and exit: the privilege
// test runs it as an unprivileged user.
const envChild = "STEER_TEST_CHILD"

func TestMain(m *testing.M) {
	switch os.Getenv(envChild) {
	case "":
	case "adopt":
		os.Exit(adoptMain())
	default:
		os.Exit(childMain())
	}
	os.Exit(m.Run())
}

// childResult is what childMain prints.
type childResult struct {
	Check, New   string // error texts, "" for none
	CheckPerm    bool   // errors.Is(Check(), ErrPermission)
	NewPerm      bool
	NewMigrates  bool
	Instructions int
}

func childMain() int {
	var r childResult
	if err := Check(); err != nil {
		r.Check, r.CheckPerm = err.Error(), errors.Is(err, ErrPermission)
	}
	s, err := New(Spec{Workers: 4})
	if err != nil {
		r.New, r.NewPerm = err.Error(), errors.Is(err, ErrPermission)
	} else {
		r.NewMigrates, r.Instructions = s.Migrates(), s.Instructions()
		s.Close()
	}
	json.NewEncoder(os.Stdout).Encode(r)
	return 0
}

// adoptMain opens a Selector over the array at fd 3, puts the listener
// at fd 4 in slot 1 (it holds it already: a no-op), points slot 3 at the
// listener at fd 5, and attaches its program: a new master taking over a
// group from the files its predecessor handed on.
func adoptMain() int {
	s, err := Open(Spec{Workers: 4}, os.NewFile(3, "array"))
	if err == nil {
		err = s.Set(1, os.NewFile(4, "slot1"))
	}
	if err == nil {
		err = s.Set(3, os.NewFile(5, "slot3"))
	}
	if err == nil {
		err = s.Attach(os.NewFile(5, "slot3"))
	}
	if err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Println("adopted")
	return 0
}

// wait bounds every wait for something that should happen at once.
const wait = 5 * time.Second

// listener is one socket of a group, answering each connection with its
// id ("L3\n"), then echoing lines prefixed with it.
type listener struct {
	id int
	ln *net.TCPListener
}

// group is a reuseport group of TCP listeners in a namespace.
type group struct {
	t       testing.TB
	ns      *netlab.NS
	network string
	addr    netip.AddrPort
	lns     []*listener
}

func newGroup(t testing.TB, ns *netlab.NS, network string, addr netip.AddrPort) *group {
	return &group{t: t, ns: ns, network: network, addr: addr}
}

// add opens the group's next listener; it accepts only if serve.
func (g *group) add(serve bool) *listener {
	g.t.Helper()
	var ln *net.TCPListener
	if err := g.ns.Do(func() (err error) {
		ln, err = ListenTCP(g.network, g.addr.String())
		return err
	}); err != nil {
		g.t.Fatal(err)
	}
	l := &listener{id: len(g.lns), ln: ln}
	g.lns = append(g.lns, l)
	g.t.Cleanup(func() { ln.Close() })
	if serve {
		l.serve()
	}
	return l
}

func (l *listener) serve() {
	go func() {
		for {
			c, err := l.ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				fmt.Fprintf(c, "L%d\n", l.id)
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					fmt.Fprintf(c, "L%d %s\n", l.id, sc.Text())
				}
			}()
		}
	}()
}

// conn is a client connection with a line reader.
type conn struct {
	net.Conn
	r *bufio.Reader
}

func (c *conn) line() (string, error) {
	c.SetReadDeadline(time.Now().Add(wait))
	s, err := c.r.ReadString('\n')
	return strings.TrimSpace(s), err
}

func (c *conn) ask(msg string) (string, error) {
	if _, err := fmt.Fprintln(c, msg); err != nil {
		return "", err
	}
	return c.line()
}

func dial(ns *netlab.NS, network string, src netip.Addr, dst netip.AddrPort, timeout time.Duration) (*conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := ns.Dial(ctx, network, src, dst)
	if err != nil {
		return nil, err
	}
	return &conn{Conn: c, r: bufio.NewReader(c)}, nil
}

// greet connects from src and returns the id of the listener that
// answered.
func greet(ns *netlab.NS, src netip.Addr, dst netip.AddrPort) (int, *conn, error) {
	c, err := dial(ns, "tcp", src, dst, wait)
	if err != nil {
		return -1, nil, err
	}
	s, err := c.line()
	if err != nil {
		c.Close()
		return -1, nil, fmt.Errorf("read the greeting: %w", err)
	}
	id := -1
	if _, err := fmt.Sscanf(s, "L%d", &id); err != nil {
		c.Close()
		return -1, nil, fmt.Errorf("greeting %q: %w", s, err)
	}
	return id, c, nil
}

// expect checks that a connection from each of srcs reaches the listener
// want(src) names.
func expect(t *testing.T, ns *netlab.NS, srcs []netip.Addr, dst netip.AddrPort, want func(netip.Addr) int) {
	t.Helper()
	bad := 0
	for _, src := range srcs {
		id, c, err := greet(ns, src, dst)
		if err != nil {
			t.Errorf("%s -> %s: %v", src, dst, err)
			bad++
		} else {
			c.Close()
			if w := want(src); id != w {
				t.Errorf("%s -> %s reached L%d, want L%d", src, dst, id, w)
				bad++
			}
		}
		if bad > 5 {
			t.Fatal("giving up after 5 misroutes")
		}
	}
}

func newSelector(t testing.TB, spec Spec) *Selector {
	t.Helper()
	s, err := New(spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// fill builds a group of spec.Workers serving listeners, sets slot i to
// listener i and attaches s.
func fill(t *testing.T, s *Selector, g *group) {
	t.Helper()
	for i := range s.Spec().Workers {
		if err := s.Set(i, g.add(true).ln); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Attach(g.lns[0].ln); err != nil {
		t.Fatal(err)
	}
}

// selectOnly is a Selector over s's array with the plain SELECT program
// New falls back to on kernels before 5.14.
func selectOnly(t testing.TB, s *Selector) *Selector {
	t.Helper()
	plain, err := load(s.spec, s.slots, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { plain.prog.Close() }) // the array is s's
	return plain
}

func addrPort(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }

// TestSteerTCP: a program attached to a group of 4 listeners sends every
// client to the listener of the slot Spec.Slot computes, for an IPv4
// group, an IPv6 group and a dual-stack [::] group reached by both; and
// so does the plain SELECT program New falls back to on kernels before
// 5.14.
func TestSteerTCP(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{})
	spec := Spec{Workers: 4}
	for _, c := range []struct {
		name    string
		network string
		bind    netip.AddrPort
		dsts    []netip.AddrPort
	}{
		{"ipv4", "tcp4", addrPort(lab.ServerAddr4, 7000), []netip.AddrPort{addrPort(lab.ServerAddr4, 7000)}},
		{"ipv6", "tcp6", addrPort(lab.ServerAddr6, 7000), []netip.AddrPort{addrPort(lab.ServerAddr6, 7000)}},
		{"dual-stack", "tcp", addrPort(netip.IPv6Unspecified(), 7001), []netip.AddrPort{addrPort(lab.ServerAddr4, 7001), addrPort(lab.ServerAddr6, 7001)}},
	} {
		for _, migrate := range []bool{true, false} {
			name := c.name
			if !migrate {
				// The program for kernels before 5.14.
				name += "/select_only"
			}
			t.Run(name, func(t *testing.T) { steerTCP(t, lab, spec, c.network, c.bind, c.dsts, migrate) })
		}
	}
}

func steerTCP(t *testing.T, lab *netlab.Lab, spec Spec, network string, bind netip.AddrPort, dsts []netip.AddrPort, migrate bool) {
	s := newSelector(t, spec)
	if !s.Migrates() {
		t.Errorf("not loaded as SELECT_OR_MIGRATE on this kernel: %v", s.MigrateErr())
	}
	if !migrate {
		s = selectOnly(t, s)
	}
	t.Logf("program: %d instructions", s.Instructions())
	g := newGroup(t, lab.Server, network, bind)
	fill(t, s, g)
	for i, l := range g.lns {
		want, err := SocketCookie(l.ln)
		if err != nil {
			t.Fatal(err)
		}
		if got, ok, err := s.Cookie(i); err != nil || !ok || got != want {
			t.Errorf("Cookie(%d) = %d, %v, %v; want %d, true, nil", i, got, ok, err, want)
		}
	}
	for _, dst := range dsts {
		srcs := lab.ClientAddrs4
		if dst.Addr().Is6() {
			srcs = lab.ClientAddrs6
		}
		expect(t, lab.Client, srcs, dst, spec.Slot)
	}
}

// addLocal puts addrs on the namespace's loopback, as sources for
// clients inside it.
func addLocal(t *testing.T, ns *netlab.NS, addrs []netip.Addr) {
	t.Helper()
	if err := ns.Do(func() error {
		// A handle made here has its socket in ns.
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return err
		}
		defer h.Close()
		lo, err := h.LinkByName("lo")
		if err != nil {
			return err
		}
		for _, a := range addrs {
			err := h.AddrAdd(lo, &netlink.Addr{
				IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())},
				Flags: unix.IFA_F_NODAD,
			})
			if err != nil {
				return fmt.Errorf("add %s to lo: %w", a, err)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// TestSteerPrefixes: for prefixes other than the defaults, slot bits
// straddling 32-bit words included, the program picks the slot Spec.Slot
// does, for random sources on the server's loopback. One group of 256
// listeners serves every spec, each a Reprogram of the first.
func TestSteerPrefixes(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 1})
	seed := uint64(time.Now().UnixNano())
	t.Logf("random seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	var v4, v6 []netip.Addr
	seen := map[netip.Addr]bool{lab.ServerAddr4: true, lab.ServerAddr6: true}
	for _, a := range lab.LocalAddrs4 {
		seen[a] = true
	}
	for _, a := range lab.LocalAddrs6 {
		seen[a] = true
	}
	for len(v4) < 48 {
		// 198.18.0.0/15
		x := rng.Uint32()&0x1ffff | 198<<24 | 18<<16
		a := netip.AddrFrom4([4]byte{byte(x >> 24), byte(x >> 16), byte(x >> 8), byte(x)})
		if !seen[a] && x&0xff != 0 && x&0xff != 0xff {
			seen[a] = true
			v4 = append(v4, a)
		}
	}
	for len(v6) < 48 {
		// fd00::/8
		var b [16]byte
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		b[0] = 0xfd
		if a := netip.AddrFrom16(b); !seen[a] {
			seen[a] = true
			v6 = append(v6, a)
		}
	}
	addLocal(t, lab.Server, append(append([]netip.Addr(nil), v4...), v6...))

	base := newSelector(t, Spec{Workers: MaxWorkers, Name: "prefixes"})
	g4 := newGroup(t, lab.Server, "tcp4", addrPort(lab.ServerAddr4, 7000))
	g6 := newGroup(t, lab.Server, "tcp6", addrPort(lab.ServerAddr6, 7000))
	s6 := newSelector(t, Spec{Workers: MaxWorkers, Name: "prefixes6"})
	fill(t, base, g4)
	fill(t, s6, g6)
	for _, spec := range []Spec{
		{Workers: 8, V4Prefix: 29, V6Prefix: 61},
		{Workers: 4, V4Prefix: 17, V6Prefix: 33},   // v6: bits 31, 32 (words 0 and 1)
		{Workers: 4, V4Prefix: 31, V6Prefix: 65},   // v6: bits 63, 64 (words 1 and 2)
		{Workers: 256, V4Prefix: 24, V6Prefix: 97}, // v6: bits 89..96 (words 2 and 3)
		{Workers: 256, V4Prefix: 20, V6Prefix: 100},
		{Workers: 16, V4Prefix: 32, V6Prefix: 128},
		{Workers: 128, V4Prefix: 30, V6Prefix: 64}, // v6: the window's last bits, no shift
		{Workers: 64, V4Prefix: 26, V6Prefix: 96},
		{Workers: 2, V4Prefix: 1, V6Prefix: 8},
		{Workers: 1},
	} {
		t.Run(fmt.Sprintf("w%d_v4_%d_v6_%d", spec.Workers, spec.V4Prefix, spec.V6Prefix), func(t *testing.T) {
			for _, c := range []struct {
				sel  *Selector
				g    *group
				srcs []netip.Addr
			}{{base, g4, v4}, {s6, g6, v6}} {
				s, err := c.sel.Reprogram(spec)
				if err != nil {
					t.Fatal(err)
				}
				defer s.Close()
				if err := s.Attach(c.g.lns[0].ln); err != nil {
					t.Fatal(err)
				}
				expect(t, lab.Server, c.srcs, c.g.addr, spec.Slot)
			}
		})
	}
}

// TestSteerRepoint: Set moves a slot's new connections to another socket
// at once; a connection established before stays with the old listener,
// and keeps working after that listener closes. Closing the socket the
// program was attached through leaves the group's program in place.
func TestSteerRepoint(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 8})
	spec := Spec{Workers: 4}
	for _, fam := range []struct {
		name string
		addr netip.AddrPort
		srcs []netip.Addr
	}{
		{"ipv4", addrPort(lab.ServerAddr4, 7000), lab.ClientAddrs4},
		{"ipv6", addrPort(lab.ServerAddr6, 7000), lab.ClientAddrs6},
	} {
		t.Run(fam.name, func(t *testing.T) {
			s := newSelector(t, spec)
			g := newGroup(t, lab.Server, "tcp", fam.addr)
			fill(t, s, g)
			var src2 []netip.Addr // the sources of slot 2
			for _, a := range fam.srcs {
				if spec.Slot(a) == 2 {
					src2 = append(src2, a)
				}
			}
			id, held, err := greet(lab.Client, src2[0], fam.addr)
			if err != nil || id != 2 {
				t.Fatalf("held connection: L%d, %v; want L2", id, err)
			}
			defer held.Close()

			next := g.add(true)
			if err := s.Set(2, next.ln); err != nil {
				t.Fatal(err)
			}
			want := func(a netip.Addr) int {
				if slot := spec.Slot(a); slot != 2 {
					return slot
				}
				return next.id
			}
			expect(t, lab.Client, fam.srcs, fam.addr, want)
			if r, err := held.ask("ping"); err != nil || r != "L2 ping" {
				t.Errorf("held connection after the re-point: %q, %v; want \"L2 ping\"", r, err)
			}
			g.lns[2].ln.Close()
			if r, err := held.ask("again"); err != nil || r != "L2 again" {
				t.Errorf("held connection after its listener closed: %q, %v; want \"L2 again\"", r, err)
			}
			expect(t, lab.Client, fam.srcs, fam.addr, want)
			// The program belongs to the group, not to the socket it was
			// attached through (slot 0's): the others are still steered.
			g.lns[0].ln.Close()
			var rest []netip.Addr
			for _, a := range fam.srcs {
				if spec.Slot(a) != 0 {
					rest = append(rest, a)
				}
			}
			expect(t, lab.Client, rest, fam.addr, want)
			// Setting the socket a slot holds is a no-op, not EBUSY.
			if err := s.Set(2, next.ln); err != nil {
				t.Errorf("Set of the socket the slot holds: %v", err)
			}
			// Another slot may not take it while slot 2 holds it.
			if err := s.Set(3, next.ln); err == nil || !errors.Is(err, unix.EBUSY) || !strings.Contains(err.Error(), "Clear that slot first") {
				t.Errorf("Set of a socket another slot holds: %v, want EBUSY and the fix", err)
			}
		})
	}
}

// TestSteerMigrate: with the program loaded as SELECT_OR_MIGRATE, closing
// a listener whose accept queue holds connections, after its slot was
// re-pointed, hands every queued connection to the slot's new socket,
// with net.ipv4.tcp_migrate_req 0 (the default) or 1, in IPv4, IPv6 and
// dual-stack groups (where the queued IPv4 connections are v4-mapped
// AF_INET6 sockets). A plain SELECT program, the control, resets them.
func TestSteerMigrate(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 16})
	spec := Spec{Workers: 4}
	port := uint16(7000)
	for _, fam := range []struct {
		name    string
		network string
		bind    netip.AddrPort
		dst     netip.Addr
		srcs    []netip.Addr
	}{
		{"ipv4", "tcp4", addrPort(lab.ServerAddr4, 0), lab.ServerAddr4, lab.ClientAddrs4},
		{"ipv6", "tcp6", addrPort(lab.ServerAddr6, 0), lab.ServerAddr6, lab.ClientAddrs6},
		{"dual-stack_ipv4", "tcp", addrPort(netip.IPv6Unspecified(), 0), lab.ServerAddr4, lab.ClientAddrs4},
		{"dual-stack_ipv6", "tcp", addrPort(netip.IPv6Unspecified(), 0), lab.ServerAddr6, lab.ClientAddrs6},
	} {
		for _, v := range []struct {
			sysctl  string
			migrate bool
		}{{"0", true}, {"1", true}, {"0", false}} {
			name := fmt.Sprintf("%s/tcp_migrate_req=%s", fam.name, v.sysctl)
			if !v.migrate {
				name += "/select_only"
			}
			t.Run(name, func(t *testing.T) {
				if err := lab.Server.Sysctl("net/ipv4/tcp_migrate_req", v.sysctl); err != nil {
					t.Fatal(err)
				}
				port++
				bind := addrPort(fam.bind.Addr(), port)
				dst := addrPort(fam.dst, port)
				s := newSelector(t, spec)
				if !v.migrate {
					s = selectOnly(t, s)
				}
				g := newGroup(t, lab.Server, fam.network, bind)
				for i := range spec.Workers {
					if err := s.Set(i, g.add(i != 1).ln); err != nil { // slot 1 never accepts
						t.Fatal(err)
					}
				}
				if err := s.Attach(g.lns[0].ln); err != nil {
					t.Fatal(err)
				}
				var queued []*conn
				for _, src := range fam.srcs {
					if spec.Slot(src) != 1 {
						continue
					}
					c, err := dial(lab.Client, "tcp", src, dst, wait)
					if err != nil {
						t.Fatal(err)
					}
					defer c.Close()
					if _, err := fmt.Fprintf(c, "q%d\n", len(queued)); err != nil {
						t.Fatal(err)
					}
					queued = append(queued, c)
				}
				repl := g.add(true)
				if err := s.Set(1, repl.ln); err != nil {
					t.Fatal(err)
				}
				g.lns[1].ln.Close() // with its queue unaccepted
				moved := 0
				for i, c := range queued {
					greeting, err := c.line()
					if err == nil && greeting == fmt.Sprintf("L%d", repl.id) {
						if r, err := c.line(); err == nil && r == fmt.Sprintf("L%d q%d", repl.id, i) {
							moved++
							continue
						}
					}
					if v.migrate {
						t.Errorf("queued connection %d: %q, %v; want L%d's greeting", i, greeting, err, repl.id)
					}
				}
				t.Logf("%d of %d queued connections moved to the slot's new listener", moved, len(queued))
				if !v.migrate && moved != 0 {
					t.Errorf("plain SELECT moved %d queued connections: the control shows nothing", moved)
				}
			})
		}
	}
}

// TestSteerEmptySlot: a slot with no socket (cleared, or whose socket
// closed) drops its clients' connections instead of handing them to
// another slot's listener; the other slots are served as before.
func TestSteerEmptySlot(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 16})
	spec := Spec{Workers: 4}
	dst := addrPort(lab.ServerAddr4, 7000)
	s := newSelector(t, spec)
	g := newGroup(t, lab.Server, "tcp4", dst)
	fill(t, s, g)
	check := func(why string, empty int) {
		t.Helper()
		var served []netip.Addr
		for _, src := range lab.ClientAddrs4 {
			if spec.Slot(src) != empty {
				served = append(served, src)
				continue
			}
			c, err := dial(lab.Client, "tcp", src, dst, time.Second)
			if err == nil {
				s, _ := c.line()
				c.Close()
				t.Errorf("%s: %s reached %q, want no connection", why, src, s)
				continue
			}
			t.Logf("%s: %s: %v", why, src, err)
		}
		expect(t, lab.Client, served, dst, spec.Slot)
	}

	if err := s.Clear(2); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := s.Cookie(2); ok || err != nil {
		t.Errorf("Cookie of a cleared slot: %v, %v; want false, nil", ok, err)
	}
	check("cleared slot 2", 2)
	if err := s.Clear(2); err != nil {
		t.Errorf("Clear of an empty slot: %v", err)
	}
	if err := s.Set(2, g.lns[2].ln); err != nil {
		t.Fatal(err)
	}

	// A socket that closes leaves its slot by itself.
	g.lns[3].ln.Close()
	if _, ok, err := s.Cookie(3); ok || err != nil {
		t.Errorf("Cookie of a slot whose socket closed: %v, %v; want false, nil", ok, err)
	}
	check("slot 3 after its socket closed", 3)
}

// udpSock is one socket of a UDP group, answering each datagram with
// its id.
func udpListen(t *testing.T, ns *netlab.NS, network string, addr netip.AddrPort, id int) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := ns.Do(func() (err error) {
		c, err = ListenUDP(network, addr.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		b := make([]byte, 1500)
		for {
			n, from, err := c.ReadFromUDPAddrPort(b)
			if err != nil {
				return
			}
			c.WriteToUDPAddrPort([]byte(fmt.Sprintf("U%d %s", id, b[:n])), from)
		}
	}()
	return c
}

func udpAsk(c net.Conn, msg string) (string, error) {
	if _, err := c.Write([]byte(msg)); err != nil {
		return "", err
	}
	c.SetReadDeadline(time.Now().Add(wait))
	b := make([]byte, 1500)
	n, err := c.Read(b)
	return string(b[:n]), err
}

// TestSteerUDP: every datagram of a flow goes to its slot's socket, a
// re-point moves the flow at once (there is no per-flow state), and an
// empty slot's datagrams reach no socket.
func TestSteerUDP(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 16})
	spec := Spec{Workers: 4}
	for _, fam := range []struct {
		name string
		addr netip.AddrPort
		srcs []netip.Addr
	}{
		{"ipv4", addrPort(lab.ServerAddr4, 5353), lab.ClientAddrs4},
		{"ipv6", addrPort(lab.ServerAddr6, 5353), lab.ClientAddrs6},
	} {
		t.Run(fam.name, func(t *testing.T) {
			s := newSelector(t, spec)
			var socks []*net.UDPConn
			for i := range spec.Workers + 1 {
				socks = append(socks, udpListen(t, lab.Server, "udp", fam.addr, i))
				if i < spec.Workers {
					if err := s.Set(i, socks[i]); err != nil {
						t.Fatal(err)
					}
				}
			}
			if err := s.Attach(socks[0]); err != nil {
				t.Fatal(err)
			}
			flows := map[netip.Addr]net.Conn{}
			for _, src := range fam.srcs {
				c, err := lab.Client.Dial(context.Background(), "udp", src, fam.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				flows[src] = c
				for k := range 3 {
					r, err := udpAsk(c, fmt.Sprint("d", k))
					if want := fmt.Sprintf("U%d d%d", spec.Slot(src), k); err != nil || r != want {
						t.Errorf("%s: %q, %v; want %q", src, r, err, want)
					}
				}
			}
			if err := s.Set(2, socks[spec.Workers]); err != nil {
				t.Fatal(err)
			}
			for src, c := range flows {
				want := fmt.Sprintf("U%d moved", spec.Slot(src))
				if spec.Slot(src) == 2 {
					want = fmt.Sprintf("U%d moved", spec.Workers)
				}
				if r, err := udpAsk(c, "moved"); err != nil || r != want {
					t.Errorf("%s after slot 2's re-point: %q, %v; want %q", src, r, err, want)
				}
			}
			// An empty slot's datagrams reach nobody.
			if err := s.Clear(1); err != nil {
				t.Fatal(err)
			}
			for src, c := range flows {
				if spec.Slot(src) != 1 {
					continue
				}
				c.Write([]byte("dropped"))
				c.SetReadDeadline(time.Now().Add(time.Second))
				b := make([]byte, 1500)
				if n, err := c.Read(b); err == nil {
					t.Errorf("%s with slot 1 empty: answered %q", src, b[:n])
				} else {
					t.Logf("%s with slot 1 empty: %v", src, err)
				}
			}
		})
	}
}

// TestSteerResize: a resize from 2 to 4 workers and back is one program
// swap per group: Reprogram over the same array, fill the new slots (the
// old program never selects them), Attach. A second New cannot take the
// sockets, which are in the first array: its error says to Reprogram.
func TestSteerResize(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 16})
	dst := addrPort(lab.ServerAddr4, 7000)
	two := newSelector(t, Spec{Workers: 2})
	g := newGroup(t, lab.Server, "tcp4", dst)
	for range 4 {
		g.add(true)
	}
	for i := range 2 {
		if err := two.Set(i, g.lns[i].ln); err != nil {
			t.Fatal(err)
		}
	}
	if err := two.Attach(g.lns[3].ln); err != nil {
		t.Fatal(err)
	}
	expect(t, lab.Client, lab.ClientAddrs4, dst, two.Spec().Slot)

	other := newSelector(t, Spec{Workers: 4})
	if err := other.Set(0, g.lns[0].ln); !errors.Is(err, unix.EBUSY) || !strings.Contains(err.Error(), "Reprogram") {
		t.Errorf("Set into a second array of a socket the first holds: %v, want EBUSY and the fix", err)
	}

	four, err := two.Reprogram(Spec{Workers: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer four.Close()
	for i := 2; i < 4; i++ {
		if err := four.Set(i, g.lns[i].ln); err != nil {
			t.Fatal(err)
		}
	}
	// Filled, not attached yet: still routed for 2 workers.
	expect(t, lab.Client, lab.ClientAddrs4, dst, two.Spec().Slot)
	if err := four.Attach(g.lns[1].ln); err != nil {
		t.Fatal(err)
	}
	two.Close()
	expect(t, lab.Client, lab.ClientAddrs4, dst, four.Spec().Slot)

	// Back to 2: swap first, then clear the slots no program selects.
	back, err := four.Reprogram(Spec{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer back.Close()
	if err := back.Attach(g.lns[0].ln); err != nil {
		t.Fatal(err)
	}
	for i := 2; i < 4; i++ {
		if err := four.Clear(i); err != nil {
			t.Fatal(err)
		}
	}
	expect(t, lab.Client, lab.ClientAddrs4, dst, back.Spec().Slot)
}

// TestSteerErrors: sockets the kernel cannot steer are refused with the
// reason and the fix.
func TestSteerErrors(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 1})
	s := newSelector(t, Spec{Workers: 2})
	var plain, mptcp net.Listener
	if err := lab.Server.Do(func() (err error) {
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		if plain, err = lc.Listen(context.Background(), "tcp4", "198.18.0.1:7000"); err != nil {
			return err
		}
		lc.SetMultipathTCP(true)
		mptcp, err = lc.Listen(context.Background(), "tcp4", "198.18.0.1:7001")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	defer mptcp.Close()
	for _, c := range []struct {
		name string
		err  error
		want string
	}{
		{"Set without SO_REUSEPORT", s.Set(0, plain.(*net.TCPListener)), "not a bound (UDP) or listening (TCP) SO_REUSEPORT socket"},
		{"Attach without SO_REUSEPORT", s.Attach(plain.(*net.TCPListener)), "not bound with SO_REUSEPORT"},
		{"Set slot 2 of 2", s.Set(2, plain.(*net.TCPListener)), "slot 2 is outside 0..1"},
		{"Cookie slot -1", func() error { _, _, err := s.Cookie(-1); return err }(), "slot -1 is outside"},
	} {
		if c.err == nil || !strings.Contains(c.err.Error(), c.want) {
			t.Errorf("%s: %v, want an error containing %q", c.name, c.err, c.want)
		}
	}
	// MPTCP, where the kernel has it (Go makes MPTCP listeners by
	// default there): ListenTCP turns it off for this reason.
	proto := 0
	control(mptcp.(*net.TCPListener), func(fd int) (err error) {
		proto, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
		return err
	})
	if proto != unix.IPPROTO_MPTCP {
		t.Logf("no MPTCP here (protocol %d): skipping its case", proto)
	} else if err := s.Attach(mptcp.(*net.TCPListener)); err == nil || !strings.Contains(err.Error(), "MPTCP") {
		t.Errorf("Attach to an MPTCP socket: %v, want an error naming MPTCP", err)
	}
	var ln *net.TCPListener
	if err := lab.Server.Do(func() (err error) { ln, err = ListenTCP("tcp4", "198.18.0.1:7002"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	control(ln, func(fd int) (err error) {
		proto, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
		return err
	})
	if proto != unix.IPPROTO_TCP {
		t.Errorf("ListenTCP made a socket of protocol %d, want TCP (6)", proto)
	}
	if _, err := ListenTCP("udp", "198.18.0.1:1"); err == nil {
		t.Error("ListenTCP accepted network udp")
	}
	// Detach, twice: the second finds no program and is not an error.
	if err := s.Attach(ln); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := Detach(ln); err != nil {
			t.Errorf("Detach: %v", err)
		}
	}
}

// TestSteerPrivilege: without CAP_BPF, Check and New fail with an error
// that wraps ErrPermission and names CAP_BPF; with CAP_BPF alone (no
// CAP_NET_ADMIN, not root) both work. The test binary runs itself as
// nobody in the lab's server namespace, once with no capabilities and
// once with CAP_BPF as its only (ambient) capability.
func TestSteerPrivilege(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 1})
	run := func(caps []uintptr) childResult {
		t.Helper()
		var out strings.Builder
		cmd := exec.Command("/proc/self/exe", "-test.run=^$")
		cmd.Env = append(os.Environ(), envChild+"=1")
		cmd.Stdout, cmd.Stderr = &out, &out
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{
			Credential:  &syscall.Credential{Uid: 65534, Gid: 65534},
			AmbientCaps: caps,
		}
		if err := lab.Server.Start(cmd); err != nil {
			t.Fatal(err)
		}
		if err := cmd.Wait(); err != nil {
			t.Fatalf("child: %v: %s", err, out.String())
		}
		var r childResult
		if err := json.Unmarshal([]byte(out.String()), &r); err != nil {
			t.Fatalf("child said %q: %v", out.String(), err)
		}
		return r
	}
	r := run(nil)
	t.Logf("without capabilities: Check: %s", r.Check)
	for _, c := range []struct {
		what, err string
		perm      bool
	}{{"Check", r.Check, r.CheckPerm}, {"New", r.New, r.NewPerm}} {
		if !c.perm || !strings.Contains(c.err, "CAP_BPF") {
			t.Errorf("%s without CAP_BPF: %q (wraps ErrPermission: %v), want ErrPermission naming CAP_BPF", c.what, c.err, c.perm)
		}
	}
	r = run([]uintptr{unix.CAP_BPF})
	if r.Check != "" || r.New != "" || !r.NewMigrates {
		t.Errorf("with CAP_BPF only: Check %q, New %q, migrates %v; want both to work, SELECT_OR_MIGRATE", r.Check, r.New, r.NewMigrates)
	}
}

// BenchmarkSet is a slot re-point: one map update.
func BenchmarkSet(b *testing.B) {
	lab := netlab.NewT(b, netlab.Options{Clients: 1})
	s := newSelector(b, Spec{Workers: 2})
	g := newGroup(b, lab.Server, "tcp4", addrPort(lab.ServerAddr4, 7000))
	a, c := g.add(false).ln, g.add(false).ln
	if err := s.Attach(a); err != nil {
		b.Fatal(err)
	}
	for i := 0; b.Loop(); i++ {
		ln := a
		if i%2 == 1 {
			ln = c
		}
		if err := s.Set(0, ln); err != nil {
			b.Fatal(err)
		}
	}
}

// TestSteerHandover: a Selector's array, handed to another process with
// the group's sockets, lets that process rebuild a Selector over the
// slots as they are (Open) and attach its own program, while a fresh New
// could not take the sockets (EBUSY).
func TestSteerHandover(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 16})
	spec := Spec{Workers: 4}
	dst := addrPort(lab.ServerAddr4, 7000)
	old, err := New(spec)
	if err != nil {
		t.Fatal(err)
	}
	g := newGroup(t, lab.Server, "tcp4", dst)
	fill(t, old, g)
	array, err := old.ArrayFile()
	if err != nil {
		t.Fatal(err)
	}
	defer array.Close()
	old.Close() // the old master is gone; the group's program holds the array

	// The new master is another process: the array and two listeners
	// reach it as inherited descriptors.
	spare := g.add(true)
	var files []*os.File
	for _, ln := range []*net.TCPListener{g.lns[1].ln, spare.ln} {
		f, err := ln.File()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files = append(files, f)
	}
	var out strings.Builder
	cmd := exec.Command("/proc/self/exe", "-test.run=^$")
	cmd.Env = append(os.Environ(), envChild+"=adopt")
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.ExtraFiles = append([]*os.File{array}, files...)
	if err := lab.Server.Start(cmd); err != nil {
		t.Fatal(err)
	}
	// os/exec took the descriptors with File.Fd, which switched the
	// sockets (their shared file description) to blocking mode: a
	// blocking Accept could not be interrupted by Close. Undo it before a
	// connection wakes the accepting goroutines.
	for _, ln := range []*net.TCPListener{g.lns[1].ln, spare.ln} {
		if err := control(ln, func(fd int) error { return unix.SetNonblock(fd, true) }); err != nil {
			t.Fatal(err)
		}
	}
	if err := cmd.Wait(); err != nil || strings.TrimSpace(out.String()) != "adopted" {
		t.Fatalf("adopting process: %v: %s", err, out.String())
	}
	expect(t, lab.Client, lab.ClientAddrs4, dst, func(a netip.Addr) int {
		if slot := spec.Slot(a); slot != 3 {
			return slot
		}
		return spare.id
	})

	// In this process too, from the file: the slots are as they were.
	s, err := Open(spec, array)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i, want := range []*net.TCPListener{g.lns[0].ln, g.lns[1].ln, g.lns[2].ln, spare.ln} {
		c, _ := SocketCookie(want)
		if got, ok, err := s.Cookie(i); err != nil || !ok || got != c {
			t.Errorf("slot %d after Open: cookie %d, %v, %v; want %d", i, got, ok, err, c)
		}
	}
	if _, err := Open(spec, files[0]); err == nil {
		t.Error("Open accepted a socket for an array")
	}
}

// TestSteerNothingLeft: once the Selector is closed and the group's
// sockets are gone, the kernel frees the program and the array.
func TestSteerNothingLeft(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	s, err := New(Spec{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	g := newGroup(t, lab.Server, "tcp4", addrPort(lab.ServerAddr4, 7000))
	fill(t, s, g)
	progID, arrayID, err := s.IDs()
	if err != nil || progID == 0 || arrayID == 0 {
		t.Fatalf("IDs: %d, %d, %v", progID, arrayID, err)
	}
	if err := errors.Join(s.Close(), s.Close()); err != nil {
		t.Errorf("Close twice: %v", err)
	}
	if p, err := ebpf.NewProgramFromID(ebpf.ProgramID(progID)); err != nil {
		t.Fatalf("program %d gone while the group holds it: %v", progID, err)
	} else {
		p.Close()
	}
	for _, l := range g.lns {
		l.ln.Close()
	}
	// Freed after an RCU grace period: poll, bounded.
	deadline := time.Now().Add(wait)
	for {
		p, perr := ebpf.NewProgramFromID(ebpf.ProgramID(progID))
		m, merr := ebpf.NewMapFromID(ebpf.MapID(arrayID))
		if perr == nil {
			p.Close()
		}
		if merr == nil {
			m.Close()
		}
		if errors.Is(perr, os.ErrNotExist) && errors.Is(merr, os.ErrNotExist) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v, program %d: %v; array %d: %v; want both gone", wait, progID, perr, arrayID, merr)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestSteerStats: with BPF statistics on (for this test only), the
// program runs once per new connection.
func TestSteerStats(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 32})
	spec := Spec{Workers: 4}
	s := newSelector(t, spec)
	g := newGroup(t, lab.Server, "tcp4", addrPort(lab.ServerAddr4, 7000))
	fill(t, s, g)
	stats, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
	if err != nil {
		t.Fatalf("enable BPF statistics: %v", err)
	}
	expect(t, lab.Client, lab.ClientAddrs4, g.addr, spec.Slot)
	runs, ns, err := s.Stats()
	stats.Close()
	if err != nil {
		t.Fatal(err)
	}
	if runs < uint64(len(lab.ClientAddrs4)) {
		t.Errorf("%d runs for %d connections", runs, len(lab.ClientAddrs4))
	}
	if runs > 0 {
		t.Logf("%d runs, %d ns each on average", runs, ns/runs)
	}
}

// TestSteerMigrateHandshake: a request still in its handshake when its
// listener closes (held there by TCP_DEFER_ACCEPT until the client's
// first data) moves to its slot's new socket when that data arrives: the
// kernel runs the program with the request as migrating_sk and the
// client's packet.
func TestSteerMigrateHandshake(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 16})
	spec := Spec{Workers: 4}
	port := uint16(7100)
	for _, fam := range []struct {
		name    string
		network string
		bind    netip.Addr
		dst     netip.Addr
		srcs    []netip.Addr
	}{
		{"ipv4", "tcp4", lab.ServerAddr4, lab.ServerAddr4, lab.ClientAddrs4},
		{"ipv6", "tcp6", lab.ServerAddr6, lab.ServerAddr6, lab.ClientAddrs6},
		{"dual-stack_ipv4", "tcp", netip.IPv6Unspecified(), lab.ServerAddr4, lab.ClientAddrs4},
	} {
		t.Run(fam.name, func(t *testing.T) {
			port++
			s := newSelector(t, spec)
			g := newGroup(t, lab.Server, fam.network, addrPort(fam.bind, port))
			for i := range spec.Workers {
				if err := s.Set(i, g.add(i != 1).ln); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Attach(g.lns[0].ln); err != nil {
				t.Fatal(err)
			}
			if err := control(g.lns[1].ln, func(fd int) error {
				return unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 30)
			}); err != nil {
				t.Fatal(err)
			}
			var pending []*conn
			for _, src := range fam.srcs {
				if spec.Slot(src) != 1 {
					continue
				}
				c, err := dial(lab.Client, "tcp", src, addrPort(fam.dst, port), wait)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				pending = append(pending, c)
			}
			repl := g.add(true)
			if err := s.Set(1, repl.ln); err != nil {
				t.Fatal(err)
			}
			g.lns[1].ln.Close()
			for i, c := range pending {
				if _, err := fmt.Fprintf(c, "h%d\n", i); err != nil {
					t.Fatal(err)
				}
			}
			for i, c := range pending {
				greeting, err := c.line()
				if want := fmt.Sprintf("L%d", repl.id); err != nil || greeting != want {
					t.Errorf("request %d: %q, %v; want %q", i, greeting, err, want)
				}
			}
		})
	}
}
