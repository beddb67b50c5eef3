//go:build linux

package ipcluster

// The master's end of the control socket: one acceptor, one reader
// goroutine per peer. Readers only decode and forward to the master's loop;
// every decision is taken there, in the loop's half at the end of this
// file: a hello's checks and a worker's admission or adoption (onHello),
// and the dispatch of the messages that follow (onMsg).

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/procfs"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// writeTimeout bounds a write to a peer: a worker that stops reading (hung,
// or SIGSTOPped) must not stall the master. Its socket buffer holds many
// messages, so hitting this means the peer is truly stuck.
const writeTimeout = time.Second

// peer is one accepted connection.
type peer struct {
	conn     *net.UnixConn
	pid, uid int    // from SO_PEERCRED, never from the peer's own words
	role     string // set by the loop once the hello is accepted
	proc     *proc  // for workers, set by the loop

	mu     sync.Mutex // serialises writes
	closed bool

	beat heartbeat // written by the reader goroutine
}

// heartbeat is a worker's last report. Heartbeats are the one frequent
// message, so the peer's reader records them itself instead of waking the
// master's loop for each: an idle master with many workers stays idle.
type heartbeat struct {
	mu   sync.Mutex
	last beatReport
}

// beatReport is one heartbeat and when it arrived.
type beatReport struct {
	at    time.Time
	stats proto.Stats
}

func (h *heartbeat) set(st proto.Stats) {
	h.mu.Lock()
	h.last = beatReport{at: time.Now(), stats: st}
	h.mu.Unlock()
}

func (h *heartbeat) get() beatReport {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.last
}

func (pr *peer) send(typ string, body any) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	if pr.closed {
		return
	}
	_ = pr.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	if err := proto.Write(pr.conn, typ, body); err != nil {
		pr.closed = true
		pr.conn.Close()
	}
}

// sendFDs sends a message with descriptors (SCM_RIGHTS); the peer gets
// duplicates, the caller keeps its own.
func (pr *peer) sendFDs(typ string, body any, fds []int) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	if pr.closed {
		return
	}
	_ = pr.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	if err := proto.WriteFDs(pr.conn, typ, body, fds); err != nil {
		pr.closed = true
		pr.conn.Close()
	}
}

func (pr *peer) refuse(reason string) {
	pr.send(proto.TypeRefuse, &proto.Refuse{Reason: reason})
	pr.close()
}

func (pr *peer) close() {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	pr.closed = true
	pr.conn.Close()
}

// accept admits peers until the listener closes.
func (m *master) accept() {
	for {
		conn, err := m.ln.AcceptUnix()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				m.log.Error("control socket accept failed; no new workers can connect", "err", err)
			}
			return
		}
		go m.serve(conn)
	}
}

