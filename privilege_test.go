//go:build linux

package ipcluster_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/procfs"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// envDial makes the test binary a control socket client instead of running
// the tests (see dialMain): the tests start it as other users.
const envDial = "IPCLUSTER_TEST_DIAL"

// dialRequest is what dialMain does: say hello to Socket as Role.
type dialRequest struct {
	Socket, Cluster, Role string
}

// dialMain connects to the control socket, says hello in the role asked
// (as role "master" it asks for the cluster, as a deploy does) and prints
// how the master answered: "welcome", "refused: <reason>", or
// "error: <what failed>".
func dialMain(raw string) int {
	var req dialRequest
	if err := json.Unmarshal([]byte(raw), &req); err != nil {
		fmt.Printf("error: bad %s: %v\n", envDial, err)
		return 2
	}
	conn, err := net.DialTimeout("unix", req.Socket, 5*time.Second)
	if err != nil {
		fmt.Printf("error: %v\n", err)
		return 0
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	// Write errors are ignored: a master refusing the peer's uid answers
	// before the hello and closes, and its answer is still there to read.
	hello := &proto.Hello{Version: proto.Version, Role: req.Role, Cluster: req.Cluster, PID: os.Getpid(), Build: "evil"}
	werr := proto.Write(conn, proto.TypeHello, hello)
	if werr == nil && req.Role == proto.RoleMaster {
		werr = proto.Write(conn, proto.TypeTakeover, &proto.Takeover{Build: "evil"})
	}
	if werr == nil && req.Role == proto.RoleClient {
		werr = proto.Write(conn, proto.TypeStatus, nil)
	}
	msg, err := proto.NewReader(conn).Read()
	if err != nil {
		fmt.Printf("error: read answer: %v (write: %v)\n", err, werr)
		return 0
	}
	switch b := msg.Body.(type) {
	case *proto.Refuse:
		fmt.Printf("refused: %s\n", b.Reason)
	default:
		fmt.Printf("%s\n", msg.Type)
	}
	return 0
}

// dialAs runs dialMain in the lab's server namespace as uid:gid and returns
// what it printed. It execs /proc/self/exe: the kernel resolves that link
// for the child itself, so the test binary's directories (go test's private
// build directory) need not be open to that user, only the file.
func dialAs(t *testing.T, lab *netlab.Lab, uid, gid uint32, socket, role string) string {
	t.Helper()
	raw, _ := json.Marshal(dialRequest{Socket: socket, Cluster: "t", Role: role})
	var out bytes.Buffer
	cmd := exec.Command("/proc/self/exe", "-test.run=^$")
	cmd.Env = append(os.Environ(), envDial+"="+string(raw))
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	if err := lab.Server.Start(cmd); err != nil {
		t.Fatalf("start dialer as %d:%d: %v", uid, gid, err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("dialer as %d:%d: %v: %s", uid, gid, err, out.String())
	}
	return strings.TrimSpace(out.String())
}

// openTempDir is a fresh directory under the system's temp directory
// (not t.TempDir, whose parent is private to root) with the given mode,
// for what workers running as nobody must reach.
func openTempDir(t *testing.T, mode os.FileMode) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ipcluster-priv-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, mode); err != nil {
		t.Fatal(err)
	}
	return dir
}

// envCapsProbe makes the test binary print its capabilities and exit (see
// capsProbeMain).
const envCapsProbe = "IPCLUSTER_TEST_CAPS_PROBE"

// capsProbeMain prints the effective and permitted sets of this process:
// tryRulesWorker execs it to see what a worker gains by executing its own
// binary (the file capabilities of a setcap binary, uid 0's full set).
func capsProbeMain() int {
	st, err := procfs.ReadStatus(0)
	if err != nil {
		fmt.Printf("error: %v\n", err)
		return 0
	}
	fmt.Printf("CapEff=%#x CapPrm=%#x\n", st.CapEff, st.CapPrm)
	return 0
}

