//go:build linux

package ipcluster

// Least privilege: workers running as another user (Config.WorkerUser).
//
// Only the master needs CAP_NET_ADMIN. Workers never hold a capability,
// whoever they run as: the spawner thread (spawner.go) sees to that. With
// WorkerUser set a root master also spawns them with that user's uid, gid
// and groups, so that they cannot signal the master, take the cluster
// over or touch its files either. What is checked before anything is
// touched:
//
//   - the master runs as root (effective uid 0) with CAP_SETUID,
//     CAP_SETGID and CAP_KILL. A non-root master would need these, which
//     are worth root, and more (CAP_CHOWN for the run directory's group,
//     CAP_SYS_NICE and CAP_SYS_PTRACE to renice and measure workers of
//     another uid); its workers hold no capability without WorkerUser;
//   - the user can execute the binary and reach the control socket.
//
// and, as a last line, the master refuses a worker of the worker uid that
// shows any capability in /proc/<pid>/status (see admit), as it does any
// worker it spawned itself (see onHello).
//
// The control socket admits the worker uid as role "worker" only: a
// compromised worker must not stop, resize or take over the cluster.

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/procfs"
)

// workerCred is who workers run as.
type workerCred struct {
	user   string // Config.WorkerUser, for messages; "" for the master's own (selfCred)
	uid    int
	gid    int      // primary group: WorkerGroup, or the user's
	groups []uint32 // supplementary groups of the user
}

func (wc *workerCred) credential() *syscall.Credential {
	return &syscall.Credential{Uid: uint32(wc.uid), Gid: uint32(wc.gid), Groups: slices.Clone(wc.groups)}
}

// lookupWorkerCred resolves Config.WorkerUser and WorkerGroup. Names and
// numeric ids both must exist on the system: a typo must not start
// workers as an id nobody owns.
func lookupWorkerCred(cfg *Config) (*workerCred, error) {
	u, err := user.Lookup(cfg.WorkerUser)
	if _, numeric := strconv.Atoi(cfg.WorkerUser); err != nil && numeric == nil {
		u, err = user.LookupId(cfg.WorkerUser)
	}
	if err != nil {
		return nil, &ConfigError{Field: "WorkerUser", Problem: fmt.Sprintf("look up user %q: %v", cfg.WorkerUser, err),
			Fix: "name an existing user (such as nobody, or one made with useradd --system), or leave WorkerUser empty to run workers as the master's user"}
	}
	wc := &workerCred{user: cfg.WorkerUser}
	if wc.uid, err = strconv.Atoi(u.Uid); err != nil {
		return nil, fmt.Errorf("look up user %q: uid %q is not a number: %w", cfg.WorkerUser, u.Uid, err)
	}
	if wc.uid == 0 {
		return nil, &ConfigError{Field: "WorkerUser", Problem: fmt.Sprintf("%q is uid 0: workers would keep every capability", cfg.WorkerUser),
			Fix: "name an unprivileged user such as nobody, or leave WorkerUser empty"}
	}
	gid := u.Gid
	if cfg.WorkerGroup != "" {
		g, err := user.LookupGroup(cfg.WorkerGroup)
		if _, numeric := strconv.Atoi(cfg.WorkerGroup); err != nil && numeric == nil {
			g, err = user.LookupGroupId(cfg.WorkerGroup)
		}
		if err != nil {
			return nil, &ConfigError{Field: "WorkerGroup", Problem: fmt.Sprintf("look up group %q: %v", cfg.WorkerGroup, err),
				Fix: "name an existing group, or leave WorkerGroup empty to use WorkerUser's primary group"}
		}
		gid = g.Gid
	}
	if wc.gid, err = strconv.Atoi(gid); err != nil {
		return nil, fmt.Errorf("look up group of worker user %q: gid %q is not a number: %w", cfg.WorkerUser, gid, err)
	}
	ids, err := u.GroupIds()
	if err != nil {
		return nil, fmt.Errorf("look up the groups of worker user %q: %w", cfg.WorkerUser, err)
	}
	for _, id := range ids {
		n, err := strconv.ParseUint(id, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("look up the groups of worker user %q: gid %q is not a number: %w", cfg.WorkerUser, id, err)
		}
		wc.groups = append(wc.groups, uint32(n))
	}
	return wc, nil
}

// capNames names the capabilities checkSpawnAs asks for.
var capNames = map[int]string{procfs.CapSetUID: "CAP_SETUID", procfs.CapSetGID: "CAP_SETGID", procfs.CapKill: "CAP_KILL"}

