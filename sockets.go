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
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/procfs"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// sockSet is one worker's listening sockets: a descriptor per public port,
// in Config order (routing.ports), and the ports they are bound to.
type sockSet struct {
	ports slotTarget
	files []*os.File
}

// openSockets opens a socket for each of rt's public ports, as a worker
// listens: at cfg's address, on a port the OS picks, TCP without MPTCP.
func openSockets(cfg *Config, rt *routing) (*sockSet, error) {
	s := &sockSet{ports: slotTarget{}}
	for _, p := range rt.ports {
		network, addr := cfg.listenNetwork(p.Proto)
		var f *os.File
		var port int
		var err error
		if p.Proto == UDP {
			var c net.PacketConn
			if c, err = net.ListenPacket(network, addr); err == nil {
				port = c.LocalAddr().(*net.UDPAddr).Port
				f, err = c.(*net.UDPConn).File()
				c.Close()
			}
		} else {
			var l net.Listener
			if l, err = listenTCP(network, addr); err == nil {
				port = l.Addr().(*net.TCPAddr).Port
				f, err = l.(*net.TCPListener).File()
				l.Close()
			}
		}
		if err != nil {
			s.close()
			return nil, fmt.Errorf("open the socket for public port %s on %s: %w", p, addr, err)
		}
		s.files = append(s.files, f)
		s.ports[p] = uint16(port)
	}
	return s, nil
}

// adoptSockets takes the descriptors a worker sent with its hello: its
// sockets for want (the ports it reported), in rt's port order. Each must
// be a socket of the port's protocol bound to the reported port (a TCP one
// listening). On error every descriptor is closed.
func adoptSockets(rt *routing, want slotTarget, fds []int) (*sockSet, error) {
	if len(fds) != len(rt.ports) {
		proto.CloseFDs(fds)
		return nil, fmt.Errorf("came with %d descriptors for %d public ports", len(fds), len(rt.ports))
	}
	s := &sockSet{ports: slotTarget{}}
	for i, p := range rt.ports {
		fd := fds[i]
		if err := checkSocket(fd, p, want[p]); err != nil {
			s.close()
			proto.CloseFDs(fds[i:])
			return nil, fmt.Errorf("descriptor %d for public port %s: %w", i, p, err)
		}
		s.files = append(s.files, os.NewFile(uintptr(fd), "socket "+p.String()))
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
func (s *sockSet) fds() []int {
	out := make([]int, len(s.files))
	for i, f := range s.files {
		out[i] = rawFD(f)
	}
	return out
}

// unblock puts the sockets back in non-blocking mode once a spawn has
// passed them on: os/exec takes ExtraFiles' descriptors with File.Fd.
func (s *sockSet) unblock() {
	for _, f := range s.files {
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
func (s *sockSet) env(rt *routing) string {
	parts := make([]string, len(rt.ports))
	for i, p := range rt.ports {
		parts[i] = p.String()
	}
	return strings.Join(parts, ",")
}

// close closes the master's copies; safe on nil and more than once.
func (s *sockSet) close() {
	if s == nil {
		return
	}
	for _, f := range s.files {
		f.Close()
	}
	s.files = nil
}

// parseEnvSockets reads EnvSockets: it must name ports, in order. It is
// the worker's side: descriptors 3 on are its sockets.
func parseEnvSockets(v string, ports []Port) error {
	parts := strings.Split(v, ",")
	if len(parts) != len(ports) {
		return fmt.Errorf("%s=%q names %d sockets for %d public ports", EnvSockets, v, len(parts), len(ports))
	}
	for i, p := range ports {
		if parts[i] != p.String() {
			return fmt.Errorf("%s=%q: socket %d is for %s, but Config.Ports[%d] is %s", EnvSockets, v, i, parts[i], i, p)
		}
	}
	return nil
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
	default:
		m.unroute(s)
	}
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
