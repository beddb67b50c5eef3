//go:build linux

package steer

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// listenConfig sets SO_REUSEPORT before bind, so that every socket of a
// group joins it, and turns MPTCP off: Go makes MPTCP listeners by default
// where the kernel has MPTCP, and the kernel refuses to attach an
// SK_REUSEPORT program to an MPTCP socket, or to put one in an array.
//
// With a program (prog > 0) it also attaches it before bind: a socket that
// founds its group then founds it with the program, so no connection is
// ever hashed over the group by the kernel's default; one that joins an
// existing group leaves that group's program in place.
func listenConfig(prog int) net.ListenConfig {
	lc := net.ListenConfig{
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
				if serr == nil && prog > 0 {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, prog)
				}
			}); err != nil {
				return err
			}
			return serr
		},
	}
	lc.SetMultipathTCP(false)
	return lc
}

// ListenTCP is the package's ListenTCP with s's program attached before
// bind: the group it founds never routes without it.
func (s *Selector) ListenTCP(network, addr string) (*net.TCPListener, error) {
	return listenTCP(network, addr, s.prog.FD())
}

// ListenUDP is the package's ListenUDP with s's program attached before
// bind, as ListenTCP.
func (s *Selector) ListenUDP(network, addr string) (*net.UDPConn, error) {
	return listenUDP(network, addr, s.prog.FD())
}

// ListenTCP listens on addr ("tcp", "tcp4" or "tcp6", as net.Listen) with
// SO_REUSEPORT, in the calling thread's network namespace. Sockets of the
// same user on the same address form one group; "tcp" on [::] (or an
// empty host) makes a dual-stack group that IPv4 clients reach too, as
// IPv4 packets.
func ListenTCP(network, addr string) (*net.TCPListener, error) { return listenTCP(network, addr, 0) }

func listenTCP(network, addr string, prog int) (*net.TCPListener, error) {
	if network != "tcp" && network != "tcp4" && network != "tcp6" {
		return nil, fmt.Errorf("steer: listen on %s: network %q is not tcp, tcp4 or tcp6", addr, network)
	}
	lc := listenConfig(prog)
	ln, err := lc.Listen(context.Background(), network, addr)
	if err != nil {
		return nil, listenErr(network, addr, err)
	}
	return ln.(*net.TCPListener), nil
}

// ListenUDP binds addr ("udp", "udp4" or "udp6") with SO_REUSEPORT, as
// ListenTCP.
func ListenUDP(network, addr string) (*net.UDPConn, error) { return listenUDP(network, addr, 0) }

func listenUDP(network, addr string, prog int) (*net.UDPConn, error) {
	if network != "udp" && network != "udp4" && network != "udp6" {
		return nil, fmt.Errorf("steer: listen on %s: network %q is not udp, udp4 or udp6", addr, network)
	}
	lc := listenConfig(prog)
	c, err := lc.ListenPacket(context.Background(), network, addr)
	if err != nil {
		return nil, listenErr(network, addr, err)
	}
	return c.(*net.UDPConn), nil
}

func listenErr(network, addr string, err error) error {
	if errors.Is(err, unix.EADDRINUSE) {
		return fmt.Errorf("steer: listen on %s %s: %w: a socket without SO_REUSEPORT, or another user's, holds the address", network, addr, err)
	}
	return fmt.Errorf("steer: listen on %s %s: %w", network, addr, err)
}
