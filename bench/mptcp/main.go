//go:build linux

// Command mptcp measures what an MPTCP listener costs a worker's clients,
// to back the library's choice of plain TCP listeners (see the README's
// "Multipath TCP"). Since Go 1.24, net.Listen creates an MPTCP socket where
// the kernel has net.mptcp.enabled (the default on Linux 5.6 and later);
// clients that do not ask for MPTCP (almost all of them) are served by the
// fallback, a plain TCP subflow under an MPTCP socket.
//
// Inside a throwaway pair of network namespaces, a server listens once with
// MPTCP and once without, and a load generator in the client namespace
// measures, per listener kind, the rate of
//
//   - keepalive: 64-byte request and answer over held connections;
//   - short: a connection per request, closed by the client;
//
// with plain TCP clients and with MPTCP clients. Cells alternate in every
// round, so a busy machine weighs on both sides alike; the medians and the
// ratio MPTCP/TCP are printed side by side. Run as root from the repository
// root:
//
//	sudo go run ./bench/mptcp -rounds 5
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
)

const port = 7000

func main() {
	rounds := flag.Int("rounds", 5, "rounds: every cell runs once per round")
	duration := flag.Duration("duration", time.Second, "duration of each cell")
	conc := flag.Int("conc", 16, "concurrent client connections (goroutines)")
	flag.Parse()
	log.SetFlags(0)
	if err := run(*rounds, *duration, *conc); err != nil {
		log.Fatal(err)
	}
}

type cell struct {
	mode                     string // keepalive, short
	serverMPTCP, clientMPTCP bool
}

func (c cell) String() string {
	return fmt.Sprintf("%s/%s client", c.mode, kind(c.clientMPTCP))
}

func kind(mptcp bool) string {
	if mptcp {
		return "mptcp"
	}
	return "tcp"
}

func run(rounds int, d time.Duration, conc int) error {
	lab, err := netlab.New(netlab.Options{Clients: 16})
	if err != nil {
		return err
	}
	defer lab.Close()
	if err := lab.Server.Sysctl("net/mptcp/enabled", "1"); err != nil {
		return fmt.Errorf("enable MPTCP in the lab (kernel without CONFIG_MPTCP?): %w", err)
	}
	if err := lab.Client.Sysctl("net/mptcp/enabled", "1"); err != nil {
		return fmt.Errorf("enable MPTCP in the lab: %w", err)
	}
	servers := map[bool]net.Listener{}
	for i, mptcp := range []bool{false, true} {
		var ln net.Listener
		err := lab.Server.Do(func() error {
			var lc net.ListenConfig
			lc.SetMultipathTCP(mptcp)
			var err error
			ln, err = lc.Listen(context.Background(), "tcp4", netip.AddrPortFrom(lab.ServerAddr4, uint16(port+i)).String())
			return err
		})
		if err != nil {
			return fmt.Errorf("listen (mptcp %v): %w", mptcp, err)
		}
		defer ln.Close()
		go serve(ln)
		servers[mptcp] = ln
	}
	var cells []cell
	for _, mode := range []string{"keepalive", "short"} {
		for _, clientMPTCP := range []bool{false, true} {
			for _, serverMPTCP := range []bool{false, true} {
				cells = append(cells, cell{mode, serverMPTCP, clientMPTCP})
			}
		}
	}
	rates := map[cell][]float64{}
	// Round 0 warms up (the first connections of a lab wait for its
	// addresses to settle) and is not counted.
	for r := range rounds + 1 {
		for _, c := range cells {
			dst := netip.AddrPortFrom(lab.ServerAddr4, uint16(port))
			if c.serverMPTCP {
				dst = netip.AddrPortFrom(lab.ServerAddr4, uint16(port+1))
			}
			n, err := load(lab, c, dst, d, conc)
			if err != nil {
				return fmt.Errorf("round %d, %s, %s server: %w", r, c, kind(c.serverMPTCP), err)
			}
			if r > 0 {
				rates[c] = append(rates[c], float64(n)/d.Seconds())
			}
		}
	}
	fmt.Printf("requests/s, median of %d rounds of %v, %d connections; the server listens with or without MPTCP\n\n", rounds, d, conc)
	fmt.Printf("%-24s %12s %12s %8s\n", "cell", "tcp server", "mptcp server", "ratio")
	for _, c := range cells {
		if c.serverMPTCP {
			continue
		}
		m := c
		m.serverMPTCP = true
		t, p := median(rates[c]), median(rates[m])
		fmt.Printf("%-24s %12.0f %12.0f %8.2f\n", c, t, p, p/t)
	}
	return nil
}

// serve answers every line with itself, until the client closes.
func serve(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			r := bufio.NewReader(c)
			for {
				line, err := r.ReadSlice('\n')
				if err != nil {
					return
				}
				if _, err := c.Write(line); err != nil {
					return
				}
			}
		}()
	}
}

var request = []byte(fmt.Sprintf("%063d\n", 0))

// load runs conc goroutines against dst for d and returns the requests
// answered.
func load(lab *netlab.Lab, c cell, dst netip.AddrPort, d time.Duration, conc int) (int64, error) {
	var done atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, conc)
	deadline := time.Now().Add(d)
	for g := range conc {
		src := lab.ClientAddrs4[g%len(lab.ClientAddrs4)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			var conn net.Conn
			buf := make([]byte, len(request))
			for time.Now().Before(deadline) {
				if conn == nil {
					var err error
					if conn, err = dial(lab, c.clientMPTCP, src, dst); err != nil {
						errs <- err
						return
					}
				}
				_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := conn.Write(request); err != nil {
					errs <- err
					return
				}
				if _, err := io.ReadFull(conn, buf); err != nil {
					errs <- err
					return
				}
				done.Add(1)
				if c.mode == "short" {
					conn.Close()
					conn = nil
				}
			}
			if conn != nil {
				conn.Close()
			}
		}()
	}
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	return done.Load(), errors.Join(all...)
}

func dial(lab *netlab.Lab, mptcp bool, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	var conn net.Conn
	err := lab.Client.Do(func() error {
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))}
		d.SetMultipathTCP(mptcp)
		var err error
		conn, err = d.Dial("tcp4", dst.String())
		return err
	})
	return conn, err
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(xs))
	return s[len(s)/2]
}