// tryRulesWorker tries what a compromised worker would: add an nf_tables
// table and an iptables chain in its namespace, gain capabilities by
// executing its own binary, and open the memory of a thread of the master
// (its parent). It writes the outcome to ReportDir/tryrules-<pid>, then
// serves as echo.
func tryRulesWorker(w *ipcluster.Worker) error {
	var report strings.Builder
	conn, err := nftables.New()
	if err == nil {
		conn.AddTable(&nftables.Table{Name: "ipc-evil", Family: nftables.TableFamilyINet})
		err = conn.Flush()
	}
	fmt.Fprintf(&report, "nft eperm=%v err=%v\n", errors.Is(err, syscall.EPERM), err)
	out, err := exec.Command("iptables", "-w", "-t", "nat", "-N", "IPC-evil").CombinedOutput()
	fmt.Fprintf(&report, "iptables err=%v out=%q\n", err, out)
	probe := exec.Command("/proc/self/exe", "-test.run=^$")
	probe.Env = []string{envCapsProbe + "=1"}
	out, err = probe.CombinedOutput()
	fmt.Fprintf(&report, "reexec err=%v %s\n", err, strings.TrimSpace(string(out)))
	dir := "/proc/" + strconv.Itoa(os.Getppid()) + "/task"
	tasks, _ := os.ReadDir(dir)
	opened := 0
	for _, task := range tasks {
		if f, err := os.Open(filepath.Join(dir, task.Name(), "mem")); err == nil {
			f.Close()
			opened++
		}
	}
	fmt.Fprintf(&report, "mem opened=%d of %d threads\n", opened, len(tasks))
	// Renamed into place whole: the test reads it as soon as it exists.
	path := filepath.Join(helperSpec.ReportDir, "tryrules-"+strconv.Itoa(os.Getpid()))
	if err := os.WriteFile(path+".tmp", []byte(report.String()), 0o644); err != nil {
		return fmt.Errorf("write tryrules report: %w", err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		return fmt.Errorf("write tryrules report: %w", err)
	}
	return echoWorker(w)
}

// checkPowerless checks that each worker holds no capability (in any of
// its four sets), runs with no_new_privs, and, by its tryrules report in
// reports, could neither change the rules, nor regain capabilities by
// executing its binary, nor open the master's memory.
func checkPowerless(t *testing.T, lab *netlab.Lab, reports string, pids []int) {
	t.Helper()
	for _, pid := range pids {
		ps, err := procfs.ReadStatus(pid)
		if err != nil {
			t.Fatal(err)
		}
		if ps.CapInh != 0 || ps.CapPrm != 0 || ps.CapEff != 0 || ps.CapAmb != 0 || !ps.NoNewPrivs {
			t.Errorf("worker %d (uids %v) holds capabilities: CapInh %#x CapPrm %#x CapEff %#x CapAmb %#x, NoNewPrivs %v",
				pid, ps.UID, ps.CapInh, ps.CapPrm, ps.CapEff, ps.CapAmb, ps.NoNewPrivs)
		}
	}
	_, iptErr := exec.LookPath("iptables")
	for _, pid := range pids {
		f := filepath.Join(reports, "tryrules-"+strconv.Itoa(pid))
		var b []byte
		var err error
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if b, err = os.ReadFile(f); err == nil || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			t.Errorf("worker %d wrote no tryrules report: %v", pid, err)
			continue
		}
		for _, want := range []string{"nft eperm=true", "reexec err=<nil> CapEff=0x0 CapPrm=0x0\n", "mem opened=0 of"} {
			if !strings.Contains(string(b), want) {
				t.Errorf("worker %d: report lacks %q:\n%s", pid, want, b)
			}
		}
		if iptErr == nil && !strings.Contains(string(b), "Permission denied") {
			t.Errorf("worker %d: iptables was not refused with Permission denied:\n%s", pid, b)
		}
	}
	tables, err := nftConn(t, lab).ListTables()
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		if tb.Name == "ipc-evil" {
			t.Errorf("a worker created nf_tables table %s", tb.Name)
		}
	}
	if iptErr == nil && strings.Contains(nat(t, lab, false), "IPC-evil") {
		t.Errorf("a worker created an iptables chain:\n%s", nat(t, lab, false))
	}
}

const nobodyUID = 65534

