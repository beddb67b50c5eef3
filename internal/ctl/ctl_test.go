package ctl

import (
	"bytes"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// fakeMaster answers the control protocol on RunDir/t/control.sock: hello
// with welcome (or refuse with denied), status with the next of statuses
// (the last one repeats), and every other request with answers[type] (a
// *proto.Refuse body is sent as an error).
type fakeMaster struct {
	runDir   string
	denied   string
	mu       sync.Mutex
	statuses []*proto.Status
	answers  map[string]any
}

func startFake(t *testing.T, f *fakeMaster) *fakeMaster {
	t.Helper()
	f.runDir = t.TempDir()
	if err := os.Mkdir(filepath.Join(f.runDir, "t"), 0o700); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", filepath.Join(f.runDir, "t", "control.sock"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go f.serve(conn)
		}
	}()
	return f
}

func (f *fakeMaster) serve(conn net.Conn) {
	defer conn.Close()
	r := proto.NewReader(conn)
	if _, err := r.Read(); err != nil {
		return
	}
	if f.denied != "" {
		_ = proto.Write(conn, proto.TypeRefuse, &proto.Refuse{Reason: f.denied})
		return
	}
	_ = proto.Write(conn, proto.TypeWelcome, &proto.Welcome{Version: proto.Version})
	for {
		m, err := r.Read()
		if err != nil {
			return
		}
		f.mu.Lock()
		if m.Type == proto.TypeStatus {
			st := f.statuses[0]
			if len(f.statuses) > 1 {
				f.statuses = f.statuses[1:]
			}
			f.mu.Unlock()
			_ = proto.Write(conn, proto.TypeStatus, st)
			continue
		}
		a := f.answers[m.Type]
		f.mu.Unlock()
		if ref, ok := a.(*proto.Refuse); ok {
			_ = proto.Write(conn, proto.TypeError, ref)
		} else {
			_ = proto.Write(conn, m.Type, a)
		}
	}
}

func (f *fakeMaster) run(args ...string) (int, string) {
	var out, errb bytes.Buffer
	code := Main(append([]string{"-rundir", f.runDir, "-name", "t"}, args...), &out, &errb)
	return code, out.String() + errb.String()
}

func status(pid int, phase, deploy string) *proto.Status {
	return &proto.Status{Cluster: "t", MasterPID: pid, Ready: true, DeployPhase: phase, Deploy: deploy,
		Slots: []proto.SlotStatus{{Slot: 0, Active: 10}}}
}

// Each kind of failure has its exit status, and says what failed.
func TestExitCodes(t *testing.T) {
	deploy := map[string]any{proto.TypeDeploy: &proto.Deploy{SuccessorPID: 2}}
	const bad = "new master pid 2: ipcluster: Config.Workers: 3 is not a power of two from 1 to 256; use 1, 2, 4, ... (exit status 1)"
	for _, tc := range []struct {
		name string
		f    *fakeMaster // nil: no master at all
		args []string
		code int
		say  string
	}{
		{"usage", &fakeMaster{statuses: []*proto.Status{status(1, "", "")}}, []string{"status", "--bogus"}, exitUsage, "unknown argument"},
		{"unknown command", &fakeMaster{statuses: []*proto.Status{status(1, "", "")}}, []string{"frobnicate"}, exitUsage, "unknown command"},
		{"no master", nil, []string{"status"}, exitNoMaster, "is a master running?"},
		{"denied", &fakeMaster{denied: "permission denied: uid 1000 is not the master's (0)"}, []string{"status"}, exitDenied, "uid 1000 is not the master's"},
		{"refused", &fakeMaster{statuses: []*proto.Status{status(1, "", "")},
			answers: map[string]any{proto.TypeResize: &proto.Refuse{Reason: "resize: 3 is not a power of two"}}},
			[]string{"resize", "3"}, exitRefused, "resize: 3 is not a power of two"},
		{"rolled back", &fakeMaster{statuses: []*proto.Status{status(1, "committed", "committed v1"), status(2, "rolled-back", "rolled back to v1 after 3s: canary crashed")},
			answers: deploy}, []string{"deploy"}, exitRolledBack, "deploy rolled back to v1 after 3s: canary crashed"},
		{"deploy failed", &fakeMaster{statuses: []*proto.Status{status(1, "committed", "committed v1"), status(1, "failed", "failed: "+bad)},
			answers: deploy}, []string{"deploy"}, exitDeployFailed, "deploy failed: " + bad},
		{"timeout", &fakeMaster{statuses: []*proto.Status{status(1, "committed", "committed v1")}, answers: deploy},
			[]string{"-timeout", "300ms", "deploy"}, exitTimeout, "gave up waiting for the deploy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var code int
			var out string
			if tc.f == nil {
				var errb bytes.Buffer
				code = Main(append([]string{"-rundir", filepath.Join(t.TempDir(), "none")}, tc.args...), &bytes.Buffer{}, &errb)
				out = errb.String()
			} else {
				code, out = startFake(t, tc.f).run(tc.args...)
			}
			if code != tc.code || !strings.Contains(out, tc.say) {
				t.Errorf("exit %d, want %d, saying %q:\n%s", code, tc.code, tc.say, out)
			}
			if strings.Contains(out, "failed: failed") {
				t.Errorf("output repeats itself:\n%s", out)
			}
		})
	}
}

// A socket with nobody listening (the master died): no master, with the
// advice that starting the program again adopts the workers.
func TestExitCodeDeadMaster(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "t"), 0o700); err != nil {
		t.Fatal(err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, "t", "control.sock"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	var errb bytes.Buffer
	if code := Main([]string{"-rundir", dir, "-name", "t", "status"}, &bytes.Buffer{}, &errb); code != exitNoMaster || !strings.Contains(errb.String(), "adopts them") {
		t.Errorf("exit %d, want %d: %s", code, exitNoMaster, errb.String())
	}
}

// envMain makes the test binary run Main with the arguments in it (one per
// line) and exit with its status: TestExitCodeNotMasterUser runs it as
// another user.
const envMain = "IPCLUSTER_CTL_TEST_MAIN"

func TestMain(m *testing.M) {
	if args := os.Getenv(envMain); args != "" {
		os.Exit(Main(strings.Split(args, "\n"), os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// As a user the socket is closed to: permission denied, exit status 4.
func TestExitCodeNotMasterUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs ipclusterctl as nobody")
	}
	f := startFake(t, &fakeMaster{statuses: []*proto.Status{status(1, "", "")}})
	// t.TempDir is root's alone, as the run directory of a master with
	// no WorkerUser is its user's.
	// /proc/self/exe: the kernel resolves it for the child, so go test's
	// private build directory need not be open to nobody.
	cmd := exec.Command("/proc/self/exe", "-test.run=^$")
	cmd.Env = append(os.Environ(), envMain+"=-rundir\n"+f.runDir+"\n-name\nt\nstatus")
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != exitDenied || !strings.Contains(string(out), "permission denied") {
		t.Errorf("as nobody: %v, want exit status %d saying permission denied:\n%s", err, exitDenied, out)
	}
}
