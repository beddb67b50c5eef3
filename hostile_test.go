//go:build linux

package ipcluster_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// envFakeWorker makes the test binary a fake worker (fakeWorkerMain): a
// process of its own, so that the master may watch and signal its pid.
const envFakeWorker = "IPCLUSTER_TEST_FAKE_WORKER"

type fakeWorkerSpec struct {
	Socket string
	Slot   int
	Flood  time.Duration // send heartbeats as fast as possible for this long
}

// fakeWorkerMain says hello as a worker of cluster "t" for a slot, with its
// own pid and a port the cluster never routes to, prints the answer's type,
// optionally floods heartbeats and prints how many, then waits for the
// master to close the connection or for stdin to close.
func fakeWorkerMain(raw string) int {
	var s fakeWorkerSpec
	if err := json.Unmarshal([]byte(raw), &s); err != nil {
		fmt.Println("bad spec:", err)
		return 2
	}
	conn, err := net.Dial("unix", s.Socket)
	if err != nil {
		fmt.Println("dial:", err)
		return 1
	}
	hello := proto.Hello{Version: proto.Version, Role: proto.RoleWorker, Cluster: "t", PID: os.Getpid(), Slot: s.Slot,
		Generation: 1, Ports: []proto.Port{{Public: 8080, Proto: "tcp", Worker: 9}}}
	if err := proto.Write(conn, proto.TypeHello, &hello); err != nil {
		fmt.Println("hello:", err)
		return 1
	}
	r := proto.NewReader(conn)
	m, err := r.Read()
	if err != nil {
		fmt.Println("answer:", err)
		return 1
	}
	if w, ok := m.Body.(*proto.Welcome); ok && w.Retired {
		fmt.Println("welcome-retired")
	} else {
		fmt.Println(m.Type)
	}
	if s.Flood > 0 {
		frame, _ := proto.Encode(proto.TypeHeartbeat, &proto.Heartbeat{Stats: proto.Stats{Goroutines: 1}})
		n := 0
		for end := time.Now().Add(s.Flood); time.Now().Before(end); n++ {
			if _, err := conn.Write(frame); err != nil {
				break
			}
		}
		fmt.Println("sent", n)
	}
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); conn.Close() }()
	_, _ = io.Copy(io.Discard, conn)
	return 0
}

// startFakeWorker runs fakeWorkerMain and returns its first line.
func startFakeWorker(t *testing.T, s fakeWorkerSpec) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	raw, _ := json.Marshal(s)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envFakeWorker+"="+string(raw))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	return cmd, bufio.NewScanner(out)
}