// TestPrivilegeWorkerUser: a root master with WorkerUser, started with
// CAP_NET_ADMIN in its inheritable and ambient sets as well (which the
// change of uid keeps in the inheritable one), spawns workers as nobody
// that hold no capability in any set, and admits them as workers only.
func TestPrivilegeWorkerUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the master spawns workers as nobody")
	}
	lab := netlab.NewT(t, netlab.Options{})
	runDir, reports := openTempDir(t, 0o755), openTempDir(t, 0o777)
	c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		RunDir: runDir, WorkerUser: "nobody"}, func(s *spec) {
		s.Scenario = "tryrules"
		s.ReportDir = reports
		s.SysProcAttr = &syscall.SysProcAttr{AmbientCaps: []uintptr{unix.CAP_NET_ADMIN}}
	})
	st := c.waitReady()

	t.Run("workers run as nobody without capabilities", func(t *testing.T) {
		if ms, err := procfs.ReadStatus(c.cmd.Process.Pid); err != nil || ms.CapInh != 1<<procfs.CapNetAdmin {
			t.Fatalf("master's inheritable set: %+v, %v; want CAP_NET_ADMIN", ms, err)
		}
		for _, pid := range workerPIDs(st) {
			ps, err := procfs.ReadStatus(pid)
			if err != nil {
				t.Fatal(err)
			}
			if ps.UID != [4]int{nobodyUID, nobodyUID, nobodyUID, nobodyUID} || ps.GID[1] != nobodyUID {
				t.Errorf("worker %d runs as uids %v gids %v, want nobody", pid, ps.UID, ps.GID)
			}
		}
		checkSticky(t, lab.Client, lab.ClientAddrs4, lab.ServerAddr4, []uint16{8080}, 2, 32, 2)
	})

	t.Run("run directory open to the workers only", func(t *testing.T) {
		for path, want := range map[string]os.FileMode{filepath.Join(runDir, "t"): 0o710, c.socket: 0o660} {
			fi, err := os.Lstat(path)
			if err != nil {
				t.Fatal(err)
			}
			sys := fi.Sys().(*syscall.Stat_t)
			if fi.Mode().Perm() != want || sys.Uid != 0 || sys.Gid != nobodyUID {
				t.Errorf("%s: mode %o owner %d:%d, want %o 0:%d", path, fi.Mode().Perm(), sys.Uid, sys.Gid, want, nobodyUID)
			}
		}
	})

	t.Run("workers cannot change rules", func(t *testing.T) {
		checkPowerless(t, lab, reports, workerPIDs(st))
	})

	t.Run("control socket refuses other uids and roles", func(t *testing.T) {
		cases := []struct {
			uid, gid uint32
			role     string
			want     string
		}{
			// Not in the socket's group: the file mode stops it.
			{12345, 12345, proto.RoleClient, "error: dial unix " + c.socket + ": connect: permission denied"},
			// In the group (another service running as nogroup):
			// SO_PEERCRED stops it.
			{12345, nobodyUID, proto.RoleClient, "refused: permission denied: uid 12345 is neither the master's (0) nor the workers' (65534)"},
			{12345, nobodyUID, proto.RoleWorker, "refused: permission denied: uid 12345 is neither the master's (0) nor the workers' (65534)"},
			// The worker uid, as an operator or a new master.
			{nobodyUID, nobodyUID, proto.RoleClient, `refused: permission denied: uid 65534 may only connect as a worker; role "client" needs the master's uid 0`},
			{nobodyUID, nobodyUID, proto.RoleMaster, `refused: permission denied: uid 65534 may only connect as a worker; role "master" needs the master's uid 0`},
		}
		for _, tc := range cases {
			if got := dialAs(t, lab, tc.uid, tc.gid, c.socket, tc.role); got != tc.want {
				t.Errorf("uid %d gid %d as %s: got %q, want %q", tc.uid, tc.gid, tc.role, got, tc.want)
			}
		}
		// The master still owns and serves the cluster, with the same
		// workers.
		after := c.waitReady()
		if !slicesEqualSorted(workerPIDs(after), workerPIDs(st)) {
			t.Errorf("workers changed: %v, were %v", workerPIDs(after), workerPIDs(st))
		}
		select {
		case <-c.done:
			t.Fatalf("master exited: %v", c.err)
		default:
		}
		checkSticky(t, lab.Client, lab.ClientAddrs4, lab.ServerAddr4, []uint16{8080}, 2, 32, 1)
	})

	if err := c.stop(); err != nil {
		t.Errorf("master exit: %v\n%s", err, c.log())
	}
	waitGone(t, workerPIDs(st), 10*time.Second)
	checkNoRules(t, lab)
}

