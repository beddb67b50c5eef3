//go:build linux

package main

// The -sandbox mode: run the example in a throwaway pair of network
// namespaces and show it working. Everything here is demo scaffolding; the
// part to copy is main.go.
//
// The sandbox process itself stays in the machine's namespace and never
// writes a rule or an address there: the lab is built by netlab, the master
// (this binary again, without -sandbox) is started inside the lab's server
// namespace, and its workers inherit that namespace.

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math/bits"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/netlab"
)

var sandbox = flag.Bool("sandbox", false, "run the example in a throwaway network namespace and demo it (needs root)")

const (
	// envNetns carries the inode of the lab's server namespace to the
	// master and, through it, to the workers: they refuse to run anywhere
	// else, so a broken lab can never put rules in the machine's namespace.
	envNetns = "IPCLUSTER_ECHO_SANDBOX_NETNS"

	readyTimeout = 10 * time.Second
	stopTimeout  = 10 * time.Second
	demoClients  = 8
	demoRounds   = 3
)

func init() {
	want := os.Getenv(envNetns)
	if want == "" {
		return
	}
	var st unix.Stat_t
	err := unix.Stat("/proc/self/ns/net", &st)
	if err != nil || strconv.FormatUint(st.Ino, 10) != want {
		fmt.Fprintf(os.Stderr, "echo: started by -sandbox but not inside its lab (network namespace inode %d, want %s, %v); refusing to run\n",
			st.Ino, want, err)
		os.Exit(3)
	}
}

func runSandbox(workers int, port uint) int {
	if err := sandboxMain(workers, port); err != nil {
		slog.Error("sandbox", "err", err)
		return 1
	}
	return 0
}

func sandboxMain(workers int, port uint) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("-sandbox creates network namespaces and needs root: run it with sudo")
	}
	// From here on ^C must tear the lab down, never kill this process.
	ctx, stopSignals := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stopSignals()

	lab, err := netlab.New(netlab.Options{Clients: 16})
	if err != nil {
		return fmt.Errorf("create network namespace lab: %w", err)
	}
	defer func() {
		if cerr := lab.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("remove lab namespaces: %w", cerr))
		}
	}()
	netnsInode, err := lab.Server.Inode()
	if err != nil {
		return fmt.Errorf("identify the lab's server namespace: %w", err)
	}
	runDir, err := os.MkdirTemp("", "ipcluster-echo-")
	if err != nil {
		return fmt.Errorf("create run directory: %w", err)
	}
	defer os.RemoveAll(runDir)
	if runDir, err = filepath.Abs(runDir); err != nil {
		return fmt.Errorf("create run directory: %w", err)
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable to start the master: %w", err)
	}

	cmd := exec.Command(exe, childArgs(lab.ServerAddr4, runDir)...)
	cmd.Env = append(os.Environ(), envNetns+"="+strconv.FormatUint(netnsInode, 10))
	// Real files, not pipes: the workers inherit them and must never block
	// on a reader that is gone.
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	// Own process group: a terminal's ^C reaches only this process, which
	// then stops the master once, gracefully.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := lab.Server.Start(cmd); err != nil {
		return fmt.Errorf("start the master in namespace %s: %w", lab.Server.Name, err)
	}
	master := &child{cmd: cmd, done: make(chan struct{}), netns: netnsInode}
	go func() {
		master.err = cmd.Wait()
		close(master.done)
	}()
	defer master.stop()

	dst := netip.AddrPortFrom(lab.ServerAddr4, uint16(port))
	if err := waitAnswer(ctx, lab, dst, master); err != nil {
		return err
	}
	pids, err := demo(ctx, lab, dst, workers)
	if err != nil {
		return err
	}
	printCommands(lab, dst, master.cmd.Process.Pid, pids)

	select {
	case <-ctx.Done():
		fmt.Println("\nstopping the cluster and removing the namespaces")
		return nil
	case <-master.done:
		return fmt.Errorf("master exited: %v", master.err)
	}
}