// serve checks a peer's credentials, reads its hello with a deadline, then
// forwards every frame to the loop. A malformed or oversized frame closes
// this connection and nothing else.
func (m *master) serve(conn *net.UnixConn) {
	pr := &peer{conn: conn}
	cred, err := peerCred(conn)
	if err != nil {
		m.log.Warn("control connection without credentials; closing", "err", err)
		conn.Close()
		return
	}
	pr.pid, pr.uid = int(cred.Pid), int(cred.Uid)
	if reason := m.admit(pr); reason != "" {
		m.log.Warn("refused control connection", "peer_pid", pr.pid, "peer_uid", pr.uid, "master_uid", m.uid, "reason", reason)
		pr.refuse(reason)
		return
	}
	// recvmsg, not a buffered reader: a worker's hello comes with its
	// sockets (SCM_RIGHTS).
	r := proto.NewUnixReader(conn)
	_ = conn.SetReadDeadline(time.Now().Add(m.cfg.ConnectTimeout))
	msg, err := r.Read()
	if err != nil || msg.Type != proto.TypeHello {
		proto.CloseFDs(msg.FDs)
		m.log.Warn("control connection sent no valid hello; closing", "peer_pid", pr.pid, "type", msg.Type, "err", err)
		pr.close()
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	m.send(evHello{peer: pr, hello: msg.Body.(*proto.Hello), fds: msg.FDs})
	for {
		msg, err := r.Read()
		if err != nil {
			pr.close()
			m.send(evClosed{peer: pr, err: err})
			return
		}
		proto.CloseFDs(msg.FDs) // only a hello carries any
		switch msg.Type {
		case proto.TypeHeartbeat, proto.TypeInfo:
			pr.beat.set(msg.Body.(*proto.Heartbeat).Stats)
			continue
		case proto.TypeReady:
			pr.beat.set(msg.Body.(*proto.Heartbeat).Stats)
		}
		m.send(evMsg{peer: pr, msg: msg})
	}
}

// admit decides from the kernel's credentials alone whether a peer may say
// hello, and returns why not. The master's uid may take any role; the
// worker uid (Config.WorkerUser) only that of a worker, which onHello
// enforces once the role is known. A peer of the worker uid holding a
// capability is refused: workers start with none (spawner.go), so it is not
// one of ours, or something defeated that, and it could rewrite the rules.
func (m *master) admit(pr *peer) string {
	if pr.uid == m.uid {
		return ""
	}
	if m.worker == nil || pr.uid != m.worker.uid {
		if m.worker == nil {
			return fmt.Sprintf("permission denied: uid %d is not the master's (%d)", pr.uid, m.uid)
		}
		return fmt.Sprintf("permission denied: uid %d is neither the master's (%d) nor the workers' (%d)", pr.uid, m.uid, m.worker.uid)
	}
	caps, err := workerCaps(pr.pid)
	if err != nil {
		return fmt.Sprintf("permission denied: cannot check the capabilities of worker pid %d: %v", pr.pid, err)
	}
	if caps != 0 {
		m.log.Error("a process of the worker uid holds capabilities; refusing it (file capabilities on the binary?)",
			"peer_pid", pr.pid, "peer_uid", pr.uid, "caps", fmt.Sprintf("%#x", caps))
		return fmt.Sprintf("permission denied: pid %d of worker uid %d holds capabilities %#x; workers must hold none", pr.pid, pr.uid, caps)
	}
	return ""
}

func peerCred(conn *net.UnixConn) (*unix.Ucred, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var credErr error
	err = rc.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if err != nil {
		return nil, err
	}
	return cred, credErr
}

// dialMarked dials with WorkerDialMark on the socket (see DialWorker).
func dialMarked(ctx context.Context, network, address string) (net.Conn, error) {
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		var err error
		if cerr := rc.Control(func(fd uintptr) {
			err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, WorkerDialMark)
		}); cerr != nil {
			return cerr
		}
		if err != nil {
			return fmt.Errorf("set SO_MARK %#x (needs CAP_NET_ADMIN): %w", WorkerDialMark, err)
		}
		return nil
	}}
	conn, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("dial worker at %s: %w", address, err)
	}
	return conn, nil
}

// ---- the loop's half ----