func slicesEqualSorted(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	seen := map[int]int{}
	for _, x := range a {
		seen[x]++
	}
	for _, x := range b {
		seen[x]--
	}
	for _, n := range seen {
		if n != 0 {
			return false
		}
	}
	return true
}

// TestPrivilegeWorkerUserUnknown: an unknown WorkerUser stops the master
// before it touches anything, naming the field and the fix.
func TestPrivilegeWorkerUserUnknown(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{})
	runDir := t.TempDir()
	c := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		RunDir: runDir, WorkerUser: "no-such-user-ipc"})
	if err := c.wait(15 * time.Second); err == nil {
		t.Fatal("master with an unknown WorkerUser exited 0")
	}
	log := c.log()
	for _, want := range []string{"Config.WorkerUser", `"no-such-user-ipc"`, "name an existing user"} {
		if !strings.Contains(log, want) {
			t.Errorf("master log lacks %q:\n%s", want, log)
		}
	}
	if _, err := os.Stat(filepath.Join(runDir, "t")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cluster directory created before the config was checked: %v", err)
	}
	checkNoRules(t, lab)
}

// TestPrivilegeRootWorkers: a root master without WorkerUser spawns
// workers that keep uid 0 but hold no capability, and cannot regain one by
// exec (uid 0's full set) or through the master's memory.
func TestPrivilegeRootWorkers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the master runs as root")
	}
	lab := netlab.NewT(t, netlab.Options{})
	reports := openTempDir(t, 0o777)
	c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4}, func(s *spec) {
		s.Scenario = "tryrules"
		s.ReportDir = reports
	})
	st := c.waitReady()
	for _, pid := range workerPIDs(st) {
		if ps, err := procfs.ReadStatus(pid); err != nil || ps.UID != [4]int{} {
			t.Errorf("worker %d: %+v, %v; want uid 0", pid, ps, err)
		}
	}
	checkPowerless(t, lab, reports, workerPIDs(st))
	checkMasterThreads(t, st.MasterPID)
	checkSticky(t, lab.Client, lab.ClientAddrs4, lab.ServerAddr4, []uint16{8080}, 2, 32, 1)
	if err := c.stop(); err != nil {
		t.Errorf("master exit: %v\n%s", err, c.log())
	}
	checkNoRules(t, lab)
}

// checkMasterThreads checks that of the master's threads one only, not the
// main one, has no_new_privs: the spawner thread, while every other keeps
// the master's privileges.
func checkMasterThreads(t *testing.T, pid int) {
	t.Helper()
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	tasks, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var nnp []string
	for _, task := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, task.Name(), "status"))
		if err != nil {
			continue // the thread ended
		}
		if ps, err := procfs.ParseStatus(b); err == nil && ps.NoNewPrivs {
			nnp = append(nnp, task.Name())
		}
	}
	if len(nnp) != 1 || nnp[0] == strconv.Itoa(pid) {
		t.Errorf("master %d: threads %v of %d have no_new_privs, want one that is not the main thread", pid, nnp, len(tasks))
	}
}

// masterUID is the uid of the non-root masters: no user of that id need
// exist.
const masterUID = 23456

// TestPrivilegeNonRootAmbient: the systemd shape (User= someone,
// AmbientCapabilities=CAP_NET_ADMIN). The workers hold no capability, and a
// deploy's successor master holds CAP_NET_ADMIN, takes over and spawns
// workers that hold none either.
func TestPrivilegeNonRootAmbient(t *testing.T) {
	t.Setenv(envTestBackend, "") // auto: without CAP_BPF, nftables
	testNonRootMaster(t, false)
}

// TestPrivilegeNonRootFileCaps: the setcap shape (a non-root master whose
// binary has the file capability cap_net_admin+ep), as
// TestPrivilegeNonRootAmbient. Without no_new_privs every exec of the
// binary, a worker's included, would be granted CAP_NET_ADMIN.
func TestPrivilegeNonRootFileCaps(t *testing.T) {
	t.Setenv(envTestBackend, "") // auto: without CAP_BPF, nftables
	testNonRootMaster(t, true)
}

