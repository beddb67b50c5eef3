//go:build linux

package ipcluster

// The master's end of the control socket: one acceptor, one reader
// goroutine per peer. Readers only decode and forward to the master's loop;
// every decision is taken there.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

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
	r := proto.NewReader(conn)
	_ = conn.SetReadDeadline(time.Now().Add(m.cfg.ConnectTimeout))
	msg, err := r.Read()
	if err != nil || msg.Type != proto.TypeHello {
		m.log.Warn("control connection sent no valid hello; closing", "peer_pid", pr.pid, "type", msg.Type, "err", err)
		pr.close()
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	m.send(evHello{peer: pr, hello: msg.Body.(*proto.Hello)})
	for {
		msg, err := r.Read()
		if err != nil {
			pr.close()
			m.send(evClosed{peer: pr, err: err})
			return
		}
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
