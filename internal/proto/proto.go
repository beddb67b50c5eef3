// Package proto is the control protocol spoken over the master's Unix socket
// by workers and by control clients (tests today; a CLI later).
//
// The wire format is documented in docs/protocol.md; keep the two in step.
// A frame is a 4-byte big-endian length followed by that many bytes of one
// JSON object, the envelope {"type": ..., "body": {...}}. Anything that does
// not decode is an error, and the reader closes that connection: a peer can
// never make the master guess.
package proto

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
)

// Version is the protocol version this build speaks. A hello carrying any
// other version is refused with a message naming both.
//
// Version 2 added Port.Proto. A version 1 peer would ignore that field and
// read TCP 443 and UDP 443 as one port, routing one protocol's clients to
// the other's socket: an incompatible change, hence the bump.
//
// Version 3 added spares: a worker spawned for no slot says hello with
// slot -1 and waits for an assign before serving. A version 2 worker would
// refuse slot -1 in its environment, and a version 2 master a hello with it.
const Version = 3

// MaxFrame is the largest frame body accepted, in bytes. It bounds what a
// peer can make the master allocate; heartbeats are a few hundred bytes.
const MaxFrame = 256 << 10

// Message types.
const (
	TypeHello       = "hello"         // peer → master: first frame of every connection
	TypeWelcome     = "welcome"       // master → peer: hello accepted
	TypeRefuse      = "refuse"        // master → peer: hello refused; the master closes
	TypeReady       = "ready"         // worker → master: listening and able to serve
	TypeHeartbeat   = "heartbeat"     // worker → master: liveness and stats
	TypeRetire      = "retire"        // master → worker: you are retired; worker → master: please retire me
	TypeDie         = "die"           // master → worker: finish and exit
	TypeInfo        = "info"          // master → worker: send stats now; worker → master: the answer
	TypeAssign      = "assign"        // master → spare worker: serve this slot
	TypeTakeover    = "takeover"      // new master → master: hand the cluster over
	TypeHandover    = "handover"      // master → new master: here it is (with the socket and lock fds)
	TypeRestart     = "restart"       // client → master: roll every worker (as SIGUSR2)
	TypeResize      = "resize"        // client → master: change the number of slots
	TypeDeploy      = "deploy"        // client → master: deploy the binary on disk (as SIGHUP)
	TypeRetireOne   = "retire-worker" // client → master: retire one active worker
	TypeKillRetired = "kill-retired"  // client → master: kill every retired worker (as SIGUSR1)
	TypeStop        = "stop"          // client → master: stop gracefully (as SIGTERM)
	TypeStatus      = "status"        // client → master: request; master → client: the answer
	TypeError       = "error"         // master → client: a request failed
	TypeDrained     = "drained"       // worker → master: retired and drained; waits for die (Welcome.HeapSnapshots)
	TypeDrain       = "drain"         // client → master: withdraw from (or, On false, return to) the front tier; the answer

	// State handoff between a slot's old and new worker, sent only to a
	// peer that said it knows them (Hello.Handoff, Welcome.Handoff).
	TypeHandoff     = "handoff"      // worker → master: my slot's state, please; master → worker: the answer, with a socket if any
	TypeHandoffSend = "handoff-send" // master → worker: write your state to this socket (the descriptor)
	TypeHandoffDone = "handoff-done" // worker → master: how the handoff went
)

// Where a cluster's control socket is: DefaultRunDir/<Name>/SocketName
// unless Config.RunDir says otherwise. The root package's DefaultRunDir and
// ControlSocket are these; control clients (internal/ctl) use them here,
// without linking the whole library.
const (
	DefaultRunDir = "/run/ipcluster"
	SocketName    = "control.sock"
)

// SocketPath is the control socket of cluster name under runDir.
func SocketPath(runDir, name string) string {
	return filepath.Join(runDir, name, SocketName)
}

// The phases of Status.DeployPhase: the root package's DeployOutcome
// values, which are these.
const (
	PhaseStarted    = "started"
	PhaseCommitted  = "committed"
	PhaseRolledBack = "rolled-back"
	PhaseFailed     = "failed"
	PhaseHandedOver = "handed-over"
)

// Roles a peer declares in its hello.
const (
	RoleWorker = "worker"
	RoleClient = "client"
	RoleMaster = "master" // a new master taking the cluster over
)

// Errors returned by ReadFrame and Decode.
var (
	ErrFrameTooLarge = errors.New("proto: frame exceeds MaxFrame")
	ErrEmptyFrame    = errors.New("proto: empty frame")
	ErrUnknownType   = errors.New("proto: unknown message type")
)