func testNonRootMaster(t *testing.T, fileCaps bool) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the test starts the master as another user")
	}
	lab := netlab.NewT(t, netlab.Options{})
	// A copy of the test binary the master's uid may execute, with the
	// file capability if asked. It is written here rather than with
	// setcap(8), which needs libcap2-bin: struct vfs_cap_data, revision 2,
	// effective flag set.
	dir, exe := testBinaryCopy(t)
	sys := &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: masterUID, Gid: masterUID}}
	if fileCaps {
		const vfsCapRevision2, vfsCapFlagsEffective = 0x02000000, 0x000001 // linux/capability.h
		xattr := make([]byte, 20)
		binary.LittleEndian.PutUint32(xattr[0:], vfsCapRevision2|vfsCapFlagsEffective)
		binary.LittleEndian.PutUint32(xattr[4:], 1<<procfs.CapNetAdmin) // permitted, low word
		if err := unix.Setxattr(exe, "security.capability", xattr, 0); err != nil {
			t.Skipf("cannot give %s a file capability (security.capability): %v", exe, err)
		}
	} else {
		sys.AmbientCaps = []uintptr{unix.CAP_NET_ADMIN}
	}
	version := filepath.Join(dir, "version")
	setVersion := func(v string) {
		if err := os.WriteFile(version, []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	setVersion("v1")
	runDir, reports := openTempDir(t, 0o755), openTempDir(t, 0o777)
	if err := os.Chown(runDir, masterUID, masterUID); err != nil {
		t.Fatal(err)
	}
	c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		RunDir: runDir, CanaryPeriod: time.Second}, func(s *spec) {
		s.Scenario, s.ReportDir = "tryrules", reports
		s.Exe, s.VersionFile, s.SysProcAttr = exe, version, sys
	})
	st0 := c.waitReady()
	checkNetAdmin := func(what string, pid int) {
		t.Helper()
		ps, err := procfs.ReadStatus(pid)
		if err != nil {
			t.Fatal(err)
		}
		if ps.UID[1] != masterUID || !ps.HasCap(procfs.CapNetAdmin) {
			t.Fatalf("%s %d runs as uids %v with CapEff %#x, want uid %d with CAP_NET_ADMIN", what, pid, ps.UID, ps.CapEff, masterUID)
		}
	}
	checkNetAdmin("master", st0.MasterPID)
	if st0.Backend != "nftables" || !strings.Contains(st0.BackendReason, "bpf unavailable") || !strings.Contains(st0.BackendReason, "CAP_BPF") {
		t.Errorf("a master with CAP_NET_ADMIN alone uses %s (%s), want auto's nftables, saying bpf lacks CAP_BPF", st0.Backend, st0.BackendReason)
	}
	checkMasterThreads(t, st0.MasterPID)
	checkPowerless(t, lab, reports, workerPIDs(st0))
	checkSticky(t, lab.Client, lab.ClientAddrs4, lab.ServerAddr4, []uint16{8080}, 2, 32, 1)

	// A deploy: the successor starts from an ordinary thread of the
	// master, with what the master itself was given.
	setVersion("v2")
	if err := c.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := c.wait(30 * time.Second); err != nil {
		t.Fatalf("old master after the handover: %v\n%s", err, c.log())
	}
	var st *proto.Status
	var err error
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		st, err = c.status()
		if err == nil && servedBy(st, "v2", workerPIDs(st0)) && strings.HasPrefix(st.Deploy, "committed") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for the successor to serve v2 (last status %+v, %v)\n%s", st, err, c.log())
		}
	}
	stopMasterByPID(t, st.MasterPID)
	if st.MasterPID == st0.MasterPID {
		t.Fatalf("master %d still the same after the deploy", st.MasterPID)
	}
	checkNetAdmin("successor master", st.MasterPID)
	checkMasterThreads(t, st.MasterPID)
	var fresh []int
	for _, w := range st.Workers {
		if w.Build == "v2" {
			fresh = append(fresh, w.PID)
		}
	}
	checkPowerless(t, lab, reports, fresh)
	checkSticky(t, lab.Client, lab.ClientAddrs4, lab.ServerAddr4, []uint16{8080}, 2, 32, 1)
	if err := syscall.Kill(st.MasterPID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitGone(t, append([]int{st.MasterPID}, workerPIDs(st)...), 20*time.Second)
	checkNoRules(t, lab)
}