// Hostile peers on the control socket, beyond the malformed hellos of
// TestControlSocketRejectsBadPeers: each loses at most its own connection;
// the workers keep their pids and serve every slot, and the kernel's rules
// stay as they were.
func TestHostilePeers(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	const connectTimeout = 2 * time.Second
	c := startCluster(t, lab, specConfig{Workers: 2, Ports: tcpPorts(8080), Addr: lab.ServerAddr4,
		ConnectTimeout: connectTimeout, HeartbeatInterval: 100 * time.Millisecond})
	before := c.waitReady()
	rules := before.Rules

	unaffected := func(t *testing.T) {
		t.Helper()
		st, err := c.status()
		if err != nil {
			t.Fatal(err)
		}
		for slot := range st.Slots {
			if got, want := activePID(st, slot), activePID(before, slot); got != want {
				t.Errorf("slot %d active pid %d, was %d", slot, got, want)
			}
		}
		for _, w := range before.Workers {
			if !slices.Contains(workerPIDs(st), w.PID) {
				t.Errorf("worker %d gone", w.PID)
			}
		}
		if !maps.Equal(st.Rules, rules) {
			t.Errorf("rules changed:\n%v\nwas:\n%v", st.Rules, rules)
		}
		c.checkKernelRules(t)
		checkSticky(t, lab.Client, lab.ClientAddrs4, lab.ServerAddr4, []uint16{8080}, 2, 32, 1)
	}
	// closedWithin checks the master closes conn within d, reading and
	// dropping whatever it sends.
	closedWithin := func(t *testing.T, conn net.Conn, d time.Duration) {
		t.Helper()
		start := time.Now()
		_ = conn.SetReadDeadline(start.Add(d))
		if _, err := io.Copy(io.Discard, conn); err != nil {
			t.Fatalf("master did not close the connection within %s: %v", d, err)
		}
	}
	dialHello := func(t *testing.T) net.Conn {
		t.Helper()
		conn, err := net.Dial("unix", c.socket)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}

	t.Run("slowloris", func(t *testing.T) {
		// A length prefix, then nothing: the hello deadline ends it.
		conn := dialHello(t)
		if _, err := conn.Write([]byte{0, 0, 1, 0, '{'}); err != nil {
			t.Fatal(err)
		}
		closedWithin(t, conn, connectTimeout+time.Second)
		unaffected(t)
	})
	t.Run("garbage after hello", func(t *testing.T) {
		for _, junk := range [][]byte{[]byte("\x00\x00\x00\x03abc"), {0x7f, 0xff, 0xff, 0xff}, {0, 0, 0, 0}} {
			conn := dialHello(t)
			hello := proto.Hello{Version: proto.Version, Role: proto.RoleClient, Cluster: "t", PID: os.Getpid()}
			if err := proto.Write(conn, proto.TypeHello, &hello); err != nil {
				t.Fatal(err)
			}
			if _, err := conn.Write(junk); err != nil {
				t.Fatal(err)
			}
			closedWithin(t, conn, 5*time.Second)
		}
		unaffected(t)
	})
	t.Run("slot of another worker", func(t *testing.T) {
		_, out := startFakeWorker(t, fakeWorkerSpec{Socket: c.socket, Slot: 0})
		if !out.Scan() {
			t.Fatal("fake worker said nothing")
		}
		if got := out.Text(); got != "welcome-retired" && got != proto.TypeRefuse {
			t.Errorf("a hello for slot 0 got %q, want refuse or a welcome as retired", got)
		}
		unaffected(t)
	})
	t.Run("pid of a real worker", func(t *testing.T) {
		conn := dialHello(t)
		hello := proto.Hello{Version: proto.Version, Role: proto.RoleWorker, Cluster: "t", PID: activePID(before, 0),
			Slot: 0, Generation: 1, Ports: []proto.Port{{Public: 8080, Proto: "tcp", Worker: 9}}}
		if err := proto.Write(conn, proto.TypeHello, &hello); err != nil {
			t.Fatal(err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		m, err := proto.NewReader(conn).Read()
		if err != nil {
			t.Fatal(err)
		}
		if r, ok := m.Body.(*proto.Refuse); !ok || !strings.Contains(r.Reason, "kernel says") {
			t.Errorf("hello with worker %d's pid answered %s %+v", hello.PID, m.Type, m.Body)
		}
		unaffected(t)
	})
	t.Run("heartbeat flood", func(t *testing.T) {
		const flood = 3 * time.Second
		_, out := startFakeWorker(t, fakeWorkerSpec{Socket: c.socket, Slot: 1, Flood: flood})
		if !out.Scan() || (out.Text() != "welcome-retired" && out.Text() != proto.TypeRefuse) {
			t.Fatalf("fake worker answered %q", out.Text())
		}
		end := time.Now().Add(flood)
		for time.Now().Before(end) {
			t0 := time.Now()
			st, err := c.status()
			if err != nil {
				t.Fatal(err)
			}
			if d := time.Since(t0); d > time.Second {
				t.Errorf("status took %s during the flood", d)
			}
			for _, w := range st.Workers {
				if slices.Contains(workerPIDs(before), w.PID) && w.HeartbeatAgeSec > 1 {
					t.Errorf("worker %d's last heartbeat is %.1fs old during the flood", w.PID, w.HeartbeatAgeSec)
				}
			}
			time.Sleep(200 * time.Millisecond)
		}
		if out.Scan() {
			t.Logf("fake worker %s heartbeats in %s", strings.TrimPrefix(out.Text(), "sent "), flood)
		}
		unaffected(t)
	})
	t.Run("idle connections", func(t *testing.T) {
		conns := make([]net.Conn, 200)
		for i := range conns {
			conns[i] = dialHello(t)
		}
		t0 := time.Now()
		if _, err := c.status(); err != nil {
			t.Fatalf("status with 200 idle connections: %v", err)
		}
		if d := time.Since(t0); d > time.Second {
			t.Errorf("status took %s with 200 idle connections", d)
		}
		for _, conn := range conns {
			closedWithin(t, conn, time.Until(t0.Add(connectTimeout+2*time.Second)))
		}
		unaffected(t)
	})
}