// Hello opens every connection.
type Hello struct {
	Version int    `json:"version"`
	Role    string `json:"role"`
	Cluster string `json:"cluster"`
	// PID is informational only: the master takes the peer's pid from the
	// kernel (SO_PEERCRED) and refuses a hello whose PID disagrees.
	PID int `json:"pid"`
	// Slot is the worker's slot, or -1 for a spare not yet given one.
	Slot       int `json:"slot"`
	Generation int `json:"generation"`
	// Ports are the worker's sockets. A worker's hello comes with them
	// as descriptors (SCM_RIGHTS), one per entry, in order, so that a new
	// master holds them too; a spare not yet given a slot has none.
	Ports []Port `json:"ports,omitempty"`
	// Retired is the worker's own view: true once it was told to retire
	// (a reconnecting worker tells a new master).
	Retired bool `json:"retired,omitempty"`
	// Build identifies the code the worker runs (Config.Version, or the
	// executable's Go build ID): a new master keeps adopted workers of its
	// own build and rolls the others.
	Build string `json:"build,omitempty"`
	// OperatorSocket is the worker's private operator socket (a Unix
	// socket its master made, under RunDir/<Name>/ops), where it serves
	// /debug/pprof/ and the application's Worker.SetOperatorHandler; a
	// new master reaches an adopted worker there. Empty if it has none.
	OperatorSocket string `json:"operator_socket,omitempty"`
	// Handoff: the worker knows handoff-send (a release with state
	// handoff); a master sends it to no other.
	Handoff bool `json:"handoff,omitempty"`
}

// Takeover asks the running master to hand the cluster over to the sender.
type Takeover struct {
	Build string `json:"build"`
}

// Resize asks for a new number of slots (a power of two); the master
// answers with the same message once started, or error.
type Resize struct {
	Workers int `json:"workers"`
}

// Deploy answers a deploy request: the new master started.
type Deploy struct {
	SuccessorPID int `json:"successor_pid"`
}

// RetireOne names the worker to retire, by slot or, if PID is not 0, by
// pid; the answer names the worker retired.
type RetireOne struct {
	Slot int `json:"slot"`
	PID  int `json:"pid,omitempty"`
}

// Count answers kill-retired: how many workers were killed.
type Count struct {
	N int `json:"n"`
}

// Handover is the running master's answer to a takeover. It is sent in
// one sendmsg with descriptors as SCM_RIGHTS: the listening control
// socket, the lock file, then the sockets of Held, slot by slot and port
// by port. The sender then closes every worker connection and exits,
// leaving rules and workers alone (the workers hand their own sockets to
// the new master with their hellos).
type Handover struct {
	MasterPID  int `json:"master_pid"`
	Generation int `json:"generation"`
	// Held are the sockets the master holds for slots whose worker died
	// serving them: their clients wait in them for the slot's next worker.
	Held []HeldSockets `json:"held,omitempty"`
	// Arrays is how many descriptors follow the held sockets: the bpf
	// backend's socket arrays, one per public port, which hold the
	// groups' sockets (a socket can be in one array only).
	Arrays int `json:"arrays,omitempty"`
	// History is the master's status page history (see Status.History),
	// its oldest samples left out to keep the frame within MaxFrame/2, so
	// that the page of the new master still shows what came before the
	// deploy. Omitted by a master of an earlier release.
	History *History `json:"history,omitempty"`
	// Drained passes an operator's drain to the new master.
	Drained bool `json:"drained,omitempty"`
}

// HeldSockets are one slot's held sockets, one per entry of Ports.
type HeldSockets struct {
	Slot  int    `json:"slot"`
	Ports []Port `json:"ports"`
}

// Port maps a public port to the port a worker listens on. The same
// number may appear twice, once per protocol.
type Port struct {
	Public uint16 `json:"public"`
	// Proto is "tcp" or "udp"; required. The master refuses a hello with
	// any other value.
	Proto  string `json:"proto"`
	Worker uint16 `json:"worker"`
}

