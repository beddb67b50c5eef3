//go:build linux

package ipcluster

// The workers' listening sockets, which the master makes and holds.
//
// The master opens a worker's sockets (one per public port, bound where
// Config.Addr says, on a port the OS picks) before it spawns the worker,
// hands them over as inherited descriptors (EnvSockets) and keeps its own
// copy while the worker serves. So when a serving worker dies, its
// sockets do not: the connections that reach them meanwhile wait in their
// accept queues (a UDP socket's datagrams in its receive queue), the
// routes stay as they are, and the worker that takes the slot over, a new
// one or a spare, inherits the same sockets: nobody is refused, and no
// rule is written.
//
//	spawn ──open──▶ worker serves (master holds a copy) ──retired──▶ master lets go; the worker drains its copy
//	                        │
//	                        └──exits──▶ held by the slot ──▶ the slot's next worker inherits them
//
// The sockets of a worker that did not serve its slot close with it (the
// master's copy then), and the held sockets of a slot whose next worker
// came with sockets of its own close once the rules point away from them.
// A retired worker's copy is the last one: it closes once its accept
// queue is empty (Worker.closeWhenQueuesEmpty).
//
// The sockets travel with a worker everywhere it goes: a spare gets its
// slot's with the assign, a worker reconnecting to a new master hands its
// own back with its hello, and a handover carries the held ones.

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/procfs"
	"github.com/ipcluster/ipcluster/internal/proto"
	"github.com/ipcluster/ipcluster/internal/steer"
)

// sockSet is one worker's listening sockets: a descriptor per public port,
// in Config order (routing.ports), and the ports they are bound to. On the
// bpf backend files are the sockets in the public port's reuseport group
// and direct the worker's own sockets (where a DNAT backend's worker
// listens), whose ports are the ports here (see bpf.go).
type sockSet struct {
	ports   slotTarget
	files   []*os.File
	direct  []*os.File
	cookies []uint64 // the files' socket cookies (bpf), as cookie reads them
}

// cookie is the socket cookie of files[i], read once.
func (s *sockSet) cookie(i int) (uint64, error) {
	if s.cookies == nil {
		s.cookies = make([]uint64, len(s.files))
	}
	if s.cookies[i] == 0 {
		c, err := steer.SocketCookie(s.files[i])
		if err != nil {
			return 0, err
		}
		s.cookies[i] = c
	}
	return s.cookies[i], nil
}

// openSockets opens a socket for each of rt's public ports, as a worker
// listens: at cfg's address, on a port the OS picks, TCP without MPTCP;
// on the bpf backend, one in the port's reuseport group and one of the
// worker's own.
func openSockets(cfg *Config, rt *routing, bpf *bpfWriter) (*sockSet, error) {
	s := &sockSet{ports: slotTarget{}}
	for _, p := range rt.ports {
		network, addr := cfg.listenNetwork(p.Proto)
		var sel *steer.Selector
		if rt.bpf {
			network, addr = cfg.groupNetwork(p)
			var err error
			if sel, err = bpf.selector(p); err != nil {
				s.close()
				return nil, err
			}
		}
		f, port, err := openSocket(p, network, addr, sel)
		if err == nil && rt.bpf {
			var d *os.File
			dn, da := cfg.listenNetwork(p.Proto)
			if d, port, err = openSocket(p, dn, da, nil); err == nil {
				s.direct = append(s.direct, d)
			}
		}
		if err != nil {
			if f != nil {
				f.Close()
			}
			s.close()
			return nil, fmt.Errorf("open the socket for public port %s on %s: %w", p, addr, err)
		}
		s.files = append(s.files, f)
		s.ports[p] = uint16(port)
	}
	return s, nil
}

