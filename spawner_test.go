//go:build linux

package ipcluster

import (
	"errors"
	"strings"
	"testing"

	"github.com/ipcluster/ipcluster/internal/procfs"
)

// TestCheckSpawnAsNeedsRoot: WorkerUser under a non-root master is refused
// whatever capabilities it holds (ambient or file ones), naming the fix.
func TestCheckSpawnAsNeedsRoot(t *testing.T) {
	wc := &workerCred{user: "nobody", uid: 65534, gid: 65534}
	all := uint64(1<<procfs.CapKill | 1<<procfs.CapSetGID | 1<<procfs.CapSetUID | 1<<procfs.CapNetAdmin)
	st := &procfs.Status{CapEff: all, CapPrm: all, CapAmb: all, UID: [4]int{1000, 1000, 1000, 1000}}
	err := checkSpawnAs(st, wc, "/proc/self/exe")
	if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "Config.WorkerUser: the master runs as uid 1000") ||
		!strings.Contains(err.Error(), "run the master as root, or leave WorkerUser empty") {
		t.Errorf("non-root master with WorkerUser: %v", err)
	}
	st.UID = [4]int{}
	st.CapEff = 1 << procfs.CapNetAdmin
	if err := checkSpawnAs(st, wc, "/proc/self/exe"); !errors.Is(err, ErrNoPrivilege) || !strings.Contains(err.Error(), "CAP_SETUID, CAP_SETGID, CAP_KILL") {
		t.Errorf("root master without CAP_SETUID: %v", err)
	}
}