// Welcome accepts a hello.
type Welcome struct {
	Version int `json:"version"`
	// HeartbeatMillis is how often the master wants a heartbeat.
	HeartbeatMillis int `json:"heartbeat_ms"`
	// Retired tells a worker it was adopted as retired: it must not take new
	// connections and should exit once drained.
	Retired bool `json:"retired,omitempty"`
	// HeapSnapshots: the master takes heap snapshots (Config.HeapProfileDir).
	// A retired worker that has drained then sends drained and waits, for
	// a bounded time, for the master's die: the master takes its last heap
	// profile first. Added within version 3: a master of an earlier
	// release never sets it.
	HeapSnapshots bool `json:"heap_snapshots,omitempty"`
	// Handoff: the master answers handoff requests; a worker asks no
	// other. Workers is its slot count (for Worker.Owns); 0 from a master
	// of an earlier release.
	Handoff bool `json:"handoff,omitempty"`
	Workers int  `json:"workers,omitempty"`
}

// Handoff is the body of handoff and handoff-send. A worker's request has
// none. The master's answer names From, the worker whose state comes
// with it (the descriptor: one end of a socket pair), or From 0 and no
// descriptor, with Reason saying why there is none; its handoff-send to
// that worker names To, the receiver, with the other end.
type Handoff struct {
	Slot    int    `json:"slot"`               // the receiver's slot
	From    int    `json:"from_pid,omitempty"` // the worker handing over
	To      int    `json:"to_pid,omitempty"`   // the worker receiving
	Workers int    `json:"workers,omitempty"`  // the master's slot count
	Reason  string `json:"reason,omitempty"`   // why there is no state to take
}

// HandoffDone is the receiver's report once its handoff has ended: the
// bytes of state it took, the time from its request to the end, and the
// error if it failed.
type HandoffDone struct {
	Bytes      int64   `json:"bytes"`
	ElapsedSec float64 `json:"elapsed_s"`
	Err        string  `json:"err,omitempty"`
}

// Assign gives a spare its slot. Its descriptors (SCM_RIGHTS) are the
// slot's sockets, one per entry of Ports, in order.
type Assign struct {
	Slot  int    `json:"slot"`
	Ports []Port `json:"ports,omitempty"`
}

// Refuse rejects a hello; Reason is meant for a human.
type Refuse struct {
	Reason string `json:"reason"`
}

// MaxApp is the largest App a worker sends, in bytes: a heartbeat stays far
// below MaxFrame whatever the application reports.
const MaxApp = 16 << 10

// Stats is what a worker reports about itself. Fields after Retired were
// added within version 2: a worker of an earlier version 2 release leaves
// them zero.
type Stats struct {
	HeapBytes   uint64  `json:"heap_bytes"`
	Goroutines  int     `json:"goroutines"`
	Connections int64   `json:"connections"`
	Accepted    uint64  `json:"accepted"`
	UptimeSec   float64 `json:"uptime_s"`
	Retired     bool    `json:"retired,omitempty"`

	// GCCount is the number of completed GC cycles.
	GCCount uint64 `json:"gc_count"`
	// GCPauseSec is the longest stop-the-world pause of the GC cycles
	// that ended in the latest report interval that had any (the upper
	// bound of its runtime/metrics histogram bucket).
	GCPauseSec float64 `json:"gc_pause_s"`
	// LagSec is the worker's scheduling lag, exponentially smoothed: how
	// late a probe goroutine runs after it is due. LagMaxSec is the
	// largest single lag since the previous report.
	LagSec    float64 `json:"lag_s"`
	LagMaxSec float64 `json:"lag_max_s"`
	// SchedP99Sec is the 99th percentile of the time goroutines spent
	// runnable before running (/sched/latencies:seconds) over the
	// previous report interval.
	SchedP99Sec float64 `json:"sched_p99_s"`
	// App is what the application's Worker.SetStats function returned,
	// as JSON, at most MaxApp bytes; omitted if none.
	App json.RawMessage `json:"app,omitempty"`
}

// Heartbeat carries a worker's stats.
type Heartbeat struct {
	Stats Stats `json:"stats"`
}

// Reason travels with retire and die.
type Reason struct {
	Reason string `json:"reason,omitempty"`
	// Returned, on a worker's retire request: its function returned
	// while it served its slot. Soon after the worker became ready, the
	// master counts that as a failed start.
	Returned bool `json:"returned,omitempty"`
}

