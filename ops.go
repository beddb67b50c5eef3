//go:build linux

package ipcluster

// Every worker's private operator socket: the master's half. Before it
// spawns a worker, the master binds and listens a Unix socket at
// RunDir/<Name>/ops/g<generation>-<n>.sock, hands the listening descriptor
// to the worker (EnvOperator) and closes its own copy; the worker serves
// HTTP on it (worker_ops.go). The master reaches it by the path, from its
// HTTPAddr (/workers/, ops_http.go) and its /metrics; ipclusterctl dials it
// by the path in the status. Nothing else can: the directory is 0700 and
// the master's, and the socket is never on a public port.
//
// A worker spawned as Config.WorkerUser needs no access to the path: it
// has the descriptor. A new master (a deploy, or after a crash) learns an
// adopted worker's path from its hello, and accepts only one inside its
// own ops directory. The generation in the name keeps a new master's
// sockets apart from those of the workers it adopts. The loop owns opsSeq
// and removes a worker's socket file when the worker exits.

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// maxUnixPath is the longest path a Unix socket can be bound to
// (sun_path, less its terminating NUL).
const maxUnixPath = 107

// opsDir is the directory of the workers' operator sockets.
func (m *master) opsDir() string { return filepath.Join(m.dir, "ops") }

// openOperatorSocket listens on a new operator socket for a worker about to
// be spawned, and returns the listening socket as a file for its
// ExtraFiles (the caller closes it once the worker is started) and its
// path. A failure is logged by the caller: the worker is spawned without
// one, as serving clients matters more than reaching its profiles.
func (m *master) openOperatorSocket() (*os.File, string, error) {
	dir := m.opsDir()
	if err := os.Mkdir(dir, 0o700); err != nil && !os.IsExist(err) {
		return nil, "", fmt.Errorf("create the operator socket directory %s: %w", dir, err)
	}
	m.opsSeq++
	path := filepath.Join(dir, "g"+strconv.Itoa(m.gen)+"-"+strconv.Itoa(m.opsSeq)+".sock")
	if len(path) > maxUnixPath {
		return nil, "", fmt.Errorf("operator socket path %s is %d bytes, more than the %d a Unix socket's may have: use a shorter Config.RunDir", path, len(path), maxUnixPath)
	}
	_ = os.Remove(path) // a stale one of an earlier master of this generation (a failed start)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, "", fmt.Errorf("listen on operator socket %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false) // the worker serves on it: removed when the worker exits
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		os.Remove(path)
		return nil, "", fmt.Errorf("restrict operator socket %s: %w", path, err)
	}
	f, err := ln.File() // a duplicate: the worker's copy
	ln.Close()
	if err != nil {
		os.Remove(path)
		return nil, "", fmt.Errorf("operator socket %s: %w", path, err)
	}
	return f, path, nil
}

// adoptOperatorSocket returns the operator socket an adopted worker named
// in its hello, if it is one of this cluster's (inside opsDir: a worker's
// word is never a path the master dials elsewhere), or "".
func (m *master) adoptOperatorSocket(path string) string {
	if path == "" {
		return ""
	}
	clean := filepath.Clean(path)
	if filepath.Dir(clean) != m.opsDir() || !strings.HasSuffix(clean, ".sock") {
		m.log.Warn("adopted worker names an operator socket outside the cluster's; ignoring it", "path", path, "want_dir", m.opsDir())
		return ""
	}
	return clean
}

// removeOperatorSocket removes an exited worker's socket file.
func (m *master) removeOperatorSocket(p *proc) {
	if p.ops != "" {
		if err := os.Remove(p.ops); err != nil && !os.IsNotExist(err) {
			m.log.Debug("remove operator socket", append(p.logAttrs(), "path", p.ops, "err", err)...)
		}
	}
}

// removeOpsDir removes the operator socket directory once the last worker
// is gone (a graceful stop), with what workers that died while no master
// ran left in it.
func (m *master) removeOpsDir() {
	dir := m.opsDir()
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".sock") {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
	os.Remove(dir) // only if empty
}

// sweepOps removes the sockets of workers this master does not know, once
// the workers of an earlier master have had ConnectTimeout to say hello:
// those of workers that exited while no master ran (after a kill -9 of
// the master), which nobody else would remove.
func (m *master) sweepOps() {
	known := map[string]bool{}
	for _, p := range m.procs {
		if p.ops != "" {
			known[p.ops] = true
		}
	}
	dir := m.opsDir()
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		path := filepath.Join(dir, e.Name())
		if strings.HasSuffix(e.Name(), ".sock") && !known[path] {
			m.log.Debug("removing the operator socket of a worker gone while no master ran", "path", path)
			os.Remove(path)
		}
	}
}
