//go:build linux

// Package sandbox runs an example's cluster in a throwaway netlab lab: the
// scaffolding behind the examples' -sandbox flag, not something to copy.
//
// The sandbox process itself stays in the machine's network namespace and
// never writes a rule or an address there: the lab is built by netlab, the
// master (the example's binary again, without -sandbox) is started inside
// the lab's server namespace, and its workers inherit that namespace.
//
// Importing the package is enough to guard the master and workers: its
// init refuses to run a process that Start marked for the lab anywhere
// else, so a broken lab can never put rules in the machine's namespace.
package sandbox

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

const (
	// envNetns carries the inode of the lab's server namespace to the
	// master and, through it, to the workers.
	envNetns = "IPCLUSTER_SANDBOX_NETNS"

	// StopTimeout is how long Close waits for the master's graceful stop
	// before killing it.
	StopTimeout = 10 * time.Second
)

func init() {
	want := os.Getenv(envNetns)
	if want == "" {
		return
	}
	var st unix.Stat_t
	err := unix.Stat("/proc/self/ns/net", &st)
	if err != nil || strconv.FormatUint(st.Ino, 10) != want {
		fmt.Fprintf(os.Stderr, "%s: started by -sandbox but not inside its lab (network namespace inode %d, want %s, %v); refusing to run\n",
			filepath.Base(os.Args[0]), st.Ino, want, err)
		os.Exit(3)
	}
}

// Cluster is an example's master running in a lab. A deploy (SIGHUP, or
// ipclusterctl deploy) replaces the master: the one Start started exits
// once it has handed the cluster over, and the Cluster follows the new one
// (Master), found on the control socket. Done is closed when a master
// exits and none took over.
type Cluster struct {
	Lab    *netlab.Lab
	RunDir string // the master's -rundir: control socket and lock
	PID    int    // the first master's
	Done   <-chan struct{}

	master atomic.Int64 // the current master's pid
	socket string       // the control socket, to find a successor on

	cmd       *exec.Cmd
	done      chan struct{}
	err       error // set once done is closed
	netns     uint64
	closeOnce sync.Once
	closeErr  error
}

// Start builds a lab with clients client addresses per family, and starts
// this binary in its server namespace as the master: with this process's
// flags minus -sandbox and -rundir, plus -addr (the lab's server address)
// and -rundir (a new temporary directory). The example must define -addr
// and -rundir flags. Call Close when done, also after an error.
func Start(clients int) (c *Cluster, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("-sandbox creates network namespaces and needs root: run it with sudo")
	}
	c = &Cluster{done: make(chan struct{})}
	c.Done = c.done
	defer func() {
		if err != nil {
			err = errors.Join(err, c.Close())
			c = nil
		}
	}()
	if c.Lab, err = netlab.New(netlab.Options{Clients: clients}); err != nil {
		return c, fmt.Errorf("create network namespace lab: %w", err)
	}
	if c.netns, err = c.Lab.Server.Inode(); err != nil {
		return c, fmt.Errorf("identify the lab's server namespace: %w", err)
	}
	if c.RunDir, err = os.MkdirTemp("", "ipcluster-sandbox-"); err != nil {
		return c, fmt.Errorf("create run directory: %w", err)
	}
	if c.RunDir, err = filepath.Abs(c.RunDir); err != nil {
		return c, fmt.Errorf("create run directory: %w", err)
	}
	exe, err := os.Executable()
	if err != nil {
		return c, fmt.Errorf("find own executable to start the master: %w", err)
	}
	cmd := exec.Command(exe, childArgs(c.Lab.ServerAddr4, c.RunDir)...)
	cmd.Env = append(os.Environ(), envNetns+"="+strconv.FormatUint(c.netns, 10))
	// Real files, not pipes: the workers inherit them and must never block
	// on a reader that is gone.
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	// Own process group: a terminal's ^C reaches only this process, which
	// then stops the master once, gracefully.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := c.Lab.Server.Start(cmd); err != nil {
		return c, fmt.Errorf("start the master in namespace %s: %w", c.Lab.Server.Name, err)
	}
	c.cmd, c.PID = cmd, cmd.Process.Pid
	c.master.Store(int64(c.PID))
	c.socket = proto.SocketPath(c.RunDir, clusterName())
	go c.follow()
	return c, nil
}