// Status is the master's answer to a status request.
type Status struct {
	Cluster    string `json:"cluster"`
	MasterPID  int    `json:"master_pid"`
	Generation int    `json:"generation"`
	// Ready: clients may be sent to the cluster now (every routed slot
	// has an active worker, the rules are written, the master is not
	// stopping). NotReady says why not; empty when Ready.
	Ready    bool   `json:"ready"`
	NotReady string `json:"not_ready,omitempty"`
	// Stopping: the master is stopping gracefully (its routes are
	// withdrawn; its workers finish).
	Stopping bool `json:"stopping,omitempty"`
	// Build is the code the master spawns workers from (see Hello.Build).
	Build string `json:"build,omitempty"`
	// Deploy describes a deploy in progress, or the last one's outcome;
	// DeployPhase is "started" (rolling), "committed", "rolled-back" or
	// "failed" (the new master never took over), empty before any.
	Deploy      string `json:"deploy,omitempty"`
	DeployPhase string `json:"deploy_phase,omitempty"`
	// Successor is the pid of the new master started for a deploy that
	// has not taken over yet; 0 if none.
	Successor int            `json:"successor_pid,omitempty"`
	Slots     []SlotStatus   `json:"slots"`
	Workers   []WorkerStatus `json:"workers"`
	// Rules is the rule text the master believes is installed, per family.
	Rules map[string]string `json:"rules,omitempty"`
	// Backend is the rule backend in force, "bpf", "nftables" or
	// "iptables", and BackendReason why: "Config.Backend" when it was
	// set, else the automatic choice ("auto: SK_REUSEPORT programs load
	// here", or "auto: bpf unavailable (...); nf_tables answers", or
	// "...; nf_tables unavailable: " and the kernel's error). Empty from
	// a master of an earlier release.
	Backend       string `json:"backend,omitempty"`
	BackendReason string `json:"backend_reason,omitempty"`
	// HeapSnapshots are the latest heap snapshot pairs written
	// (Config.HeapProfileDir), oldest first, at most 16.
	HeapSnapshots []HeapSnapshot `json:"heap_snapshots,omitempty"`
	// History is the master's recent samples and events, for the status
	// page. Only the HTTP snapshot (/status.json) carries it: a control
	// client's status omits it, which keeps that reply within MaxFrame.
	History *History `json:"history,omitempty"`
	// Drained: an operator drained the host (ipclusterctl drain): it is
	// not ready, and its BGP announcements are withdrawn, until undrained.
	Drained bool `json:"drained,omitempty"`
	// BGP is the master's BGP speaker (Config.BGP), nil without one.
	BGP *BGPStatus `json:"bgp,omitempty"`
	// Autoscale is the autoscale policy (Config.Autoscale), nil without
	// one.
	Autoscale *AutoscaleStatus `json:"autoscale,omitempty"`
}

// AutoscaleStatus is the policy and what it last did: its bounds and
// targets; its latest decision or refusal (Action "grow" or "shrink",
// Refused set if it did not act), when, and why; and when the cluster
// was last resized, by the policy or an operator (the cooldown runs from
// there).
type AutoscaleStatus struct {
	MinWorkers     int     `json:"min_workers"`
	MaxWorkers     int     `json:"max_workers"`
	ConnsPerWorker int     `json:"conns_per_worker,omitempty"`
	CPUPerWorker   float64 `json:"cpu_per_worker,omitempty"`
	Action         string  `json:"action,omitempty"`
	From           int     `json:"from,omitempty"`
	To             int     `json:"to,omitempty"`
	Reason         string  `json:"reason,omitempty"`
	Refused        string  `json:"refused,omitempty"`
	At             float64 `json:"at,omitempty"`
	LastResize     float64 `json:"last_resize,omitempty"`
}

// BGPStatus is the master's BGP speaker: whether it announces the
// service addresses, since when, and its sessions.
type BGPStatus struct {
	Announced bool      `json:"announced"`
	Since     float64   `json:"since"` // when Announced last changed, seconds since the Unix epoch
	Addrs     []string  `json:"addrs"`
	Peers     []BGPPeer `json:"peers"`
}

// BGPPeer is one BGP session.
type BGPPeer struct {
	Addr  string  `json:"addr"`
	ASN   uint32  `json:"asn"`
	State string  `json:"state"`           // established, connecting, opening, idle
	Since float64 `json:"since,omitempty"` // established since, seconds since the Unix epoch
}

// NotReadyDrained is Status.NotReady for a drained cluster: the master
// names a drain only when nothing else keeps it from being ready.
const NotReadyDrained = "drained by an operator (ipclusterctl undrain returns it)"

// Drain is a drain request (On) or an undrain (not On), and its answer.
type Drain struct {
	On bool `json:"on"`
}

// History is what the master kept of the last minutes: one sample per
// MonitorInterval (IntervalSec), at most 300, and at most 200 events,
// both oldest first.
type History struct {
	IntervalSec float64         `json:"interval_s"`
	Samples     []HistorySample `json:"samples"`
	Events      []HistoryEvent  `json:"events"`
}