// TestPrivilegeRootBinaryNotExecutable: a root master's workers, uid 0
// without CAP_DAC_OVERRIDE, could not execute a binary of another owner
// with mode 0700: the master says so before it touches anything, rather
// than respawn workers that fail to exec.
func TestPrivilegeRootBinaryNotExecutable(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the master runs as root")
	}
	lab := netlab.NewT(t, netlab.Options{})
	exe := filepath.Join(openTempDir(t, 0o755), "ipcluster.test")
	b, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(exe, b, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(exe, masterUID, masterUID); err != nil {
		t.Fatal(err)
	}
	runDir := t.TempDir()
	c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, RunDir: runDir},
		func(s *spec) { s.Exe = exe })
	if err := c.wait(15 * time.Second); err == nil {
		t.Fatal("master exited 0")
	}
	want := fmt.Sprintf("workers run as the master's uid 0 without capabilities, and could not execute the binary %s (mode 700, owner %d:%d)", exe, masterUID, masterUID)
	if !strings.Contains(c.log(), want) {
		t.Errorf("master log lacks %q:\n%s", want, c.log())
	}
	if _, err := os.Stat(filepath.Join(runDir, "t")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cluster directory created before the binary was checked: %v", err)
	}
	checkNoRules(t, lab)
}

// The bpf backend needs CAP_BPF and nothing else: a non-root master that
// holds only that capability serves; one without it is refused at start
// with ErrNoPrivilege, naming CAP_BPF and the fix; with the auto backend
// the error also names development mode, a developer's way without root.
func TestPrivilegeBPFNeedsOnlyCapBPF(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the test starts the master as another user")
	}
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	_, exe := testBinaryCopy(t)
	for _, tc := range []struct {
		name    string
		caps    []uintptr
		backend ipcluster.Backend
	}{{"cap_bpf", []uintptr{unix.CAP_BPF}, "bpf"}, {"none", nil, "bpf"}, {"auto-none", nil, ""}} {
		t.Run(tc.name, func(t *testing.T) {
			runDir := openTempDir(t, 0o755)
			if err := os.Chown(runDir, masterUID, masterUID); err != nil {
				t.Fatal(err)
			}
			sys := &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: masterUID, Gid: masterUID}, AmbientCaps: tc.caps}
			c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4, RunDir: runDir, Backend: tc.backend},
				func(s *spec) { s.Exe, s.SysProcAttr = exe, sys })
			if tc.caps == nil && tc.backend == "" {
				// A developer's first try, unprivileged: the error names
				// development mode beside the capabilities.
				masterFailsAtStart(t, c, lab, ipcluster.ErrNoPrivilege.Error(), "CAP_NET_ADMIN", ipcluster.EnvDev+"=1")
				return
			}
			if tc.caps == nil {
				masterFailsAtStart(t, c, lab, ipcluster.ErrNoPrivilege.Error(), "lacks CAP_BPF", "AmbientCapabilities=CAP_BPF")
				return
			}
			st := c.waitReady()
			ps, err := procfs.ReadStatus(st.MasterPID)
			if err != nil {
				t.Fatal(err)
			}
			if ps.HasCap(procfs.CapNetAdmin) || ps.UID[1] != masterUID {
				t.Fatalf("master runs as uids %v with CapEff %#x, want uid %d without CAP_NET_ADMIN", ps.UID, ps.CapEff, masterUID)
			}
			checkSticky(t, lab.Client, lab.ClientAddrs4, lab.ServerAddr4, []uint16{8080}, 2, 32, 1)
			if err := c.stop(); err != nil {
				t.Errorf("master exit: %v", err)
			}
		})
	}
}

// testBinaryCopy copies the test binary into a directory of its own that
// any uid may search (go test's build directory is private to root), and
// returns both paths.
func testBinaryCopy(t *testing.T) (dir, exe string) {
	t.Helper()
	dir = openTempDir(t, 0o755)
	exe = filepath.Join(dir, "ipcluster.test")
	b, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(exe, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir, exe
}
