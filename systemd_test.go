//go:build linux

package ipcluster_test

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// sdMsg is one sd_notify datagram, with its sender's pid as the kernel
// tells it (SCM_CREDENTIALS), as systemd sees it.
type sdMsg struct {
	pid    int
	fields map[string]string
}

func (m sdMsg) has(kv string) bool {
	k, v, _ := strings.Cut(kv, "=")
	got, ok := m.fields[k]
	return ok && got == v
}

// key is the message's verb: READY, RELOADING, STOPPING, WATCHDOG, or
// MAINPID for a message that only names the main process.
func (m sdMsg) key() string {
	for _, k := range []string{"READY", "RELOADING", "STOPPING", "WATCHDOG", "MAINPID"} {
		if _, ok := m.fields[k]; ok {
			return k
		}
	}
	return "?"
}

// notifySocket plays systemd's notify socket.
type notifySocket struct {
	path string
	mu   sync.Mutex
	msgs []sdMsg
}

func listenNotify(t *testing.T) *notifySocket {
	t.Helper()
	s := &notifySocket{path: filepath.Join(t.TempDir(), "notify.sock")}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: s.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	rc, err := conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
	}); err != nil || serr != nil {
		t.Fatalf("SO_PASSCRED: %v %v", err, serr)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		conn.Close()
		<-done
	})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred))
		for {
			n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			m := sdMsg{pid: -1, fields: map[string]string{}}
			if cms, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, cm := range cms {
					if cred, err := unix.ParseUnixCredentials(&cm); err == nil {
						m.pid = int(cred.Pid)
					}
				}
			}
			for _, line := range strings.Split(string(buf[:n]), "\n") {
				if k, v, ok := strings.Cut(line, "="); ok {
					m.fields[k] = v
				}
			}
			s.mu.Lock()
			s.msgs = append(s.msgs, m)
			s.mu.Unlock()
		}
	}()
	return s
}

func (s *notifySocket) all() []sdMsg {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.msgs)
}