// HistorySample is one sample: per slot (indexed by slot), the open
// connections and the new connections per second since the previous
// sample, summed over the workers serving (or draining) the slot.
type HistorySample struct {
	At        float64   `json:"at"` // seconds since the Unix epoch
	Conns     []int64   `json:"conns"`
	NewPerSec []float64 `json:"new_per_s"`
}

// HistoryEvent is one event: Kind is "crash" (an active or starting worker
// exited), "exit", "retire", "deploy", "resize", "unresponsive", "rules"
// (rewritten) or "rules-failed"; Slot is -1 when the event has none.
type HistoryEvent struct {
	At   float64 `json:"at"`
	Kind string  `json:"kind"`
	Slot int     `json:"slot"`
	PID  int     `json:"pid,omitempty"`
	Text string  `json:"text"`
}

// HeapSnapshot names the files of one worker's heap snapshots: the start
// (after its warm-up), the end (retired and drained, or about to be ended)
// and their difference; Error says what failed, if anything did.
type HeapSnapshot struct {
	PID        int    `json:"pid"`
	Slot       int    `json:"slot"`
	Generation int    `json:"generation"`
	Cause      string `json:"cause,omitempty"` // the retirement's
	Start      string `json:"start,omitempty"`
	End        string `json:"end,omitempty"`
	Diff       string `json:"diff,omitempty"`
	Error      string `json:"error,omitempty"`
}

// SlotStatus is one slot.
type SlotStatus struct {
	Slot   int `json:"slot"`
	Active int `json:"active_pid"` // 0 when the slot has no ready worker
}

// WorkerStatus is one worker process as the master sees it.
type WorkerStatus struct {
	PID        int     `json:"pid"`
	Slot       int     `json:"slot"`
	Generation int     `json:"generation"`
	State      string  `json:"state"` // starting, active, retired, stopping, spare or standby
	Ports      []Port  `json:"ports,omitempty"`
	UptimeSec  float64 `json:"uptime_s"`
	// StartTime is when the worker process started (for a worker adopted
	// from an earlier master, as /proc says), in seconds since the Unix
	// epoch; 0 from a master of an earlier release.
	StartTime float64 `json:"start_time,omitempty"`
	// RSSBytes and PSSBytes are read by the master from /proc, as of the
	// last monitor sample.
	RSSBytes uint64 `json:"rss_bytes"`
	PSSBytes uint64 `json:"pss_bytes,omitempty"`
	// HeartbeatAgeSec is how long ago the master received the worker's
	// last heartbeat (by its own clock); omitted before the first.
	HeartbeatAgeSec float64 `json:"heartbeat_age_s,omitempty"`
	// Unresponsive: no heartbeat for the master's ping timeout.
	Unresponsive bool   `json:"unresponsive,omitempty"`
	Build        string `json:"build,omitempty"`
	Stats        *Stats `json:"stats,omitempty"`
	// OperatorSocket is the worker's operator socket (see
	// Hello.OperatorSocket), for the master's /workers/ endpoints and
	// ipclusterctl pprof and metrics; empty if it has none.
	OperatorSocket string `json:"operator_socket,omitempty"`
	// HeapStart is the worker's start heap snapshot, once taken
	// (Config.HeapProfileDir).
	HeapStart string `json:"heap_start,omitempty"`
}

// Msg is one decoded frame: Type and the body for that type (a pointer to
// one of the structs above, or nil for types without a body).
type Msg struct {
	Type string
	Body any
	// FDs are the descriptors that came with the frame (SCM_RIGHTS), on
	// a Reader made by NewUnixReader. The receiver owns them: it closes
	// those it does not keep.
	FDs []int
}

type envelope struct {
	Type string          `json:"type"`
	Body json.RawMessage `json:"body,omitempty"`
}

// newBody returns a fresh body value for a message type, or nil for types
// that carry none.
func newBody(typ string) (any, error) {
	switch typ {
	case TypeHello:
		return new(Hello), nil
	case TypeWelcome:
		return new(Welcome), nil
	case TypeRefuse, TypeError:
		return new(Refuse), nil
	case TypeHeartbeat, TypeInfo, TypeReady:
		return new(Heartbeat), nil
	case TypeRetire, TypeDie:
		return new(Reason), nil
	case TypeAssign:
		return new(Assign), nil
	case TypeTakeover:
		return new(Takeover), nil
	case TypeHandover:
		return new(Handover), nil
	case TypeRestart:
		return nil, nil
	case TypeResize:
		return new(Resize), nil
	case TypeDeploy:
		return new(Deploy), nil
	case TypeRetireOne:
		return new(RetireOne), nil
	case TypeDrain:
		return new(Drain), nil
	case TypeKillRetired:
		return new(Count), nil
	case TypeStop, TypeDrained:
		return nil, nil
	case TypeStatus:
		return new(Status), nil
	case TypeHandoff, TypeHandoffSend:
		return new(Handoff), nil
	case TypeHandoffDone:
		return new(HandoffDone), nil
	}
	return nil, fmt.Errorf("%w %q", ErrUnknownType, typ)
}

