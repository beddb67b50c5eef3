//go:build linux

package ipcluster_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/netlab"
)

// udpFlow is one client UDP socket: a fixed source address and port, so
// every datagram it sends is the same conntrack flow.
type udpFlow struct {
	net.Conn
	src netip.Addr
	seq int
}

func dialUDP(t *testing.T, ns *netlab.NS, src netip.Addr, dst netip.AddrPort) *udpFlow {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := ns.Dial(ctx, "udp", src, dst)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &udpFlow{Conn: conn, src: src}
}

// probe sends one datagram and waits up to wait for its answer; answers to
// earlier datagrams are skipped. An ICMP port unreachable (a dead worker
// port) shows as an error.
func (f *udpFlow) probe(wait time.Duration) (reply, error) {
	f.seq++
	want := strconv.Itoa(f.seq)
	_ = f.SetDeadline(time.Now().Add(wait))
	if _, err := f.Write([]byte(want)); err != nil {
		return reply{}, err
	}
	buf := make([]byte, 512)
	for {
		n, err := f.Read(buf)
		if err != nil {
			return reply{}, err
		}
		line, seq, ok := strings.Cut(strings.TrimSpace(string(buf[:n])), " seq=")
		if !ok {
			return reply{}, fmt.Errorf("answer %q carries no seq", buf[:n])
		}
		if seq == want {
			return parseReply(line)
		}
	}
}

// untilAnswered probes every 5ms (30ms if unanswered) until a worker other than old answers,
// and returns that answer and when it came.
func (f *udpFlow) untilAnswered(t *testing.T, old int, timeout time.Duration) (reply, time.Time) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		rep, err := f.probe(25 * time.Millisecond)
		if err == nil && rep.PID != old {
			return rep, time.Now()
		}
		if err == nil {
			last = fmt.Errorf("answered by pid %d", rep.PID)
		} else {
			last = err
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("flow from %s: no answer from a worker other than pid %d within %s (last: %v)", f.LocalAddr(), old, timeout, last)
	return reply{}, time.Time{}
}

// checkUDP checks a flow is answered by pid in slot, which sees the
// client's real address and port.
func (f *udpFlow) check(t *testing.T, slot, pid int) {
	t.Helper()
	rep, err := f.probe(2 * time.Second)
	if err != nil {
		t.Fatalf("flow from %s: %v", f.LocalAddr(), err)
	}
	local := netip.MustParseAddrPort(f.LocalAddr().String())
	if rep.Slot != slot || rep.PID != pid || rep.Remote != netip.AddrPortFrom(local.Addr().Unmap(), local.Port()) {
		t.Fatalf("flow from %s answered by slot %d pid %d seeing %s; want slot %d pid %d seeing the client", local, rep.Slot, rep.PID, rep.Remote, slot, pid)
	}
}

// The slot's worker is killed: once its replacement is ready, the same
// client socket (same 5-tuple) is answered by the new worker, in both
// families, and a TCP connection to another slot is untouched. The
// replacement inherits the dead worker's sockets, so the flow needs no
// conntrack cleanup (it is off here): the rules never change.
func TestUDPFlowFollowsKilledWorker(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	// Addr unset: both families. TCP and UDP share the number 8080.
	c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: append(tcpPorts(8080), udpPorts(8080)...)},
		func(s *spec) { s.SkipConntrackCleanup = true })
	st := c.waitReady()
	src4, src6 := lab.ClientAddrs4[1], lab.ClientAddrs6[1]
	if expectSlot(src4, 2, 32) != 1 || expectSlot(src6, 2, 64) != 1 {
		t.Fatal("lab addresses do not select slot 1")
	}
	flows := []*udpFlow{
		dialUDP(t, lab.Client, src4, netip.AddrPortFrom(lab.ServerAddr4, 8080)),
		dialUDP(t, lab.Client, src6, netip.AddrPortFrom(lab.ServerAddr6, 8080)),
	}
	victim := activePID(st, 1)
	for _, f := range flows {
		f.check(t, 1, victim)
	}
	held, err := c.dial(lab.ClientAddrs4[0], netip.AddrPortFrom(lab.ServerAddr4, 8080))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()

	killed := time.Now()
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var answered []time.Duration
	for _, f := range flows {
		_, at := f.untilAnswered(t, victim, 10*time.Second)
		answered = append(answered, at.Sub(killed))
	}
	st = c.waitStatus("slot 1 replaced", func(st *ipStatus) bool {
		p := activePID(st, 1)
		return p != 0 && p != victim
	})
	for _, f := range flows {
		f.check(t, 1, activePID(st, 1))
	}
	if rep, err := held.probe(); err != nil || rep.PID != activePID(st, 0) {
		t.Errorf("slot 0's TCP connection after slot 1's worker was killed: %+v %v", rep, err)
	}
	if strings.Contains(c.log(), "deleted conntrack entries of moved UDP flows") {
		t.Errorf("conntrack entries deleted after a kill, with the cleanup off")
	}
	t.Logf("kill -9 → the same flow answered by the new worker: ipv4 %s, ipv6 %s (probing every 5-30ms)",
		answered[0].Round(time.Millisecond), answered[1].Round(time.Millisecond))
}

