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
func listenConfig() net.ListenConfig {
	lc := net.ListenConfig{
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			}); err != nil {
				return err
			}
			return serr
		},
	}
	lc.SetMultipathTCP(false)
	return lc
}

// ListenTCP listens on addr ("tcp", "tcp4" or "tcp6", as net.Listen) with
// SO_REUSEPORT, in the calling thread's network namespace. Sockets of the
// same user on the same address form one group; "tcp" on [::] (or an
// empty host) makes a dual-stack group that IPv4 clients reach too, as
// IPv4 packets.
func ListenTCP(network, addr string) (*net.TCPListener, error) {
	if network != "tcp" && network != "tcp4" && network != "tcp6" {
		return nil, fmt.Errorf("steer: listen on %s: network %q is not tcp, tcp4 or tcp6", addr, network)
	}
	lc := listenConfig()
	ln, err := lc.Listen(context.Background(), network, addr)
	if err != nil {
		return nil, listenErr(network, addr, err)
	}
	return ln.(*net.TCPListener), nil
}

// ListenUDP binds addr ("udp", "udp4" or "udp6") with SO_REUSEPORT, as
// ListenTCP.
func ListenUDP(network, addr string) (*net.UDPConn, error) {
	if network != "udp" && network != "udp4" && network != "udp6" {
		return nil, fmt.Errorf("steer: listen on %s: network %q is not udp, udp4 or udp6", addr, network)
	}
	lc := listenConfig()
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