// clusterName is the example's -name.
func clusterName() string {
	if f := flag.Lookup("name"); f != nil {
		return f.Value.String()
	}
	return ""
}

// Master is the pid of the cluster's current master.
func (c *Cluster) Master() int { return int(c.master.Load()) }

// follow waits for the master to exit, then for the one that took the
// cluster over (a deploy), and so on, until a master exits with no
// successor: then it closes done.
func (c *Cluster) follow() {
	err := c.cmd.Wait()
	for {
		pid := c.successor(int(c.master.Load()))
		if pid == 0 {
			c.err = err
			close(c.done)
			return
		}
		c.master.Store(int64(pid))
		fmt.Printf("(the cluster has a new master, pid %d: a deploy)\n", pid)
		// Not our child (its parent was the old master): poll.
		for syscall.Kill(pid, 0) == nil {
			time.Sleep(200 * time.Millisecond)
		}
		err = fmt.Errorf("master pid %d exited", pid)
	}
}

// successor returns the pid of the master that answers on the control
// socket, if not old, or 0 once none does.
func (c *Cluster) successor(old int) int {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		cl, err := proto.Dial(ctx, c.socket, clusterName())
		if err != nil {
			cancel()
			if _, serr := os.Stat(c.socket); serr != nil {
				return 0 // removed: the cluster stopped
			}
			time.Sleep(100 * time.Millisecond)
			continue
		}
		st, err := cl.Status(ctx)
		cl.Close()
		cancel()
		if err == nil && st.MasterPID != old && st.MasterPID > 0 {
			return st.MasterPID
		}
		time.Sleep(100 * time.Millisecond)
	}
	return 0
}

// Run is an example's -sandbox mode: it starts the cluster in a lab (see
// Start), runs show (a demo, then what to try), waits for ^C or the
// master's exit, and tears everything down. It returns the exit status.
func Run(clients int, show func(ctx context.Context, c *Cluster) error) int {
	if err := run(clients, show); err != nil {
		slog.Error("sandbox", "err", err)
		return 1
	}
	return 0
}

func run(clients int, show func(context.Context, *Cluster) error) (err error) {
	// From here on ^C must tear the lab down, never kill this process.
	ctx, stopSignals := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stopSignals()

	c, err := Start(clients)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, c.Close()) }()
	if err := show(ctx, c); err != nil {
		return err
	}
	select {
	case <-ctx.Done():
		fmt.Println("\nstopping the cluster and removing the namespaces")
		return nil
	case <-c.Done:
		return fmt.Errorf("master exited: %v", c.Err())
	}
}

// Err is how the master exited; valid once Done is closed.
func (c *Cluster) Err() error { return c.err }

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

// Close stops the master (SIGTERM, then SIGKILL after StopTimeout or a
// second ^C), kills whatever is left in the lab's server namespace, and
// removes the run directory and the lab. Safe to call more than once.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		if c.cmd != nil {
			c.stopMaster()
		}
		var errs []error
		if c.RunDir != "" {
			errs = append(errs, os.RemoveAll(c.RunDir))
		}
		if c.Lab != nil {
			// Workers outlive a killed master; anything still in the
			// lab is ours and would keep it alive.
			if n := c.Lab.KillProcesses(); n > 0 {
				slog.Warn("killed processes left in the lab", "count", n)
			}
			if err := c.Lab.Close(); err != nil {
				errs = append(errs, fmt.Errorf("remove lab namespaces: %w", err))
			}
		}
		c.closeErr = errors.Join(errs...)
	})
	return c.closeErr
}

func (c *Cluster) stopMaster() {
	select {
	case <-c.done:
		return
	default:
	}
	again := make(chan os.Signal, 1)
	signal.Notify(again, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(again)
	pid := c.Master()
	_ = syscall.Kill(pid, syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(StopTimeout):
		slog.Warn("master did not stop in time; killing it", "pid", pid, "timeout", StopTimeout)
		_ = syscall.Kill(pid, syscall.SIGKILL)
		<-c.done
	case <-again:
		slog.Warn("second signal: killing the master", "pid", pid)
		_ = syscall.Kill(pid, syscall.SIGKILL)
		<-c.done
	}
}