// The control for TestUDPFlowFollowsRetiredWorker: with the cleanup off,
// once a worker is retired the replacement is ready and the rules point at
// it (a new socket reaches it), but the old flow stays pinned to the
// retired worker's port.
func TestUDPFlowStaysPinnedWithoutCleanup(t *testing.T) {
	natBackendTest(t) // conntrack pins the nat backends' flows
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	c := startClusterSpec(t, lab, specConfig{Workers: 2, Ports: udpPorts(5353), Addr: lab.ServerAddr4},
		func(s *spec) { s.SkipConntrackCleanup = true })
	st := c.waitReady()
	dst := netip.AddrPortFrom(lab.ServerAddr4, 5353)
	flow := dialUDP(t, lab.Client, lab.ClientAddrs4[1], dst)
	old := activePID(st, 1)
	flow.check(t, 1, old)
	if err := syscall.Kill(old, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	st = c.waitStatus("slot 1 replaced", func(st *ipStatus) bool {
		p := activePID(st, 1)
		return p != 0 && p != old
	})
	fresh := dialUDP(t, lab.Client, lab.ClientAddrs4[1], dst)
	fresh.check(t, 1, activePID(st, 1))
	for deadline := time.Now().Add(1500 * time.Millisecond); time.Now().Before(deadline); {
		if rep, err := flow.probe(200 * time.Millisecond); err == nil && rep.PID != old {
			t.Fatalf("without the cleanup the old flow was answered by pid %d, not the retired %d; TestUDPFlowFollowsRetiredWorker proves nothing", rep.PID, old)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The slot's worker asks to be retired: its UDP flow moves to the
// replacement at once, while a TCP connection from the same client address
// to the same port number stays with the retired worker; the retired
// worker exits once that connection closes.
func TestUDPFlowFollowsRetiredWorker(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	c := startCluster(t, lab, specConfig{Workers: 2, Ports: append(tcpPorts(8080), udpPorts(8080)...), Addr: lab.ServerAddr4})
	st := c.waitReady()
	c.checkKernelRules(t) // the udp routes round-trip through the kernel
	dst := netip.AddrPortFrom(lab.ServerAddr4, 8080)
	src := lab.ClientAddrs4[1]
	old := activePID(st, 1)
	flow := dialUDP(t, lab.Client, src, dst)
	flow.check(t, 1, old)
	held, err := c.dial(src, dst)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if held.first.PID != old {
		t.Fatalf("TCP connection reached pid %d, slot 1 is pid %d", held.first.PID, old)
	}

	if err := syscall.Kill(old, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	rep, _ := flow.untilAnswered(t, old, 10*time.Second)
	st = c.waitStatus("slot 1 moved", func(st *ipStatus) bool {
		p := activePID(st, 1)
		return p != 0 && p != old
	})
	if rep.PID != activePID(st, 1) {
		t.Fatalf("flow answered by pid %d, slot 1 is now pid %d", rep.PID, activePID(st, 1))
	}
	c.checkKernelRules(t) // the slot's udp route replaced
	// Past the retired worker's UDP idle close: the TCP connection must
	// still be there, untouched by the cleanup.
	for i := 0; i < 8; i++ {
		if rep, err := held.probe(); err != nil || rep.PID != old {
			t.Fatalf("TCP connection to the retired worker after the UDP flow moved: pid %d, %v; want %d", rep.PID, err, old)
		}
		flow.check(t, 1, activePID(st, 1))
		time.Sleep(200 * time.Millisecond)
	}
	held.Close()
	waitGone(t, []int{old}, 5*time.Second)
}

// A cluster stopped and started again while a client keeps sending from one
// socket: the flow reaches the new cluster's worker. The stopping master
// deletes its workers' UDP entries (their sockets close); without that the
// flow stays pinned to a dead port.
func TestUDPFlowSurvivesClusterRestart(t *testing.T) {
	lab := netlab.NewT(t, netlab.Options{Clients: 4})
	cfg := specConfig{Workers: 2, Ports: udpPorts(5353), Addr: lab.ServerAddr4}
	c := startCluster(t, lab, cfg)
	st := c.waitReady()
	flow := dialUDP(t, lab.Client, lab.ClientAddrs4[1], netip.AddrPortFrom(lab.ServerAddr4, 5353))
	old := activePID(st, 1)
	flow.check(t, 1, old)
	if err := c.stop(); err != nil {
		t.Fatalf("master exit: %v\n%s", err, c.log())
	}
	// Between the two clusters the flow keeps sending: nothing answers.
	for i := 0; i < 5; i++ {
		if rep, err := flow.probe(50 * time.Millisecond); err == nil {
			t.Fatalf("answered by pid %d with no cluster running", rep.PID)
		}
	}
	c2 := startCluster(t, lab, cfg)
	st = c2.waitReady()
	rep, _ := flow.untilAnswered(t, old, 5*time.Second)
	if rep.PID != activePID(st, 1) {
		t.Fatalf("flow answered by pid %d, slot 1 is pid %d", rep.PID, activePID(st, 1))
	}
}
