//go:build linux

package ipcluster_test

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
)

// A client that asks for Multipath TCP gets plain TCP from a worker: the
// extra subflows would come from other addresses, which the routes send to
// other slots' workers (see listenTCP).
func TestWorkersRefuseMPTCP(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{})
	for _, ns := range []*netlab.NS{lab.Server, lab.Client} {
		if err := ns.Sysctl("net/mptcp/enabled", "1"); err != nil {
			t.Skipf("kernel without MPTCP: %v", err)
		}
	}
	c := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4})
	c.waitReady()
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)

	// The lab's kernel does MPTCP: a listener that wants it gets it.
	var own net.Listener
	err := lab.Server.Do(func() error {
		var lc net.ListenConfig
		lc.SetMultipathTCP(true)
		var err error
		own, err = lc.Listen(context.Background(), "tcp4", netip.AddrPortFrom(lab.ServerAddr4, 9000).String())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer own.Close()
	go func() {
		for {
			c, err := own.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	conn := dialMPTCP(t, lab, lab.ClientAddrs4[0], netip.AddrPortFrom(lab.ServerAddr4, 9000))
	if mp, err := conn.(*net.TCPConn).MultipathTCP(); err != nil || !mp {
		t.Skipf("an MPTCP listener of the lab's kernel did not do MPTCP (%v, %v)", mp, err)
	}
	conn.Close()

	for _, src := range lab.ClientAddrs4[:2] {
		conn := dialMPTCP(t, lab, src, dst)
		ec, err := readFirst(conn)
		if err != nil {
			t.Fatalf("from %s: %v", src, err)
		}
		mp, err := conn.(*net.TCPConn).MultipathTCP()
		ec.Close()
		if err != nil || mp {
			t.Errorf("from %s: the worker (slot %d) accepted MPTCP (%v, %v); want a fallback to plain TCP", src, ec.first.Slot, mp, err)
		}
	}
}

func dialMPTCP(t *testing.T, lab *netlab.Lab, src netip.Addr, dst netip.AddrPort) net.Conn {
	t.Helper()
	var conn net.Conn
	err := lab.Client.Do(func() error {
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))}
		d.SetMultipathTCP(true)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var err error
		conn, err = d.DialContext(ctx, "tcp4", dst.String())
		return err
	})
	if err != nil {
		t.Fatalf("dial %s from %s with MPTCP: %v", dst, src, err)
	}
	return conn
}
