//go:build linux

package main

// The -sandbox mode: run the example in a throwaway pair of network
// namespaces and show it working. Everything here is demo scaffolding; the
// part to copy is main.go. internal/sandbox builds the lab and starts the
// master (this binary again, without -sandbox) inside it.

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"math/bits"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
	sbx "github.com/ipcluster/ipcluster/internal/sandbox"
)

var sandbox = flag.Bool("sandbox", false, "run the example in a throwaway network namespace and demo it (needs root)")

const (
	readyTimeout = 10 * time.Second
	demoClients  = 8
	demoRounds   = 3
)

func runSandbox(workers int, port uint) int {
	return sbx.Run(16, func(ctx context.Context, cl *sbx.Cluster) error { return show(ctx, cl, workers, port) })
}

// show demonstrates the running cluster, then says what to try.
func show(ctx context.Context, cl *sbx.Cluster, workers int, port uint) error {
	lab := cl.Lab

	dst := netip.AddrPortFrom(lab.ServerAddr4, uint16(port))
	if err := waitAnswer(ctx, lab, dst, cl); err != nil {
		return err
	}
	pids, err := demo(ctx, lab, dst, workers)
	if err != nil {
		return err
	}
	printCommands(lab, dst, cl.PID, cl.RunDir, pids, backendOf(ctx, cl.RunDir))
	return nil
}

// backendOf asks the master which rule backend it took (auto's choice,
// unless -backend named one).
func backendOf(ctx context.Context, runDir string) string {
	name := flag.Lookup("name").Value.String()
	c, err := proto.Dial(ctx, proto.SocketPath(runDir, name), name)
	if err != nil {
		return flag.Lookup("backend").Value.String()
	}
	defer c.Close()
	st, err := c.Status(ctx)
	if err != nil {
		return flag.Lookup("backend").Value.String()
	}
	return st.Backend
}

// answer is a worker's line.
type answer struct {
	slot, pid, gen int
	client         string
}

