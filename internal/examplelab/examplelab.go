//go:build linux

// Package examplelab runs an example's cluster in a netlab lab for the
// examples' tests: it builds the example's binary, starts it as the master
// in the lab's server namespace, follows the masters a deploy replaces it
// with, and stops whatever is left when the test ends.
package examplelab

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// Build builds the example in the current directory (a test's package
// directory) to path. ldflags, if set, make it another build: another Go
// build ID, so a deploy rolls every slot to it.
func Build(t testing.TB, path, ldflags string) {
	t.Helper()
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("no go tool on PATH to build the example: %v", err)
	}
	cmd := exec.Command(gobin, "build", "-o", path, "-ldflags", ldflags, ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
}

// Cluster is an example's cluster in a lab.
type Cluster struct {
	Exe     string // the binary masters start from: Deploy replaces it
	Name    string
	Socket  string // the control socket
	LogFile string // the masters' and workers' output

	t    testing.TB
	ns   *netlab.NS
	args []string     // the master's command line
	pids map[int]bool // every master seen, for the cleanup
}

// Start builds the example in dir and runs it in lab.Server as the master
// of cluster name (see StartIn).
func Start(t testing.TB, lab *netlab.Lab, dir, name string, args ...string) *Cluster {
	t.Helper()
	exe := filepath.Join(dir, name)
	Build(t, exe, "")
	return StartIn(t, lab.Server, exe, dir, name, args...)
}

// StartIn runs exe (a built example, which Deploy may replace) in ns as the
// master of cluster name, with args and -name, and -rundir under dir;
// output goes to a file in dir the test logs if it fails. The cleanup
// stops the current master (SIGTERM), waits for the control socket to
// go, and kills what is left in ns.
func StartIn(t testing.TB, ns *netlab.NS, exe, dir, name string, args ...string) *Cluster {
	t.Helper()
	runDir := filepath.Join(dir, "run")
	c := &Cluster{Exe: exe, Name: name, Socket: proto.SocketPath(runDir, name), LogFile: filepath.Join(dir, "cluster.log"), t: t,
		ns: ns, args: append([]string{"-name", name, "-rundir", runDir}, args...), pids: map[int]bool{}}
	c.StartMaster()
	t.Cleanup(func() {
		if st, err := c.Status(); err == nil {
			c.pids[st.MasterPID] = true
		}
		for pid := range c.pids {
			syscall.Kill(pid, syscall.SIGTERM)
		}
		for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if _, err := os.Stat(c.Socket); err != nil {
				break
			}
		}
		ns.KillProcesses()
		if t.Failed() {
			b, _ := os.ReadFile(c.LogFile)
			t.Logf("%s: cluster log:\n%s", dir, b)
		}
	})
	return c
}

// StartMaster starts another master of the cluster, as after a crash of
// the last one (it adopts the workers), or beside a running one (it takes
// the cluster over); it returns its pid.
func (c *Cluster) StartMaster() int {
	c.t.Helper()
	logf, err := os.OpenFile(c.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		c.t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(c.Exe, c.args...)
	cmd.Stdout, cmd.Stderr = logf, logf // a file: workers outlive a master
	if err := c.ns.Start(cmd); err != nil {
		c.t.Fatal(err)
	}
	go cmd.Wait()
	c.pids[cmd.Process.Pid] = true
	return cmd.Process.Pid
}

// control runs fn on a control connection to the current master, with
// 5s for the whole exchange.
func (c *Cluster) control(fn func(context.Context, *proto.Client) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cl, err := proto.Dial(ctx, c.Socket, c.Name)
	if err != nil {
		return err
	}
	defer cl.Close()
	return fn(ctx, cl)
}

// Status asks the current master for the cluster's status.
func (c *Cluster) Status() (st *proto.Status, err error) {
	err = c.control(func(ctx context.Context, cl *proto.Client) error {
		st, err = cl.Status(ctx)
		return err
	})
	if err == nil {
		c.pids[st.MasterPID] = true
	}
	return st, err
}

// Wait polls the status until ok says yes, for at most a minute, and
// returns it; it fails the test naming what after that.
func (c *Cluster) Wait(what string, ok func(*proto.Status) bool) *proto.Status {
	c.t.Helper()
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if st, err := c.Status(); err == nil && ok(st) {
			return st
		}
	}
	c.t.Fatalf("timed out waiting for %s", what)
	return nil
}

// BuildNext builds the next build (ldflags make it another: a second -X
// is another Go build ID) beside the binary, for Deploy: built ahead, so
// the deploy itself is not held up by the compiler.
func (c *Cluster) BuildNext(ldflags string) {
	c.t.Helper()
	Build(c.t, c.Exe+".next", ldflags)
}

// Deploy moves the build BuildNext made over the binary and sends SIGHUP
// to the current master: a deploy. It returns the status from before and
// when the signal went.
func (c *Cluster) Deploy() (*proto.Status, time.Time) {
	c.t.Helper()
	st, err := c.Status()
	if err != nil {
		c.t.Fatalf("status before the deploy: %v", err)
	}
	if err := os.Rename(c.Exe+".next", c.Exe); err != nil {
		c.t.Fatalf("move the next build into place (call BuildNext first): %v", err)
	}
	if err := syscall.Kill(st.MasterPID, syscall.SIGHUP); err != nil {
		c.t.Fatalf("SIGHUP the master (pid %d): %v", st.MasterPID, err)
	}
	return st, time.Now()
}

// Request sends one control request and returns the answer's body.
func (c *Cluster) Request(typ string, body any) (answer any, err error) {
	err = c.control(func(ctx context.Context, cl *proto.Client) error {
		m, err := cl.Do(ctx, typ, body)
		answer = m.Body
		return err
	})
	return answer, err
}

// Retire asks the master to retire slot's active worker, as ipclusterctl
// retire does, and returns its pid.
func (c *Cluster) Retire(slot int) int {
	c.t.Helper()
	answer, err := c.Request(proto.TypeRetireOne, &proto.RetireOne{Slot: slot})
	if err != nil {
		c.t.Fatalf("retire slot %d: %v", slot, err)
	}
	got, ok := answer.(*proto.RetireOne)
	if !ok {
		c.t.Fatalf("retire slot %d: answer %T", slot, answer)
	}
	return got.PID
}