// checkSpawnAs checks that the master (status st, executable exe) can
// start workers as wc.
func checkSpawnAs(st *procfs.Status, wc *workerCred, exe string) error {
	if st.UID[1] != 0 {
		return &ConfigError{Field: "WorkerUser",
			Problem: fmt.Sprintf("the master runs as uid %d: only a root master starts workers as another user "+
				"(it would need CAP_SETUID, which is worth root, and CAP_CHOWN, CAP_SYS_NICE and CAP_SYS_PTRACE to manage them)", st.UID[1]),
			Fix: "run the master as root, or leave WorkerUser empty: its workers hold no capability either way"}
	}
	var missing []string
	for _, c := range []int{procfs.CapSetUID, procfs.CapSetGID, procfs.CapKill} {
		if !st.HasCap(c) {
			missing = append(missing, capNames[c])
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: Config.WorkerUser %q: the master lacks %s, needed to start workers as uid %d and to signal them; "+
			"run the master as root with its usual capabilities, or leave WorkerUser empty", ErrNoPrivilege, wc.user, strings.Join(missing, ", "), wc.uid)
	}
	return wc.checkExec(exe)
}

// selfCred is who workers run as without WorkerUser: the master's
// effective ids and groups (and, like every worker, no capability).
func selfCred() (*workerCred, error) {
	groups, err := unix.Getgroups()
	if err != nil {
		return nil, fmt.Errorf("read own groups: %w", err)
	}
	wc := &workerCred{uid: unix.Geteuid(), gid: unix.Getegid()}
	for _, g := range groups {
		wc.groups = append(wc.groups, uint32(g))
	}
	return wc, nil
}

// checkExec checks that wc, without capabilities, may execute the binary.
// Workers exec it through /proc/self/exe, which needs no search
// permission on its directories, but the file's own mode must let them:
// a root master's workers have no CAP_DAC_OVERRIDE to pass it.
func (wc *workerCred) checkExec(exe string) error {
	var fst unix.Stat_t
	if err := unix.Stat(exe, &fst); err != nil {
		return fmt.Errorf("inspect own executable %s: %w", exe, err)
	}
	if wc.may(&fst, 1) {
		return nil
	}
	if path, err := os.Readlink(exe); err == nil {
		exe = path // /proc/self/exe names nothing to chmod
	}
	if wc.user == "" {
		return fmt.Errorf("workers run as the master's uid %d without capabilities, and could not execute the binary %s (mode %o, owner %d:%d): "+
			"make it executable by that uid (say chmod 0755 %s)", wc.uid, exe, fst.Mode&0o7777, fst.Uid, fst.Gid, exe)
	}
	return &ConfigError{Field: "WorkerUser",
		Problem: fmt.Sprintf("uid %d cannot execute the binary %s (mode %o, owner %d:%d)", wc.uid, exe, fst.Mode&0o7777, fst.Uid, fst.Gid),
		Fix:     "make it executable by that user (chmod o+rx, or a group it belongs to), or leave WorkerUser empty"}
}

// may reports whether wc passes the permission bit (1 execute or search,
// 2 write, 4 read) on a file, as the kernel decides for a process
// without capabilities.
func (wc *workerCred) may(st *unix.Stat_t, bit uint32) bool {
	switch {
	case int(st.Uid) == wc.uid:
		return st.Mode>>6&bit != 0
	case int(st.Gid) == wc.gid || slices.Contains(wc.groups, st.Gid):
		return st.Mode>>3&bit != 0
	}
	return st.Mode&bit != 0
}

// checkReachable checks that wc can search every directory from / down
// to dir, so that its workers reach the control socket below it.
func (wc *workerCred) checkReachable(dir string) error {
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		var st unix.Stat_t
		if err := unix.Stat(d, &st); err != nil {
			return fmt.Errorf("inspect %s for worker user %q: %w", d, wc.user, err)
		}
		if !wc.may(&st, 1) {
			return &ConfigError{Field: "RunDir",
				Problem: fmt.Sprintf("worker user %q (uid %d) cannot search %s (mode %o, owner %d:%d), so its workers cannot reach the control socket",
					wc.user, wc.uid, d, st.Mode&0o7777, st.Uid, st.Gid),
				Fix: "make it searchable (chmod o+x " + d + "), or choose a RunDir under a searchable directory such as /run"}
		}
		if d == "/" {
			return nil
		}
	}
}

// workerCaps returns a nonzero mask if process pid holds any capability.
func workerCaps(pid int) (uint64, error) {
	st, err := procfs.ReadStatus(pid)
	if err != nil {
		return 0, fmt.Errorf("read capabilities of pid %d: %w", pid, err)
	}
	return st.CapEff | st.CapPrm | st.CapAmb, nil
}