func (m *master) onHello(pr *peer, h *proto.Hello, fds []int) {
	// The worker's sockets: an adopted worker's become the master's copy
	// (adoptSockets takes them); any others are closed.
	defer func() { proto.CloseFDs(fds) }()
	refuse := func(format string, args ...any) {
		reason := fmt.Sprintf(format, args...)
		m.log.Warn("refused control connection", "peer_pid", pr.pid, "peer_uid", pr.uid, "reason", reason)
		pr.refuse(reason)
	}
	if pr.uid != m.uid && h.Role != proto.RoleWorker {
		// The worker uid (serve admits no other): operator commands
		// and takeover are the master's user's alone.
		refuse("permission denied: uid %d may only connect as a worker; role %q needs the master's uid %d", pr.uid, h.Role, m.uid)
		return
	}
	switch {
	case h.Version != proto.Version:
		refuse("protocol version mismatch: peer speaks version %d, master speaks version %d; run the same ipcluster release on both sides", h.Version, proto.Version)
		return
	case h.Cluster != m.cfg.Name:
		refuse("peer belongs to cluster %q, this master runs cluster %q", h.Cluster, m.cfg.Name)
		return
	case h.PID != pr.pid:
		refuse("hello claims pid %d but the kernel says the peer is pid %d", h.PID, pr.pid)
		return
	}
	if m.phase == phaseStopping {
		refuse("master is stopping")
		return
	}
	switch h.Role {
	case proto.RoleClient:
		pr.role = proto.RoleClient
		m.peers[pr] = true
		pr.send(proto.TypeWelcome, &proto.Welcome{Version: proto.Version})
		return
	case proto.RoleMaster:
		// A new master of this cluster: it sends takeover next and gets
		// the handover, not a welcome.
		pr.role = proto.RoleMaster
		m.peers[pr] = true
		return
	case proto.RoleWorker:
	default:
		refuse("unknown role %q", h.Role)
		return
	}
	if h.Slot < spareSlot || h.Slot >= len(m.slots) {
		refuse("slot %d is outside 0..%d (or %d for a spare)", h.Slot, len(m.slots)-1, spareSlot)
		return
	}
	ports := slotTarget{}
	for _, pp := range h.Ports {
		prot, ok := parseProtocol(pp.Proto)
		if !ok {
			refuse("worker reported public port %d with protocol %q; want \"tcp\" or \"udp\"", pp.Public, pp.Proto)
			return
		}
		ports[Port{Public: pp.Public, Proto: prot}] = pp.Worker
	}
	for _, pub := range m.rules.rt.ports {
		if ports[pub] == 0 && (h.Slot != spareSlot || len(h.Ports) > 0) {
			// A spare has no sockets until it is given a slot.
			refuse("worker reported no port for public port %s", pub)
			return
		}
	}
	if len(h.Ports) == 0 {
		ports = nil
	}
	p := m.procs[pr.pid]
	if p == nil && h.Slot == spareSlot {
		// It serves nobody: it finishes when refused. Every deploy with
		// spares does this, so no warning.
		m.log.Info("refused a spare of an earlier master; it finishes", "peer_pid", pr.pid)
		pr.refuse("spare of an earlier master; not adopted")
		return
	}
	if p == nil {
		// A worker of an earlier master (which crashed) reconnecting. Its
		// slot has been given to a fresh worker; let it drain as retired,
		// and watch its exit through a pidfd since it is not our child.
		pp, err := openPidfd(pr.pid)
		if err != nil {
			refuse("cannot watch pid %d: %v", pr.pid, err)
			return
		}
		p = newProc(pp, h.Slot, h.Generation, h.Build)
		p.ports = ports
		p.ops = m.adoptOperatorSocket(h.OperatorSocket)
		m.adoptHeapStart(p)
		if n := len(m.rules.rt.ports); m.steer != nil && len(fds) == 3*n {
			// The bpf backend's arrays, which the worker kept.
			files := make([]*os.File, n)
			for i, fd := range fds[2*n:] {
				files[i] = os.NewFile(uintptr(fd), "reuseport-sockarray")
			}
			m.steer.offerArrays(files, false)
			fds = fds[:2*n]
		}
		if len(fds) > 0 {
			socks, err := adoptSockets(m.rules.rt, ports, fds)
			fds = nil // adoptSockets took them
			if err != nil {
				pp.close()
				refuse("worker pid %d: its sockets: %v", pr.pid, err)
				return
			}
			p.socks = socks
		} else {
			m.log.Info("adopted worker came without its sockets; the master holds none of them", p.logAttrs()...)
		}
		if t, err := procfs.StartTime(p.pid); err == nil {
			p.started = t
		} else {
			m.log.Info("adopted worker's start time unknown; its uptime counts from now", append(p.logAttrs(), "err", err)...)
		}
		m.procs[p.pid] = p
		m.watch(p)
		if m.adoptsActive(h, ports) {
			m.adopted(p)
		} else {
			p.state = stateRetired
			p.retireCause, p.retireReason, p.retireAt = CauseAdopted, "adopted from an earlier master", time.Now()
			// Until this master has written its rules, the earlier
			// master's rules may still route clients to this worker:
			// it is told it is retired only once they no longer do.
			p.retirePending = !m.rules.installed
			m.rules.noteAdoptedUDP(ports)
			m.log.Info("adopted worker of an earlier master as retired", p.logAttrs()...)
		}
	} else if h.Slot != p.slot || h.Generation != p.gen {
		refuse("worker pid %d claims slot %d generation %d, but was spawned for slot %d generation %d", pr.pid, h.Slot, h.Generation, p.slot, p.gen)
		return
	} else if p.socks != nil && !maps.Equal(ports, p.socks.ports) {
		refuse("worker pid %d reported ports %s, but its sockets are bound to %s",
			pr.pid, portsString(ports, m.rules.rt.ports), portsString(p.socks.ports, m.rules.rt.ports))
		return
	} else if p.process.spawned() {
		// Spawned by this master, from the spawner thread: it holds no
		// capability, or that thread failed at its one job.
		caps, err := workerCaps(pr.pid)
		if err != nil {
			refuse("cannot check the capabilities of worker pid %d: %v", pr.pid, err)
			return
		}
		if caps != 0 {
			m.log.Error("a worker holds capabilities; refusing it", append(p.logAttrs(), "caps", fmt.Sprintf("%#x", caps))...)
			refuse("worker pid %d holds capabilities %#x; workers must hold none", pr.pid, caps)
			return
		}
	}
	if p.peer != nil {
		// The same process (the kernel vouches for the pid) reconnected
		// before its old connection's close reached us: the new one wins.
		p.peer.close()
	}
	p.peer = pr
	p.ports = ports
	p.handoffOK = h.Handoff
	pr.role = proto.RoleWorker
	pr.proc = p
	m.peers[pr] = true
	pr.send(proto.TypeWelcome, &proto.Welcome{
		Version:         proto.Version,
		HeartbeatMillis: int(m.cfg.HeartbeatInterval / time.Millisecond),
		Retired:         p.state == stateRetired && !p.retirePending,
		HeapSnapshots:   m.heaps != nil,
		Handoff:         true,
		Workers:         len(m.slots),
	})
}

