//go:build linux

package ipcluster

// The spawner thread: workers start with no capability, whatever the
// master's own (root, a file capability on the binary, systemd's
// AmbientCapabilities).
//
// Capabilities, securebits and no_new_privs belong to a thread, and a
// child starts with those of the thread that forked it (Go forks from the
// thread of the goroutine calling exec.Cmd.Start). So the master starts
// every worker from one goroutine locked to its OS thread for good, whose
// privileges were lowered once:
//
//   - no_new_privs (prctl PR_SET_NO_NEW_PRIVS), inherited by every worker
//     and kept across exec: an exec then grants no more than the thread's
//     permitted set, whatever it would otherwise grant (file capabilities,
//     setuid binaries, uid 0's full set);
//   - the ambient and inheritable sets emptied, and the effective and
//     permitted sets too, but for CAP_SETUID and CAP_SETGID when the
//     workers change uid (Config.WorkerUser): the child needs them between
//     fork and exec, and the change from root to another uid clears them.
//
// The exec of the worker binary then leaves all four sets empty. The
// bounding set is left alone: an exec of a binary whose file capabilities
// it does not cover fails (EPERM), and no_new_privs already bounds what
// the exec grants. Securebits (SECBIT_NOROOT) would add nothing to that.
//
// The thread is never unlocked: when the goroutine returns (the master's
// Run returning) the Go runtime ends the thread rather than let another
// goroutine run with its privileges. New threads are not started from a
// locked thread (the runtime hands that to its template thread), so the
// rest of the master keeps what it had, and a successor master started
// for a deploy (startSuccessor, from the loop's thread) gets CAP_NET_ADMIN
// as the first one did.
//
// The hazard the weaker thread brings: a process of the same uid holding
// no capability (a worker without WorkerUser) passes the kernel's ptrace
// check against that thread, whose capabilities are no longer a superset
// of its own, and could then read or write the master's memory
// (/proc/<pid>/task/<tid>/mem, ptrace). So the master marks itself not
// dumpable (PR_SET_DUMPABLE 0), which leaves those to CAP_SYS_PTRACE.

import (
	"errors"
	"fmt"
	"os/exec"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// spawner starts processes on its privilege-lowered thread. Any goroutine
// may call start; close ends the thread.
type spawner struct {
	reqs      chan spawnReq
	closeOnce sync.Once
}

type spawnReq struct {
	cmd *exec.Cmd
	err chan<- error
}

// newSpawner marks the process not dumpable and starts the spawner thread.
// With setID the thread keeps CAP_SETUID and CAP_SETGID (if the process
// holds them), for workers started with a SysProcAttr.Credential.
func newSpawner(setID bool) (*spawner, error) {
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return nil, fmt.Errorf("mark the master not dumpable (prctl PR_SET_DUMPABLE): %w", err)
	}
	var keep uint64
	if setID {
		keep = 1<<unix.CAP_SETUID | 1<<unix.CAP_SETGID
	}
	s := &spawner{reqs: make(chan spawnReq)}
	ready := make(chan error)
	go s.run(keep, ready)
	if err := <-ready; err != nil {
		return nil, err
	}
	return s, nil
}

func (s *spawner) run(keep uint64, ready chan<- error) {
	// Never unlocked (see the file's header), but for the main thread.
	runtime.LockOSThread()
	if unix.Gettid() == unix.Getpid() {
		// The main thread: its privileges are those /proc/<pid>/status
		// shows (and a later master's check reads), and the runtime
		// never ends it. Hold it, untouched, while another goroutine,
		// which cannot run here meanwhile, takes a thread of its own.
		locked := make(chan error)
		go s.run(keep, locked)
		err := <-locked
		runtime.UnlockOSThread()
		ready <- err
		return
	}
	if err := lowerThreadPrivileges(keep); err != nil {
		ready <- err
		return
	}
	ready <- nil
	for r := range s.reqs {
		r.err <- r.cmd.Start()
	}
}

// start runs cmd.Start on the spawner thread.
func (s *spawner) start(cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	s.reqs <- spawnReq{cmd: cmd, err: errc}
	return <-errc
}

// close ends the spawner thread. Safe to call more than once; start must
// not be called after it.
func (s *spawner) close() {
	if s != nil {
		s.closeOnce.Do(func() { close(s.reqs) })
	}
}

// lowerThreadPrivileges sets no_new_privs on the calling thread, empties
// its ambient and inheritable sets, and keeps in its effective and
// permitted sets only what of keep they hold.
func lowerThreadPrivileges(keep uint64) error {
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("set no_new_privs on the thread that starts workers: %w", err)
	}
	// EINVAL: a kernel before 4.3, which has no ambient set.
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("clear the ambient capabilities of the thread that starts workers: %w", err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("read the capabilities of the thread that starts workers: %w", err)
	}
	for i := range data {
		k := uint32(keep >> (32 * i))
		data[i].Permitted &= k
		data[i].Effective = data[i].Permitted
		data[i].Inheritable = 0
	}
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("lower the capabilities of the thread that starts workers: %w", err)
	}
	return nil
}
