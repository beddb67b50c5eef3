//go:build linux

package ipcluster

// The cluster's run directory, RunDir/<Name>: the control socket, the lock
// that makes one master the cluster's owner, the generation counter that
// tells adopted workers from ours, the resized slot count and a
// successor's deploy report. openRunDir sets it up before the loop starts;
// closeRunDir removes it on a graceful stop, releaseRunDir when a later
// check fails.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// openRunDir creates the run directory, takes the cluster lock and listens
// on the control socket.
func (m *master) openRunDir() (err error) {
	if err := os.MkdirAll(m.cfg.RunDir, 0o755); err != nil {
		return fmt.Errorf("create run directory %s: %w; %s", m.cfg.RunDir, err, runDirFix)
	}
	if err := os.Mkdir(m.dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("create cluster directory %s: %w; %s", m.dir, err, runDirFix)
	}
	if m.worker != nil {
		if err := m.worker.checkReachable(m.cfg.RunDir); err != nil {
			return err
		}
	}
	if err := checkPrivateDir(m.dir, m.uid, m.worker); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			m.closeRunDir()
		}
	}()
	if m.lock, err = lockFile(m.lockPath()); err != nil {
		if !errors.Is(err, ErrAlreadyRunning) {
			return fmt.Errorf("%w; %s", err, runDirFix)
		}
		// Another master owns the cluster: this is a deploy.
		if err := m.takeOver(fmt.Errorf("cluster %q: %w", m.cfg.Name, err)); err != nil {
			return err
		}
		m.gen = nextGeneration(m.generationPath())
		// The socket is as the previous master left it, and this
		// master's WorkerUser may differ. The cluster is ours now:
		// failing here would leave it without a master.
		if err := shareSocket(m.sock, m.worker); err != nil {
			m.log.Error("control socket keeps the previous master's permissions; workers may fail to connect", "err", err)
		}
		return nil
	}
	m.gen = nextGeneration(m.generationPath())
	// We hold the lock, so a socket file left here belongs to a master that
	// died: replace it.
	_ = os.Remove(m.sock)
	m.ln, err = net.ListenUnix("unix", &net.UnixAddr{Name: m.sock, Net: "unix"})
	if err != nil {
		return fmt.Errorf("listen on control socket %s: %w", m.sock, err)
	}
	m.ln.SetUnlinkOnClose(false) // we remove it ourselves, after the workers are gone
	return shareSocket(m.sock, m.worker)
}

// runDirFix ends the errors of a run directory the master cannot write.
const runDirFix = "Config.RunDir must be a directory the master can write (default " + DefaultRunDir +
	"): point it elsewhere, or fix the path's type, permissions or read-only mount"

// closeRunDir removes the socket, the lock and the directory, if ours.
func (m *master) closeRunDir() {
	if m.ln != nil {
		m.ln.Close()
		os.Remove(m.sock)
	}
	if m.lock != nil {
		os.Remove(m.generationPath())
		os.Remove(m.workersPath())
		// Unlink before unlocking: a master waiting on this inode then
		// finds it gone and retries (see lockFile).
		os.Remove(m.lock.Name())
		m.lock.Close()
		os.Remove(m.dir) // only if empty: never delete what we did not create
	}
}

// releaseRunDir undoes openRunDir when a later check fails. A cluster we
// created is removed as if never started. One taken over from a running
// master is left as a crashed master leaves it, generation and all: that
// master has let go, its workers serve on, and the next master adopts them.
func (m *master) releaseRunDir() {
	if !m.tookOver {
		m.closeRunDir()
		return
	}
	m.ln.Close()
	m.lock.Close()
}