// waitCount waits until n messages match ok, and returns the nth.
func (s *notifySocket) waitCount(t *testing.T, what string, n int, ok func(sdMsg) bool) sdMsg {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		seen := 0
		for _, m := range s.all() {
			if ok(m) {
				if seen++; seen == n {
					return m
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; got %v", what, s.all())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (s *notifySocket) wait(t *testing.T, what string, ok func(sdMsg) bool) sdMsg {
	t.Helper()
	return s.waitCount(t, what, 1, ok)
}

// environ reads a process's environment.
func environ(t *testing.T, pid int) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		t.Fatalf("environment of pid %d: %v", pid, err)
	}
	var env []string
	for _, kv := range bytes.Split(b, []byte{0}) {
		if len(kv) > 0 {
			env = append(env, string(kv))
		}
	}
	return env
}

func getenv(env []string, name string) (string, bool) {
	for _, kv := range env {
		if k, v, _ := strings.Cut(kv, "="); k == name {
			return v, true
		}
	}
	return "", false
}

// Under systemd (NOTIFY_SOCKET set, WatchdogSec): READY=1 with MAINPID once
// the cluster serves, watchdog pings from the master's loop, RELOADING=1 on
// SIGHUP, the old master naming its successor as the main process, the
// successor's READY=1 (with its own MAINPID) once its deploy committed, and
// STOPPING=1 on SIGTERM. Workers never notify, and their environment has
// none of systemd's variables.
func TestSystemdNotify(t *testing.T) {
	sd := listenNotify(t)
	d := startDeployLab(t, 2, func(s *spec) {
		s.Env = []string{"NOTIFY_SOCKET=" + sd.path, "WATCHDOG_USEC=200000"}
	})
	pid1 := d.c.cmd.Process.Pid
	st0, err := d.c.status()
	if err != nil {
		t.Fatal(err)
	}
	workers := workerPIDs(st0)
	from := func(pid int, kv string) func(sdMsg) bool {
		return func(m sdMsg) bool { return m.pid == pid && m.has(kv) }
	}

	ready := sd.wait(t, "READY=1 from the master", from(pid1, "READY=1"))
	if !ready.has("MAINPID="+strconv.Itoa(pid1)) || !strings.Contains(ready.fields["STATUS"], "2 slots") {
		t.Errorf("first READY=1: %v, want MAINPID=%d and a status naming 2 slots", ready.fields, pid1)
	}
	sd.waitCount(t, "3 watchdog pings", 3, from(pid1, "WATCHDOG=1"))

	d.setVersion("v2")
	if err := d.c.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	sd.wait(t, "RELOADING=1 on SIGHUP", from(pid1, "RELOADING=1"))
	if err := d.c.wait(10 * time.Second); err != nil {
		t.Fatalf("old master after the handover: %v\n%s", err, d.c.log())
	}
	st := d.waitStatus("every slot on v2", func(st *proto.Status) bool {
		return servedBy(st, "v2", workers) && strings.HasPrefix(st.Deploy, "committed")
	})
	pid2 := st.MasterPID
	stopMasterByPID(t, pid2)
	workers = append(workers, workerPIDs(st)...)
	sd.wait(t, "the old master naming its successor", from(pid1, "MAINPID="+strconv.Itoa(pid2)))
	ready2 := sd.wait(t, "READY=1 from the new master", from(pid2, "READY=1"))
	if !ready2.has("MAINPID=" + strconv.Itoa(pid2)) {
		t.Errorf("new master's READY=1: %v, want MAINPID=%d", ready2.fields, pid2)
	}
	sd.waitCount(t, "watchdog pings from the new master", 2, from(pid2, "WATCHDOG=1"))

	env2 := environ(t, pid2)
	if v, _ := getenv(env2, "NOTIFY_SOCKET"); v != sd.path {
		t.Errorf("new master's NOTIFY_SOCKET=%q, want %q", v, sd.path)
	}
	if v, _ := getenv(env2, "WATCHDOG_USEC"); v != "200000" {
		t.Errorf("new master's WATCHDOG_USEC=%q, want 200000", v)
	}
	for _, w := range st.Workers {
		env := environ(t, w.PID)
		for _, name := range []string{"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} {
			if v, ok := getenv(env, name); ok {
				t.Errorf("worker %d (%s) has %s=%s", w.PID, w.State, name, v)
			}
		}
	}

	if err := syscall.Kill(pid2, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	sd.wait(t, "STOPPING=1 on SIGTERM", from(pid2, "STOPPING=1"))
	waitGone(t, []int{pid2}, 20*time.Second)

	// What systemd saw, pings aside. The new master's own RELOADING=1 is
	// its rolling deploy of the adopted v1 workers (there is none if no
	// worker was adopted in time): its READY=1 waits for the commit.
	var seen []string
	for _, m := range sd.all() {
		switch {
		case m.pid != pid1 && m.pid != pid2:
			t.Errorf("message from pid %d, not a master (%d, %d): %v", m.pid, pid1, pid2, m.fields)
		case m.fields["MAINPID"] != "" && slices.Contains(workers, atoi(m.fields["MAINPID"])):
			t.Errorf("a worker named as the main process: %v", m.fields)
		}
		if k := m.key(); k != "WATCHDOG" {
			who := "old"
			if m.pid == pid2 {
				who = "new"
			}
			seen = append(seen, who+":"+k)
		}
	}
	got := strings.Join(seen, " ")
	want := []string{
		"old:READY old:RELOADING old:MAINPID new:RELOADING new:READY new:STOPPING",
		"old:READY old:RELOADING old:MAINPID new:READY new:STOPPING",
	}
	if !slices.Contains(want, got) {
		t.Errorf("notifications %q, want %q", got, want[0])
	}
	t.Logf("notifications: %s", got)
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}
