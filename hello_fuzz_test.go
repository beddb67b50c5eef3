//go:build linux

package ipcluster

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// Pids of the hand-made master in FuzzHello: its two spawned workers, and
// one no process can have (above the kernel's largest pid_max), so that
// adopting it fails before anything watches or signals a real process.
const (
	fuzzActivePID   = 1000 // spawned for slot 0, active
	fuzzStartingPID = 1001 // spawned for slot 1, starting
	fuzzUnknownPID  = 1 << 30
	fuzzWorkerUID   = 54321
)

// helloMaster is a master with two slots and no processes, rules or
// socket: onHello and onMsg run on it directly, as the loop would.
func helloMaster(tb testing.TB, workerUser bool) (*master, *proc, *proc) {
	tb.Helper()
	cfg := Config{Name: "t", Workers: 2, Ports: []Port{{Public: 8080}, {Public: 8080, Proto: UDP}}}.withDefaults()
	if err := cfg.validate(); err != nil {
		tb.Fatal(err)
	}
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	m := newState(&cfg, "")
	m.emit = &emitter{fn: func(Event) {}}
	m.rules = newFakeRuleSync(&cfg, m.log, m.emit.send).ruleSync
	if workerUser {
		m.worker = &workerCred{user: "w", uid: fuzzWorkerUID}
	}
	ports := slotTarget{{Public: 8080}: 40000, {Public: 8080, Proto: UDP}: 40001}
	active, starting := fakeProc(fuzzActivePID, 0, 1), fakeProc(fuzzStartingPID, 1, 1)
	active.state, active.ports = stateActive, ports
	m.procs[active.pid], m.procs[starting.pid] = active, starting
	m.slots[0] = active
	// A replacement "already starting" for each slot: a retirement then
	// spawns nothing.
	m.pending[0], m.pending[1] = fakeProc(-1, 0, 1), fakeProc(-2, 1, 1)
	return m, active, starting
}

// fakePeer is a peer on one end of a socketpair; the test reads what the
// master sent from the other end without blocking.
type fakePeer struct {
	*peer
	fd int // the test's end
}

func newFakePeer(tb testing.TB, pid, uid int) *fakePeer {
	tb.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		tb.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "master-end")
	c, err := net.FileConn(f) // dups the descriptor
	f.Close()
	if err != nil {
		tb.Fatal(err)
	}
	fp := &fakePeer{peer: &peer{conn: c.(*net.UnixConn), pid: pid, uid: uid}, fd: fds[1]}
	tb.Cleanup(func() { fp.conn.Close(); unix.Close(fp.fd) })
	return fp
}

// received returns the types of the frames the master sent since the last
// call, and whether it closed the connection.
func (fp *fakePeer) received(tb testing.TB) (types []string, closed bool) {
	tb.Helper()
	var data []byte
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(fp.fd, buf, unix.MSG_DONTWAIT)
		if n > 0 {
			data = append(data, buf[:n]...)
			continue
		}
		closed = n == 0 && err == nil
		if err != nil && !errors.Is(err, unix.EAGAIN) {
			tb.Fatalf("read the master's frames: %v", err)
		}
		break
	}
	r := proto.NewReader(bytes.NewReader(data))
	for {
		m, err := r.Read()
		if errors.Is(err, io.EOF) {
			return types, closed
		}
		if err != nil {
			tb.Fatalf("master sent a bad frame: %v", err)
		}
		types = append(types, m.Type)
	}
}

