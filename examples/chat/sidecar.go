//go:build unix

package main

// The pub/sub's own process. A deploy (SIGHUP) replaces the master too:
// the new build's master takes the cluster over and the old one exits. A
// NATS server inside the master would take the stream, and every
// client's cursor, with it. So the master runs NATS in a process of its
// own, this binary again with CHAT_NATS_SIDECAR set, in its own session,
// and every master of the cluster (the first, each deploy's, one started
// after a crash) finds it by the state file in RunDir/<name>.nats/ and
// reuses it. The stream lives as long as the cluster.
//
// It ends when the cluster stops (the last master, when its Run returns
// for a stop rather than a handover, sends it SIGTERM), or by itself once
// it has had no client for idleExit (its cluster is gone some other way,
// say every process in it was killed).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster"
)

const (
	envSidecar   = "CHAT_NATS_SIDECAR" // set in the sidecar: its directory
	idleExit     = time.Minute
	sidecarStart = 10 * time.Second
)

// sidecarState is the sidecar's state file.
type sidecarState struct {
	PID int    `json:"pid"`
	URL string `json:"url"`
}

// pubsubDir is where a cluster's sidecar keeps its state file: next to
// the cluster's run directory (for a user other than root, with no
// -rundir, in the temporary directory: development mode).
func pubsubDir(runDir, name string) string {
	if runDir == "" {
		runDir = ipcluster.DefaultRunDir
		if os.Geteuid() != 0 {
			runDir = filepath.Join(os.TempDir(), fmt.Sprintf("ipcluster-%d", os.Geteuid()))
		}
	}
	return filepath.Join(runDir, name+".nats")
}

// ensureSidecar returns the URL and pid of the cluster's pub/sub, starting
// it if no live one answers. A lock in dir keeps two masters starting at
// once from starting two.
func ensureSidecar(dir string, log *slog.Logger) (sidecarState, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return sidecarState{}, fmt.Errorf("make the pub/sub's directory: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return sidecarState{}, fmt.Errorf("open the pub/sub's lock: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return sidecarState{}, fmt.Errorf("lock %s: %w", lock.Name(), err)
	}
	if st, err := readSidecar(dir); err == nil && answers(st) {
		log.Info("pub/sub: the cluster's NATS sidecar is running", "pid", st.PID, "url", st.URL)
		return st, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return sidecarState{}, fmt.Errorf("find this binary to start the pub/sub: %w", err)
	}
	_ = os.Remove(filepath.Join(dir, "state.json"))
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), envSidecar+"="+dir)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true} // outlives this master
	if err := cmd.Start(); err != nil {
		return sidecarState{}, fmt.Errorf("start the pub/sub sidecar: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.After(sidecarStart)
	for {
		if st, err := readSidecar(dir); err == nil && st.PID == cmd.Process.Pid {
			log.Info("pub/sub: started the cluster's NATS sidecar", "pid", st.PID, "url", st.URL)
			return st, nil
		}
		select {
		case err := <-exited:
			return sidecarState{}, fmt.Errorf("the pub/sub sidecar exited at start: %v", err)
		case <-deadline:
			_ = cmd.Process.Kill()
			return sidecarState{}, fmt.Errorf("the pub/sub sidecar did not start within %s", sidecarStart)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func readSidecar(dir string) (sidecarState, error) {
	var st sidecarState
	b, err := os.ReadFile(filepath.Join(dir, "state.json"))
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, err
	}
	if st.PID <= 0 || st.URL == "" {
		return st, errors.New("incomplete state file")
	}
	return st, nil
}

// answers reports whether the sidecar in st is alive and takes clients.
func answers(st sidecarState) bool {
	if syscall.Kill(st.PID, 0) != nil {
		return false
	}
	nc, err := nats.Connect(st.URL, nats.Timeout(time.Second), nats.NoReconnect())
	if err != nil {
		return false
	}
	nc.Close()
	return true
}

// stopSidecar ends the cluster's pub/sub: the cluster stopped.
func stopSidecar(st sidecarState, log *slog.Logger) {
	if err := syscall.Kill(st.PID, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		log.Warn("pub/sub: stop the NATS sidecar", "pid", st.PID, "err", err)
	}
}

// runSidecar is the sidecar process: NATS until SIGTERM, SIGINT, or
// idleExit without a client.
func runSidecar(dir string) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("pubsub", "nats", "pid", os.Getpid())
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ns, url, err := startNATS(filepath.Join(dir, "jetstream"))
	if err != nil {
		log.Error("pub/sub sidecar", "err", err)
		return 1
	}
	defer ns.Shutdown()
	b, _ := json.Marshal(sidecarState{PID: os.Getpid(), URL: url})
	if err := writeAtomic(filepath.Join(dir, "state.json"), b, 0o600); err != nil {
		log.Error("pub/sub sidecar", "err", err)
		return 1
	}
	log.Info("NATS sidecar serving", "url", url)
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	idleSince := time.Now()
	for {
		select {
		case <-ctx.Done():
			log.Info("NATS sidecar stopping: the cluster stopped")
			removeOwnState(dir)
			return 0
		case now := <-t.C:
			if ns.NumClients() > 0 {
				idleSince = now
			} else if now.Sub(idleSince) >= idleExit {
				log.Info("NATS sidecar stopping: no client for " + idleExit.String())
				removeOwnState(dir)
				return 0
			}
		}
	}
}

// removeOwnState removes the state file if it is still this process's,
// and then the directory, if nothing else is in it: a stopped cluster
// leaves nothing behind.
func removeOwnState(dir string) {
	if st, err := readSidecar(dir); err == nil && st.PID == os.Getpid() {
		_ = os.Remove(filepath.Join(dir, "state.json"))
		_ = os.RemoveAll(filepath.Join(dir, "jetstream"))
		_ = os.Remove(filepath.Join(dir, "lock"))
		_ = os.Remove(dir)
	}
}
