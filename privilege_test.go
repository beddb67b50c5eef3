//go:build linux

package ipcluster_test

import (
	"bytes"
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

// tryRulesWorker tries what a compromised worker would: add an nf_tables
// table and an iptables chain in its namespace. It writes the outcome to
// ReportDir/tryrules-<pid>, then serves as echo.
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
	path := filepath.Join(helperSpec.ReportDir, "tryrules-"+strconv.Itoa(os.Getpid()))
	if err := os.WriteFile(path, []byte(report.String()), 0o644); err != nil {
		return fmt.Errorf("write tryrules report: %w", err)
	}
	return echoWorker(w)
}

const nobodyUID = 65534

func TestPrivilegeWorkerUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the master spawns workers as nobody")
	}
	lab := netlab.NewT(t, netlab.Options{})
	runDir, reports := openTempDir(t, 0o755), openTempDir(t, 0o777)
	c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: []uint16{8080}, Addr: lab.ServerAddr4.String(),
		RunDir: runDir, WorkerUser: "nobody"}, func(s *spec) {
		s.Scenario = "tryrules"
		s.ReportDir = reports
	})
	st := c.waitReady()

	t.Run("workers run as nobody without capabilities", func(t *testing.T) {
		for _, pid := range workerPIDs(st) {
			ps, err := procfs.ReadStatus(pid)
			if err != nil {
				t.Fatal(err)
			}
			if ps.UID != [4]int{nobodyUID, nobodyUID, nobodyUID, nobodyUID} || ps.GID[1] != nobodyUID {
				t.Errorf("worker %d runs as uids %v gids %v, want nobody", pid, ps.UID, ps.GID)
			}
			if ps.CapEff != 0 || ps.CapPrm != 0 || ps.CapAmb != 0 {
				t.Errorf("worker %d holds capabilities: CapEff %#x CapPrm %#x CapAmb %#x", pid, ps.CapEff, ps.CapPrm, ps.CapAmb)
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
		var files []string
		deadline := time.Now().Add(10 * time.Second)
		for len(files) < 2 && time.Now().Before(deadline) {
			files, _ = filepath.Glob(filepath.Join(reports, "tryrules-*"))
			time.Sleep(20 * time.Millisecond)
		}
		if len(files) < 2 {
			t.Fatalf("%d tryrules reports, want one per worker", len(files))
		}
		_, iptErr := exec.LookPath("iptables")
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(b), "nft eperm=true") {
				t.Errorf("%s: nf_tables write was not refused with EPERM:\n%s", f, b)
			}
			if iptErr == nil && !strings.Contains(string(b), "Permission denied") {
				t.Errorf("%s: iptables was not refused with Permission denied:\n%s", f, b)
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
	c := startCluster(t, lab, specConfig{Workers: 2, Ports: []uint16{8080}, Addr: lab.ServerAddr4.String(),
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