// ask connects from src in the client namespace and reads the worker's line.
func ask(ctx context.Context, ns *netlab.NS, src netip.Addr, dst netip.AddrPort) (answer, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	conn, err := ns.Dial(ctx, "tcp4", src, dst)
	if err != nil {
		return answer{}, fmt.Errorf("connect from %s to %s: %w", src, dst, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return answer{}, fmt.Errorf("read the worker's line from %s: %w", dst, err)
	}
	var a answer
	if _, err := fmt.Sscanf(line, "slot=%d pid=%d generation=%d client=%s", &a.slot, &a.pid, &a.gen, &a.client); err != nil {
		return answer{}, fmt.Errorf("parse the worker's line %q: %w", line, err)
	}
	return a, nil
}

// waitAnswer polls until a worker answers. The master installs its rules
// once every slot is ready, so the first answer means the cluster is up.
func waitAnswer(ctx context.Context, lab *netlab.Lab, dst netip.AddrPort, master *sbx.Cluster) error {
	deadline := time.Now().Add(readyTimeout)
	for {
		_, err := ask(ctx, lab.Client, lab.ClientAddrs4[0], dst)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("wait for the cluster to answer on %s (%s): %w", dst, readyTimeout, err)
		}
		select {
		case <-ctx.Done():
			return errors.New("interrupted while waiting for the cluster to answer")
		case <-master.Done:
			return fmt.Errorf("master exited before the cluster answered: %v", master.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// demo connects from each of the first client addresses a few times and
// prints which worker answered. It returns the pid serving each slot seen.
func demo(ctx context.Context, lab *netlab.Lab, dst netip.AddrPort, workers int) (map[int]int, error) {
	k := bits.Len(uint(workers)) - 1
	fmt.Printf("\n%d workers serve %s in namespace %s; clients connect from namespace %s.\n"+
		"Each client address connects %d times:\n\n", workers, dst, lab.Server.Name, lab.Client.Name, demoRounds)
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CLIENT\tLOW BITS\tSLOT\tPID\tWORKER SAW")
	pids := map[int]int{}
	sticky, seenReal := true, true
	for _, src := range lab.ClientAddrs4[:min(demoClients, len(lab.ClientAddrs4))] {
		var slots, procs []string
		var saw string
		first := -1
		for range demoRounds {
			a, err := ask(ctx, lab.Client, src, dst)
			if err != nil {
				return nil, err
			}
			slots = append(slots, strconv.Itoa(a.slot))
			procs = append(procs, strconv.Itoa(a.pid))
			if first == -1 {
				first = a.pid
			}
			sticky = sticky && a.pid == first
			seen, err := netip.ParseAddrPort(a.client)
			if err != nil {
				return nil, fmt.Errorf("parse the client address the worker saw: %w", err)
			}
			seenReal = seenReal && seen.Addr().Unmap() == src
			saw = seen.Addr().Unmap().String()
			pids[a.slot] = a.pid
		}
		low := "-"
		if k > 0 {
			low = fmt.Sprintf("%0*b", k, int(src.As4()[3])&(workers-1))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", src, low, strings.Join(slots, " "), strings.Join(procs, " "), saw)
	}
	if err := tw.Flush(); err != nil {
		return nil, fmt.Errorf("print demo table: %w", err)
	}
	fmt.Println()
	if sticky {
		fmt.Printf("Every address reached the same worker each time: its low %d bits pick the slot.\n", k)
	} else {
		fmt.Println("Some address reached different workers (a worker was replaced meanwhile?).")
	}
	if seenReal {
		fmt.Println("Each worker saw the real client address: no proxy in between.")
	}
	return pids, nil
}

func printCommands(lab *netlab.Lab, dst netip.AddrPort, masterPID int, runDir string, pids map[int]int, backend string) {
	srv, cli := lab.Server.Name, lab.Client.Name
	src := lab.ClientAddrs4[min(5, len(lab.ClientAddrs4)-1)]
	port := strconv.Itoa(int(dst.Port()))
	fmt.Printf("\nPoke at it, as root in another terminal (nc is in Debian's netcat-openbsd package):\n\n")
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 3, ' ', 0)
	fmt.Fprintf(tw, "  ip netns exec %s nc -s %s %s %s\t# a client; type lines to ask which worker holds it\n", cli, src, dst.Addr(), port)
	switch backend {
	case "iptables":
		fmt.Fprintf(tw, "  ip netns exec %s iptables-save -t nat\t# the cluster's rules\n", srv)
	case "bpf":
		fmt.Fprintf(tw, "  ip netns exec %s ss -ltn 'sport = :%s'\t# the workers' sockets on the public port, one reuseport group\n", srv, port)
	default:
		fmt.Fprintf(tw, "  ip netns exec %s nft list table inet ipcluster-%s\t# the cluster's routes (nft is in Debian's nftables package)\n",
			srv, flag.Lookup("name").Value.String())
	}
	if backend != "bpf" {
		fmt.Fprintf(tw, "  ip netns exec %s conntrack -L -p tcp --dport %s\t# connections conntrack pins to a worker\n", srv, port)
	}
	if pid, ok := pids[1]; ok {
		fmt.Fprintf(tw, "  kill -USR1 %d\t# retire slot 1's worker: new clients go to a fresh one, open connections stay\n", pid)
	}
	fmt.Fprintf(tw, "  kill -USR1 %d\t# the master: kill retired workers\n", masterPID)
	fmt.Fprintf(tw, "  go run ./cmd/ipclusterctl -rundir %s status\t# slots, workers and rules (also: retire 1, resize 8, restart, deploy)\n", runDir)
	fmt.Fprintf(tw, "  go run ./cmd/ipclusterctl -rundir %s pprof 1 heap\t# slot 1's heap profile, to a file (also: metrics 1, pprof pid:<pid> goroutine)\n", runDir)
	_ = tw.Flush()
	fmt.Printf("\nPress Ctrl-C to stop the cluster and remove the namespaces.\n")
}