// lockFile takes an exclusive lock on path and writes our pid in it. The
// lock belongs to an inode; a master that stops unlinks the file while
// holding it, so after locking we check the path still names our inode and
// otherwise start again on the new file.
func lockFile(path string) (*os.File, error) {
	for {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("open lock %s: %w", path, err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			owner, _ := os.ReadFile(path)
			f.Close()
			return nil, fmt.Errorf("%w: locked by master pid %s (%s); stop it first",
				ErrAlreadyRunning, strings.TrimSpace(string(owner)), path)
		}
		var held, named unix.Stat_t
		if unix.Fstat(int(f.Fd()), &held) == nil && unix.Stat(path, &named) == nil && held.Ino == named.Ino {
			if err := f.Truncate(0); err == nil {
				_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
			}
			return f, nil
		}
		f.Close() // unlinked under us by a stopping master
	}
}

// nextGeneration numbers this master one above the last one of the cluster
// (which, if it crashed, left its number behind), so workers adopted from
// it are told apart from ours.
func nextGeneration(path string) int {
	gen := 1
	if b, err := os.ReadFile(path); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && n > 0 {
			gen = n + 1
		}
	}
	writeGeneration(path, gen)
	return gen
}

func writeGeneration(path string, gen int) {
	_ = os.WriteFile(path, []byte(strconv.Itoa(gen)+"\n"), 0o600)
}

// errNotDir is checkPrivateDir's complaint about a symlink or a file.
var errNotDir = errors.New("not a directory (a symlink or file?): remove it")

// checkPrivateDir makes sure dir is a real directory owned by uid and
// closed to others: the control socket inside it admits workers. With
// wc nil it is 0700. With worker credentials it is 0710, its group the
// workers' gid: they may pass through it to the socket, not list it nor
// create anything in it. The owner check stays as it is: a directory
// someone else owns could be theirs to swap under us. Mode and group are
// set through an open descriptor, so a symlink planted in between changes
// nothing.
func checkPrivateDir(dir string, uid int, wc *workerCred) error {
	f, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
		return fmt.Errorf("cluster directory %s is %w", dir, errNotDir)
	}
	if err != nil {
		return fmt.Errorf("inspect cluster directory %s: %w", dir, err)
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fmt.Errorf("inspect cluster directory %s: %w", dir, err)
	}
	if int(st.Uid) != uid {
		return fmt.Errorf("cluster directory %s is owned by uid %d, not the master's uid %d: remove it or fix its owner", dir, st.Uid, uid)
	}
	mode := uint32(0o700)
	if wc != nil {
		mode = 0o710
		if int(st.Gid) != wc.gid {
			if err := f.Chown(-1, wc.gid); err != nil {
				return fmt.Errorf("give cluster directory %s to the workers' group %d: %w", dir, wc.gid, err)
			}
		}
	}
	if st.Mode&0o7777 != mode {
		if err := f.Chmod(os.FileMode(mode)); err != nil {
			return fmt.Errorf("set cluster directory %s to mode %o: %w", dir, mode, err)
		}
	}
	return nil
}

// shareSocket sets the control socket's mode: 0600, or with worker
// credentials 0660 and the workers' group, so that they can connect.
// Connecting needs write permission on the socket file; who is then
// admitted is the kernel's SO_PEERCRED, checked in serve.
func shareSocket(sock string, wc *workerCred) error {
	mode := os.FileMode(0o600)
	if wc != nil {
		mode = 0o660
		if err := os.Lchown(sock, -1, wc.gid); err != nil {
			return fmt.Errorf("give control socket %s to the workers' group %d: %w", sock, wc.gid, err)
		}
	}
	if err := os.Chmod(sock, mode); err != nil {
		return fmt.Errorf("set control socket %s to mode %o: %w", sock, mode, err)
	}
	return nil
}

// Files of the cluster's run directory.
func (m *master) generationPath() string { return filepath.Join(m.dir, "generation") }
func (m *master) lockPath() string       { return filepath.Join(m.dir, "lock") }
func (m *master) workersPath() string    { return workersPath(m.cfg) }

// workersPath is where the resized slot count is kept.
func workersPath(cfg *Config) string { return filepath.Join(cfg.RunDir, cfg.Name, "workers") }

// deployReportPath is the file a successor leaves its error in.
func (m *master) deployReportPath() string { return filepath.Join(m.dir, "deploy-error") }
