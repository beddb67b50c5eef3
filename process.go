//go:build linux

package ipcluster

// The process seam: what the master does to a worker's OS process, behind
// one small interface (as tableflip's env.newProc and go-plugin's
// runner.Runner do), so that the loop never asks which kind it holds.
//
// Two kinds in the library:
//
//   - childProcess, a worker this master spawned (spawn, on the spawner
//     thread): an exec.Cmd, signalled through its os.Process and reaped by
//     its Wait, which also gives the exit status;
//   - pidfdProcess, a worker of an earlier master adopted on its hello
//     (onHello): not our child, so it is watched and signalled through a
//     pidfd, never through the bare pid, which may have been reused by an
//     unrelated process once the worker exited. The kernel tells a pidfd's
//     holder that the process ended, not how: its status is "exited".
//
// Tests that build masters by hand give their procs a fakeProcess
// (process_test.go), which records signals: a test's made-up pid is never
// signalled for real.
//
// Ownership: a process is created by the loop and belongs to its proc. The
// loop calls signal and close; wait is called once, by the goroutine that
// watch starts, and returns when the process has ended (or, for an adopted
// one, when close releases its pidfd).

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// process is a worker's OS process.
type process interface {
	// pid is the process's id, as the kernel reported it when the
	// master got hold of the process.
	pid() int
	// signal sends sig. A process that has already ended is not an
	// error.
	signal(sig syscall.Signal) error
	// wait blocks until the process has ended and returns how, for the
	// log and EventWorkerExited. Called once.
	wait() string
	// close releases what the master holds on the process (a pidfd); the
	// process itself carries on. Safe to call more than once.
	close()
	// spawned says whether this master started the process from its
	// spawner thread, so that it must hold no capability.
	spawned() bool
}

// newProc is a worker in state starting, with its process.
func newProc(pr process, slot, gen int, build string) *proc {
	p := &proc{process: pr, pid: pr.pid(), slot: slot, gen: gen, build: build, state: stateStarting, spawned: time.Now(), splitFrom: -1}
	p.started = p.spawned
	return p
}

// watch reports p's exit to the loop, from a goroutine that ends with the
// process (an adopted one's also when its pidfd is closed).
func (m *master) watch(p *proc) {
	go func() { m.send(evExit{p: p, status: p.process.wait()}) }()
}

// childProcess is a worker this master spawned; cmd has been started.
type childProcess struct{ cmd *exec.Cmd }

func (c *childProcess) pid() int      { return c.cmd.Process.Pid }
func (c *childProcess) spawned() bool { return true }
func (c *childProcess) close()        {} // Wait releases the process

func (c *childProcess) signal(sig syscall.Signal) error {
	if err := c.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) && !errors.Is(err, unix.ESRCH) {
		return err
	}
	return nil
}

func (c *childProcess) wait() string { return waitStatus(c.cmd) }

// waitStatus waits for a started cmd and returns its exit status, or why
// it could not be waited for.
func waitStatus(cmd *exec.Cmd) string {
	err := cmd.Wait()
	if cmd.ProcessState == nil {
		return err.Error()
	}
	return cmd.ProcessState.String()
}

// pidfdProcess is a process that is not our child, held by a pidfd:
// readable once the process exits.
type pidfdProcess struct {
	id    int
	pidfd *os.File
}

// openPidfd gets hold of process pid, which is not our child.
func openPidfd(pid int) (*pidfdProcess, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil, err
	}
	return &pidfdProcess{id: pid, pidfd: os.NewFile(uintptr(fd), "pidfd:"+strconv.Itoa(pid))}, nil
}

func (a *pidfdProcess) pid() int      { return a.id }
func (a *pidfdProcess) spawned() bool { return false }
func (a *pidfdProcess) close()        { a.pidfd.Close() } // a second Close returns an error, and does nothing

func (a *pidfdProcess) signal(sig syscall.Signal) error {
	// Through the pidfd, never the bare pid: the pid may have been
	// reused by an unrelated process since the worker exited.
	if err := unix.PidfdSendSignal(int(a.pidfd.Fd()), sig, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return err
	}
	return nil
}

// wait polls the pidfd through the runtime's poller, so no thread blocks
// on it; closing the pidfd ends the wait.
func (a *pidfdProcess) wait() string {
	rc, err := a.pidfd.SyscallConn()
	if err == nil {
		err = rc.Read(func(fd uintptr) bool {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, _ := unix.Poll(fds, 0)
			return n > 0
		})
	}
	if err != nil {
		return "unknown: " + err.Error()
	}
	return "exited"
}