// Encode returns the frame for a message: length prefix and JSON envelope.
func Encode(typ string, body any) ([]byte, error) {
	if _, err := newBody(typ); err != nil {
		return nil, err
	}
	env := envelope{Type: typ}
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("encode %s body: %w", typ, err)
		}
		env.Body = b
	}
	payload, err := json.Marshal(env)
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", typ, err)
	}
	if len(payload) > MaxFrame {
		return nil, fmt.Errorf("encode %s (%d bytes): %w", typ, len(payload), ErrFrameTooLarge)
	}
	frame := make([]byte, 4+len(payload))
	binary.BigEndian.PutUint32(frame, uint32(len(payload)))
	copy(frame[4:], payload)
	return frame, nil
}

// Decode parses one frame body (without its length prefix). Unknown types,
// unknown JSON shapes and trailing data are errors.
func Decode(payload []byte) (Msg, error) {
	if len(payload) == 0 {
		return Msg{}, ErrEmptyFrame
	}
	var env envelope
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&env); err != nil {
		return Msg{}, fmt.Errorf("proto: decode envelope: %w", err)
	}
	if dec.More() {
		return Msg{}, errors.New("proto: trailing data after message")
	}
	body, err := newBody(env.Type)
	if err != nil {
		return Msg{}, err
	}
	if len(env.Body) > 0 && !bytes.Equal(env.Body, []byte("null")) {
		// Bodies tolerate unknown fields: a newer peer of the same version
		// may add informational fields.
		if err := json.Unmarshal(env.Body, body); err != nil {
			return Msg{}, fmt.Errorf("proto: decode %s body: %w", env.Type, err)
		}
	}
	return Msg{Type: env.Type, Body: body}, nil
}

// Reader reads frames from a connection.
type Reader struct {
	r   *bufio.Reader
	buf []byte

	// With NewUnixReader (fds.go): recvmsg instead of r. in holds bytes
	// received and not yet returned, off is in[0]'s offset in the stream,
	// fdsAt the descriptors received and the frame each batch came with.
	uc       *net.UnixConn
	in       []byte
	off      int64
	fdsAt    []fdBatch
	tmp, oob []byte
}

// NewReader wraps r.
func NewReader(r io.Reader) *Reader { return &Reader{r: bufio.NewReader(r)} }

// ReadFrame returns the next frame body. The returned slice is valid until
// the next call. A length over MaxFrame is refused before anything is
// allocated for it.
func (r *Reader) ReadFrame() ([]byte, error) {
	if r.uc != nil {
		b, fds, err := r.readUnix()
		closeAll(fds)
		return b, err
	}
	var hdr [4]byte
	if _, err := io.ReadFull(r.r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n == 0 {
		return nil, ErrEmptyFrame
	}
	if n > MaxFrame {
		return nil, fmt.Errorf("%w: %d bytes", ErrFrameTooLarge, n)
	}
	if cap(r.buf) < int(n) {
		r.buf = make([]byte, n)
	}
	r.buf = r.buf[:n]
	if _, err := io.ReadFull(r.r, r.buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return r.buf, nil
}

// Read reads and decodes the next message.
func (r *Reader) Read() (Msg, error) {
	if r.uc != nil {
		b, fds, err := r.readUnix()
		if err != nil {
			return Msg{}, err
		}
		m, err := Decode(b)
		if err != nil {
			closeAll(fds)
			return Msg{}, err
		}
		m.FDs = fds
		return m, nil
	}
	b, err := r.ReadFrame()
	if err != nil {
		return Msg{}, err
	}
	return Decode(b)
}

// Write encodes a message and writes it with a single Write call, so
// concurrent writers serialised by the caller never interleave frames.
func Write(w io.Writer, typ string, body any) error {
	frame, err := Encode(typ, body)
	if err != nil {
		return err
	}
	_, err = w.Write(frame)
	return err
}