// openSocket opens one socket for p and returns the master's descriptor
// and the port it is bound to; with a selector, in the reuseport group of
// its address. The first socket of a group is made with the selector's
// program attached before bind, so the group never routes without it (the
// kernel's default hashes connections over the group); the others join
// that group, and its program, with a plain SO_REUSEPORT bind (the kernel
// refuses a socket that brings a program of its own into a group, with
// EADDRINUSE).
func openSocket(p Port, network, addr string, group *steer.Selector) (*os.File, int, error) {
	listenUDP := func() (*net.UDPConn, error) {
		pc, err := net.ListenPacket(network, addr)
		if err != nil {
			return nil, err
		}
		return pc.(*net.UDPConn), nil
	}
	listenTCP := func() (*net.TCPListener, error) {
		ln, err := listenTCP(network, addr)
		if err != nil {
			return nil, err
		}
		return ln.(*net.TCPListener), nil
	}
	if group != nil {
		listenUDP = func() (*net.UDPConn, error) {
			c, err := group.ListenUDP(network, addr)
			if errors.Is(err, unix.EADDRINUSE) {
				c, err = steer.ListenUDP(network, addr)
			}
			return c, err
		}
		listenTCP = func() (*net.TCPListener, error) {
			l, err := group.ListenTCP(network, addr)
			if errors.Is(err, unix.EADDRINUSE) {
				l, err = steer.ListenTCP(network, addr)
			}
			return l, err
		}
	}
	if p.Proto == UDP {
		c, err := listenUDP()
		if err != nil {
			return nil, 0, err
		}
		defer c.Close()
		f, err := c.File()
		return f, c.LocalAddr().(*net.UDPAddr).Port, err
	}
	l, err := listenTCP()
	if err != nil {
		return nil, 0, err
	}
	defer l.Close()
	f, err := l.File()
	return f, l.Addr().(*net.TCPAddr).Port, err
}

// adoptSockets takes the descriptors a worker sent with its hello: its
// sockets for want (the ports it reported), in rt's port order. Each must
// be a socket of the port's protocol bound to the reported port (a TCP one
// listening). On error every descriptor is closed.
func adoptSockets(rt *routing, want slotTarget, fds []int) (*sockSet, error) {
	n := len(rt.ports)
	if rt.bpf {
		n *= 2
	}
	if len(fds) > n {
		proto.CloseFDs(fds[n:]) // arrays: offered to the backend before this
		fds = fds[:n]
	}
	if len(fds) != n {
		proto.CloseFDs(fds)
		return nil, fmt.Errorf("came with %d descriptors for %d public ports, want %d", len(fds), len(rt.ports), n)
	}
	s := &sockSet{ports: slotTarget{}}
	for i, fd := range fds {
		p := rt.ports[i%len(rt.ports)]
		port, direct := want[p], i >= len(rt.ports)
		if rt.bpf && !direct {
			port = p.Public // in the public port's group
		}
		if err := checkSocket(fd, p, port); err != nil {
			s.close()
			proto.CloseFDs(fds[i:])
			return nil, fmt.Errorf("descriptor %d for public port %s: %w", i, p, err)
		}
		f := os.NewFile(uintptr(fd), "socket "+p.String())
		if direct {
			s.direct = append(s.direct, f)
		} else {
			s.files = append(s.files, f)
		}
		s.ports[p] = want[p]
	}
	return s, nil
}

// checkSocket checks that fd is a socket for p bound to port (listening,
// for TCP).
func checkSocket(fd int, p Port, port uint16) error {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return fmt.Errorf("not a socket: %w", err)
	}
	wantType := unix.SOCK_STREAM
	if p.Proto == UDP {
		wantType = unix.SOCK_DGRAM
	}
	if typ != wantType {
		return fmt.Errorf("socket type %d, want %d", typ, wantType)
	}
	if p.Proto == TCP {
		if on, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || on == 0 {
			return fmt.Errorf("not a listening socket (%v)", err)
		}
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return fmt.Errorf("getsockname: %w", err)
	}
	var got int
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		got = a.Port
	case *unix.SockaddrInet6:
		got = a.Port
	default:
		return fmt.Errorf("not an internet socket (%T)", sa)
	}
	if got != int(port) {
		return fmt.Errorf("bound to port %d, but the worker reported %d", got, port)
	}
	return nil
}

// fds returns the descriptors, in port order. Never through File.Fd,
// which puts the descriptor in blocking mode: a mode the socket's file
// description shares with every worker's copy, whose Accept could then
// no longer be interrupted by Close.
func (s *sockSet) fds() []int { return rawFDs(s.all()) }

// rawFDs is rawFD of each file.
func rawFDs(files []*os.File) []int {
	out := make([]int, len(files))
	for i, f := range files {
		out[i] = rawFD(f)
	}
	return out
}