// childArgs are this process's flags minus -sandbox, pointed at the lab.
func childArgs(addr netip.Addr, runDir string) []string {
	var args []string
	flag.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "sandbox", "rundir":
		case "addr":
			slog.Warn("-addr is ignored with -sandbox: the cluster serves the lab's address", "addr", addr)
		default:
			args = append(args, "-"+f.Name+"="+f.Value.String())
		}
	})
	return append(args, "-addr", addr.String(), "-rundir", runDir)
}

// child is the master process running in the lab.
type child struct {
	cmd   *exec.Cmd
	done  chan struct{} // closed once it exited; err is then set
	err   error
	netns uint64
}

// stop ends the master: SIGTERM, then SIGKILL after stopTimeout or a second
// ^C. Safe to call more than once.
func (c *child) stop() {
	select {
	case <-c.done:
	default:
		again := make(chan os.Signal, 1)
		signal.Notify(again, syscall.SIGINT, syscall.SIGTERM)
		defer signal.Stop(again)
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.done:
		case <-time.After(stopTimeout):
			slog.Warn("master did not stop in time; killing it", "pid", c.cmd.Process.Pid, "timeout", stopTimeout)
			_ = c.cmd.Process.Kill()
			<-c.done
		case <-again:
			slog.Warn("second signal: killing the master", "pid", c.cmd.Process.Pid)
			_ = c.cmd.Process.Kill()
			<-c.done
		}
	}
	// Workers outlive a killed master; anything still in the lab's server
	// namespace is ours and would keep it alive.
	for _, pid := range pidsInNetns(c.netns) {
		slog.Warn("killing process left in the lab", "pid", pid)
		_ = unix.Kill(pid, unix.SIGKILL)
	}
}

// pidsInNetns lists the processes whose network namespace has inode ino.
func pidsInNetns(ino uint64) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		var st unix.Stat_t
		if unix.Stat("/proc/"+e.Name()+"/ns/net", &st) == nil && st.Ino == ino {
			pids = append(pids, pid)
		}
	}
	return pids
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
func waitAnswer(ctx context.Context, lab *netlab.Lab, dst netip.AddrPort, master *child) error {
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
		case <-master.done:
			return fmt.Errorf("master exited before the cluster answered: %v", master.err)
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

func printCommands(lab *netlab.Lab, dst netip.AddrPort, masterPID int, pids map[int]int) {
	srv, cli := lab.Server.Name, lab.Client.Name
	src := lab.ClientAddrs4[min(5, len(lab.ClientAddrs4)-1)]
	port := strconv.Itoa(int(dst.Port()))
	fmt.Printf("\nPoke at it, as root in another terminal (nc is in Debian's netcat-openbsd package):\n\n")
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 3, ' ', 0)
	fmt.Fprintf(tw, "  ip netns exec %s nc -s %s %s %s\t# a client; type lines to ask which worker holds it\n", cli, src, dst.Addr(), port)
	if flag.Lookup("backend").Value.String() == "iptables" {
		fmt.Fprintf(tw, "  ip netns exec %s iptables-save -t nat\t# the cluster's rules\n", srv)
	} else {
		fmt.Fprintf(tw, "  ip netns exec %s nft list table inet ipcluster-%s\t# the cluster's routes (nft is in Debian's nftables package)\n",
			srv, flag.Lookup("name").Value.String())
	}
	fmt.Fprintf(tw, "  ip netns exec %s conntrack -L -p tcp --dport %s\t# connections conntrack pins to a worker\n", srv, port)
	if pid, ok := pids[1]; ok {
		fmt.Fprintf(tw, "  kill -USR1 %d\t# retire slot 1's worker: new clients go to a fresh one, open connections stay\n", pid)
	}
	fmt.Fprintf(tw, "  kill -USR1 %d\t# the master: kill retired workers\n", masterPID)
	_ = tw.Flush()
	fmt.Printf("\nPress Ctrl-C to stop the cluster and remove the namespaces.\n")
}