func (m *master) onMsg(pr *peer, msg proto.Msg) {
	if pr.role == proto.RoleMaster {
		if msg.Type == proto.TypeTakeover {
			m.handOver(pr, msg.Body.(*proto.Takeover).Build)
		}
		return
	}
	if pr.role == proto.RoleClient {
		switch msg.Type {
		case proto.TypeStatus:
			pr.send(proto.TypeStatus, m.status())
		case proto.TypeRestart:
			m.restartAll("restart requested over the control socket")
			pr.send(proto.TypeRestart, nil)
		case proto.TypeResize:
			if err := m.startResize(msg.Body.(*proto.Resize).Workers); err != nil {
				pr.send(proto.TypeError, &proto.Refuse{Reason: "resize: " + err.Error()})
			} else {
				pr.send(proto.TypeResize, msg.Body)
			}
		case proto.TypeDeploy:
			if m.successor != nil || m.phase == phaseStopping {
				pr.send(proto.TypeError, &proto.Refuse{Reason: "deploy: one is already under way, or the master is stopping"})
				break
			}
			m.startSuccessor()
			if m.successor == nil {
				pr.send(proto.TypeError, &proto.Refuse{Reason: "deploy: " + m.lastDeploy})
			} else {
				pr.send(proto.TypeDeploy, &proto.Deploy{SuccessorPID: m.successor.Process.Pid})
			}
		case proto.TypeRetireOne:
			req := msg.Body.(*proto.RetireOne)
			p := m.activeWorker(req.Slot, req.PID)
			if p == nil {
				pr.send(proto.TypeError, &proto.Refuse{Reason: fmt.Sprintf("retire: no active worker in slot %d or with pid %d", req.Slot, req.PID)})
				break
			}
			m.retire(p, CauseRequested, "operator request over the control socket")
			pr.send(proto.TypeRetireOne, &proto.RetireOne{Slot: p.slot, PID: p.pid})
		case proto.TypeDrain:
			req := msg.Body.(*proto.Drain)
			m.drain(req.On)
			pr.send(proto.TypeDrain, req)
		case proto.TypeKillRetired:
			pr.send(proto.TypeKillRetired, &proto.Count{N: m.killRetired()})
		case proto.TypeStop:
			pr.send(proto.TypeStop, nil)
			m.stop("stop requested over the control socket")
		default:
			pr.send(proto.TypeError, &proto.Refuse{Reason: fmt.Sprintf("unknown request %q", msg.Type)})
		}
		return
	}
	p := pr.proc
	if p == nil || m.procs[p.pid] != p {
		return
	}
	switch msg.Type {
	case proto.TypeReady:
		if p.state == stateStarting {
			m.onReady(p)
		}
	case proto.TypeRetire:
		r := msg.Body.(*proto.Reason)
		m.log.Info("worker asks to be retired", append(p.logAttrs(), "reason", r.Reason)...)
		if r.Returned && p.state == stateActive && m.slots[p.slot] == p {
			// A function that returns soon after the worker became ready
			// is a failed start, like a crash: its replacement, which
			// may well do the same, waits out the backoff.
			m.countStart(p, p.slot)
		}
		m.retire(p, CauseRequested, "requested: "+r.Reason)
	case proto.TypeDrained:
		m.onDrained(p)
	case proto.TypeHandoff:
		m.onHandoffAsk(p)
	case proto.TypeHandoffDone:
		m.onHandoffDone(p, msg.Body.(*proto.HandoffDone))
	default:
		m.log.Warn("unexpected message from worker; closing its connection", append(p.logAttrs(), "type", msg.Type)...)
		pr.close()
	}
}