// all is every descriptor, as a worker receives them: the routed sockets
// in port order, then the direct ones (bpf).
func (s *sockSet) all() []*os.File { return append(slices.Clip(s.files), s.direct...) }

// unblock puts the sockets back in non-blocking mode once a spawn has
// passed them on: os/exec takes ExtraFiles' descriptors with File.Fd.
func (s *sockSet) unblock() {
	for _, f := range s.all() {
		if err := unix.SetNonblock(rawFD(f), true); err != nil {
			continue // a closed socket has no mode to restore
		}
	}
}

// rawFD is f's descriptor, valid while f is open, without File.Fd's
// switch to blocking mode.
func rawFD(f *os.File) int {
	fd := -1
	if rc, err := f.SyscallConn(); err == nil {
		_ = rc.Control(func(u uintptr) { fd = int(u) })
	}
	return fd
}

// env is EnvSockets' value for these sockets: the public ports in order.
func (s *sockSet) env(rt *routing, arrays bool) string {
	parts := make([]string, len(rt.ports))
	for i, p := range rt.ports {
		parts[i] = p.String()
	}
	v := strings.Join(parts, ",")
	if len(s.direct) > 0 {
		v += envSocketsDirect
	}
	if arrays {
		v += envSocketsArrays
	}
	return v
}

// EnvSockets ends with envSocketsDirect when each port also has the
// worker's own socket (bpf), descriptors 3+n on (n the number of ports),
// and then with envSocketsArrays when the bpf backend's arrays follow, one
// per port, for the worker to keep (bpfWriter.offerArrays).
const (
	envSocketsDirect = "+direct"
	envSocketsArrays = "+arrays"
)

// workerArrays are the bpf backend's arrays the master hands its workers
// to keep, or none: on a DNAT backend, and when the workers run as
// another user (WorkerUser), who must not be able to rewrite the arrays.
// Then a master started after a kill -9 of this one takes the groups over
// with a gap of some milliseconds (bpfWriter.takeGroup).
func (m *master) workerArrays() ([]*os.File, error) {
	if m.steer == nil || m.worker != nil {
		return nil, nil
	}
	return m.steer.arrayFiles()
}

// close closes the master's copies; safe on nil and more than once.
func (s *sockSet) close() {
	if s == nil {
		return
	}
	for _, f := range s.all() {
		f.Close()
	}
	s.files, s.direct = nil, nil
}

// parseEnvSockets reads EnvSockets: it must name ports, in order. It is
// the worker's side: descriptors 3 on are its sockets.
func parseEnvSockets(v string, ports []Port) (n int, err error) {
	list, arrays := strings.CutSuffix(v, envSocketsArrays)
	list, direct := strings.CutSuffix(list, envSocketsDirect)
	parts := strings.Split(list, ",")
	if len(parts) != len(ports) {
		return 0, fmt.Errorf("%s=%q names %d sockets for %d public ports", EnvSockets, v, len(parts), len(ports))
	}
	for i, p := range ports {
		if parts[i] != p.String() {
			return 0, fmt.Errorf("%s=%q: socket %d is for %s, but Config.Ports[%d] is %s", EnvSockets, v, i, parts[i], i, p)
		}
	}
	n = len(ports)
	if direct {
		n += len(ports)
	}
	if arrays {
		n += len(ports)
	}
	return n, nil
}

// inheritedFD is the descriptor of the i-th inherited socket.
func inheritedFD(i int) uintptr { return uintptr(3 + i) }

// releaseSockets decides, as p exits, what becomes of its sockets: a
// serving worker's stay with its slot (held) for the slot's next worker,
// as do the held sockets a starting worker had inherited; others close,
// once no route points at them.
func (m *master) releaseSockets(p *proc) {
	s := p.socks
	p.socks = nil
	switch {
	case s == nil:
		// Retired (or adopted without sockets): its own copy was the
		// last, and is gone with it.
		m.rules.noteDeadTCP(p.ports)
	case p.slot >= 0 && m.held[p.slot] == s:
		// It inherited the slot's held sockets and never served: the
		// slot keeps them for the next one.
	case p.state.serving() && p.slot >= 0 && p.slot < len(m.slots) && m.slots[p.slot] == p:
		m.held[p.slot] = s
		m.log.Info("the slot keeps its sockets for its next worker", append(p.logAttrs(), "ports", portsString(s.ports, m.rules.rt.ports))...)
	case m.sharedSockets(s, p):
		// Another worker took them over (a spare given the slot).
	default:
		m.unroute(s)
	}
}