// FuzzHello runs a fuzzed hello, then a fuzzed sequence of messages,
// through the master's checks (admit, onHello, onMsg) on a hand-made master
// with an active worker in slot 0 and a starting one in slot 1. The peer's
// kernel pid and uid are picked from a few that matter; the hello's pid
// and version are given as offsets from the honest ones, so the fuzzer
// reaches both sides of each check. Seeds: testdata/fuzz/FuzzHello.
func FuzzHello(f *testing.F) {
	f.Fuzz(func(t *testing.T, who uint8, pidOff, verOff int, role, cluster string, slot, gen int,
		ports []byte, retired bool, build string, msgs []byte) {
		m, active, starting := helloMaster(t, who&8 != 0)
		kpid := [...]int{fuzzActivePID, fuzzStartingPID, fuzzUnknownPID, fuzzActivePID}[who&3]
		uid := m.uid
		switch who >> 4 & 3 {
		case 1:
			uid = fuzzWorkerUID
		case 2:
			uid = m.uid + 1
		}
		fp := newFakePeer(t, kpid, uid)
		h := &proto.Hello{Version: proto.Version + verOff, Role: role, Cluster: cluster, PID: kpid + pidOff,
			Slot: slot, Generation: gen, Retired: retired, Build: build}
		// Five bytes a port: public, protocol (0 tcp, 1 udp, else ""), worker.
		for ; len(ports) >= 5; ports = ports[5:] {
			pp := proto.Port{Public: binary.BigEndian.Uint16(ports), Worker: binary.BigEndian.Uint16(ports[3:])}
			if ports[2] < 2 {
				pp.Proto = [...]string{"tcp", "udp"}[ports[2]]
			}
			h.Ports = append(h.Ports, pp)
		}

		// As serve does: credentials first, then the hello.
		if reason := m.admit(fp.peer); reason != "" {
			fp.refuse(reason)
		} else {
			m.onHello(fp.peer, h, nil)
		}
		got, closed := fp.received(t)
		refused := len(got) == 1 && got[0] == proto.TypeRefuse && closed
		welcomed := len(got) == 1 && got[0] == proto.TypeWelcome && !closed
		registered := m.peers[fp.peer]
		switch {
		case !refused && !welcomed && !(len(got) == 0 && h.Role == proto.RoleMaster):
			t.Fatalf("hello %+v answered with %v (closed %v)", h, got, closed)
		case refused && (registered || fp.proc != nil || fp.role != ""):
			t.Fatalf("refused hello %+v registered its peer (proc %v, role %q)", h, fp.proc, fp.role)
		case !refused && !registered:
			t.Fatalf("accepted hello %+v did not register its peer", h)
		case h.PID != kpid && !refused:
			t.Fatalf("hello claiming pid %d from kernel pid %d accepted", h.PID, kpid)
		case uid != m.uid && (m.worker == nil || uid != m.worker.uid) && !refused:
			t.Fatalf("uid %d accepted", uid)
		case uid != m.uid && h.Role != proto.RoleWorker && !refused:
			t.Fatalf("worker uid accepted as %q", h.Role)
		case h.Role == proto.RoleWorker && (h.Slot < spareSlot || h.Slot >= len(m.slots)) && !refused:
			t.Fatalf("worker hello for slot %d accepted", h.Slot)
		case h.Role != proto.RoleWorker && fp.proc != nil:
			t.Fatalf("a %q became worker %d", h.Role, fp.proc.pid)
		case fp.proc != nil && (fp.proc.pid != kpid || fp.proc.slot != h.Slot || fp.proc.peer != fp.peer):
			t.Fatalf("hello %+v from kernel pid %d took over worker %d of slot %d", h, kpid, fp.proc.pid, fp.proc.slot)
		}
		checkHelloMaster(t, m, active, starting)

		// Then the peer's messages, as serve forwards them. What a
		// client or new master may ask acts on the whole cluster
		// (status reads rules, restart and deploy spawn, takeover hands
		// the socket over): those are left out here and tested on a
		// real master.
		r := proto.NewReader(bytes.NewReader(msgs))
		for i := 0; i < 16 && m.peers[fp.peer]; i++ {
			msg, err := r.Read()
			if err != nil {
				if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
					break
				}
				continue
			}
			switch msg.Type {
			case proto.TypeHeartbeat, proto.TypeInfo:
				fp.beat.set(msg.Body.(*proto.Heartbeat).Stats)
				continue
			case proto.TypeReady:
				fp.beat.set(msg.Body.(*proto.Heartbeat).Stats)
			}
			if fp.role != proto.RoleWorker && (fp.role == proto.RoleMaster || isRequest(msg.Type)) {
				continue
			}
			m.onMsg(fp.peer, msg)
			if _, closed := fp.received(t); closed {
				m.onClosed(fp.peer, nil)
			}
			checkHelloMaster(t, m, active, starting)
			if fp.role == proto.RoleClient && fp.proc != nil {
				t.Fatal("a client became a worker")
			}
		}
	})
}

// isRequest reports whether a client's message is a request onMsg acts on.
func isRequest(typ string) bool {
	switch typ {
	case proto.TypeStatus, proto.TypeRestart, proto.TypeResize, proto.TypeDeploy,
		proto.TypeRetireOne, proto.TypeKillRetired, proto.TypeStop:
		return true
	}
	return false
}

// checkHelloMaster checks what no peer can change: the set of worker
// processes, slot 0's active worker, and that slot 1 holds nothing but the
// worker spawned for it.
func checkHelloMaster(t *testing.T, m *master, active, starting *proc) {
	t.Helper()
	if len(m.procs) != 2 || m.procs[active.pid] != active || m.procs[starting.pid] != starting {
		t.Fatalf("worker processes changed: %v", m.procs)
	}
	if m.slots[0] != active || !active.state.serving() || active.slot != 0 {
		t.Fatalf("slot 0 is %+v, want worker %d active", m.slots[0], active.pid)
	}
	if q := m.slots[1]; q != nil && q != starting {
		t.Fatalf("slot 1 given to %+v", q)
	}
	if starting.slot != 1 {
		t.Fatalf("worker spawned for slot 1 now has slot %d", starting.slot)
	}
}