// sharedSockets reports whether a worker other than p holds s.
func (m *master) sharedSockets(s *sockSet, p *proc) bool {
	for _, q := range m.procs {
		if q != p && q.socks == s {
			return true
		}
	}
	return false
}

// unroute closes sockets the master no longer gives anyone: now, or after
// the next rule write if the rules still point a slot at them (closed
// before, they would refuse that slot's clients meanwhile).
func (m *master) unroute(s *sockSet) {
	m.rules.noteDeadTCP(s.ports)
	if m.rules.routesTo(s.ports) {
		m.unrouted = append(m.unrouted, s)
		m.rules.markDirty()
		return
	}
	s.close()
}

// closeSockets closes every socket the master holds for no worker: at a
// stop, once the routes are withdrawn.
func (m *master) closeSockets() {
	for slot, s := range m.held {
		s.close()
		delete(m.held, slot)
	}
	for _, s := range m.unrouted {
		s.close()
	}
	m.unrouted = nil
}

// protoPorts lists t in order, as the protocol carries it.
func protoPorts(t slotTarget, order []Port) []proto.Port {
	out := make([]proto.Port, 0, len(order))
	for _, p := range order {
		out = append(out, proto.Port{Public: p.Public, Proto: p.Proto.String(), Worker: t[p]})
	}
	return out
}

// takeHeld takes the held sockets a handover brought, for their slots'
// next workers: spawned at once (startAdoption), or a spare.
func (m *master) takeHeld(held []proto.HeldSockets, fds []int) {
	for _, h := range held {
		n := len(h.Ports)
		mine := fds[:n]
		fds = fds[n:]
		ports := slotTarget{}
		for _, pp := range h.Ports {
			if prot, ok := parseProtocol(pp.Proto); ok {
				ports[Port{Public: pp.Public, Proto: prot}] = pp.Worker
			}
		}
		if h.Slot < 0 || h.Slot >= len(m.slots) || m.held[h.Slot] != nil {
			proto.CloseFDs(mine)
			continue
		}
		s, err := adoptSockets(m.rules.rt, ports, mine)
		if err != nil {
			m.log.Warn("takeover: a held socket is unusable; the slot gets new ones", "slot", h.Slot, "err", err)
			continue
		}
		m.held[h.Slot] = s
	}
}

// bound is the ports of this namespace's bound sockets, by protocol: the
// listening TCP ones and the bound UDP ones.
type bound map[Protocol]map[uint16]bool

// boundPorts reads them from /proc/net.
func boundPorts() (bound, error) {
	b := bound{TCP: {}, UDP: {}}
	for _, t := range []struct {
		table, state string
		proto        Protocol
	}{{"tcp", "0A", TCP}, {"tcp6", "0A", TCP}, {"udp", "07", UDP}, {"udp6", "07", UDP}} {
		ports, err := procfs.BoundPorts(t.table, t.state)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue // no IPv6 here
			}
			return nil, err
		}
		maps.Copy(b[t.proto], ports)
	}
	return b, nil
}

// hasAll reports whether a socket is bound to each of t's worker ports.
func (b bound) hasAll(t slotTarget) bool {
	for p, port := range t {
		if !b[p.Proto][port] {
			return false
		}
	}
	return true
}

// findSockets finds the sockets whose ports are t (the bpf backend's
// resolve): a worker's, a slot's held ones, or those waiting to close.
func (m *master) findSockets(t slotTarget) *sockSet {
	for _, p := range m.procs {
		if p.socks != nil && maps.Equal(p.socks.ports, t) {
			return p.socks
		}
	}
	for _, s := range m.held {
		if maps.Equal(s.ports, t) {
			return s
		}
	}
	for _, s := range m.unrouted {
		if maps.Equal(s.ports, t) {
			return s
		}
	}
	return nil
}
