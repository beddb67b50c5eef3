//go:build linux

package ipcluster

// The worker side. A worker listens first (so the port exists before the
// master can route to it), says hello, reports ready, then runs the
// application's function; with Config.WorkerReady it runs the function
// first and reports ready when the function calls Worker.Ready. It keeps
// its control connection with heartbeats, and if the master goes away it
// keeps serving and reconnects to whichever master takes the socket next.
// workerLoop draws the lifecycle; its methods are the steps.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/procfs"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// Worker is the handle a worker process's function receives.
type Worker struct {
	cluster   string
	slot, gen int
	build     string // EnvBuild: the version the master spawned it as
	socket    string
	cfg       *Config
	log       *slog.Logger
	started   time.Time
	listeners map[uint16]*listener   // TCP ports
	packets   map[uint16]*packetConn // UDP ports
	arrays    []*os.File             // the bpf backend's arrays, kept for the next master (sockets.go)
	retiredAt time.Time              // set by retire, on the loop goroutine

	ctx    context.Context // cancelled when the worker must finish
	cancel context.CancelFunc

	retired     chan struct{}
	retireOnce  sync.Once
	retireAsked chan string // requests to the master, from any goroutine

	// appReady is closed by Ready (Config.WorkerReady), from any
	// goroutine; the worker loop then reports ready (onAppReady).
	appReady     chan struct{}
	appReadyOnce sync.Once

	conns    atomic.Int64
	accepted atomic.Uint64
	// listenersClosed: a retired worker exits only after its listeners
	// are closed, never with a connection still in an accept queue.
	listenersClosed atomic.Bool

	// Health reporting (worker_stats.go). rt and appWarned belong to
	// the worker loop's goroutine, which alone builds reports.
	probe     lagProbe
	rt        runtimeStats
	appStats  atomic.Pointer[func() any]
	appWarned bool

	// Operator endpoints (worker_ops.go): the application's handler,
	// from any goroutine; the socket's path, set before the hello.
	opsHandler atomic.Pointer[http.Handler]
	opsPath    string
	handoff    handoffState // OnHandoff, Handoff and Owns (handoff.go)

	mu   sync.Mutex // guards conn
	conn net.Conn
}

// Slot is the slot this worker serves: the low bits of its clients'
// addresses. A spare (Config.Spares) learns its slot before the work
// function is called, so the function always sees a valid one.
func (w *Worker) Slot() int { return w.slot }

// Generation is the master generation that spawned this worker.
func (w *Worker) Generation() int { return w.gen }

// Version is the code version the master spawned this worker as:
// Config.Version, or by default the executable's Go build ID.
func (w *Worker) Version() string { return w.build }

// Logger is the library's logger with the worker's cluster, slot, pid and
// generation attached.
func (w *Worker) Logger() *slog.Logger { return w.log }

// Listener returns the listener for a public TCP port: the socket the
// cluster's rules route that port's clients of this slot to. It returns nil
// if public is listed in Config.Ports only as a UDP port (use PacketConn),
// and panics if it is not listed at all, a programming error.
//
// The listener closes when the worker is retired (once its accept queue is
// empty) or told to finish; connections it accepted stay open.
func (w *Worker) Listener(public uint16) net.Listener {
	if l, ok := w.listeners[public]; ok {
		return l
	}
	if _, ok := w.packets[public]; ok {
		return nil
	}
	panic(fmt.Sprintf("ipcluster: Worker.Listener(%d): not one of Config.Ports", public))
}

// PacketConn returns the socket for a public UDP port: the rules route that
// port's datagrams from this slot's clients to it, and what the worker
// writes to a client goes back through the same translation, so the client
// sees the public port answer. It returns nil if public is listed in
// Config.Ports only as a TCP port (use Listener), and panics if it is not
// listed at all.
//
// A UDP socket is both listener and connection, so it outlives retirement:
// when the worker is retired the master moves the slot's flows to the new
// worker (see the README), and this socket stays open to answer the
// datagrams that still reach it. It is closed once none has arrived for a
// second and its receive queue is empty, or at once when the worker is told
// to finish (Context is cancelled). A reply written after that fails with
// net.ErrClosed. Return from the worker function when ReadFrom fails, as
// with a closed Listener.
func (w *Worker) PacketConn(public uint16) net.PacketConn {
	if c, ok := w.packets[public]; ok {
		return c
	}
	if _, ok := w.listeners[public]; ok {
		return nil
	}
	panic(fmt.Sprintf("ipcluster: Worker.PacketConn(%d): not one of Config.Ports", public))
}

// Ports returns the public ports, in Config order. A number listed for
// both protocols appears twice, once with each Proto.
func (w *Worker) Ports() []Port {
	return slices.Clone(w.cfg.Ports)
}

// Context is cancelled when the worker must finish: the cluster is
// stopping, or the worker was told to die. Shut servers down when it is.
func (w *Worker) Context() context.Context { return w.ctx }

// Retired is closed when the worker is retired: its slot points at another
// worker, its listeners close once their accept queues are empty, its
// packet conns once idle (see PacketConn), and it exits when its last
// connection closes.
func (w *Worker) Retired() <-chan struct{} { return w.retired }

// Connections is the number of open connections accepted through the
// worker's listeners.
func (w *Worker) Connections() int64 { return w.conns.Load() }

// RequestRetire asks the master to replace this worker. The master starts a
// replacement, points the slot at it once it is ready, and then retires this
// worker. Safe to call more than once.
func (w *Worker) RequestRetire(reason string) {
	select {
	case w.retireAsked <- reason:
	default: // one request in flight is enough
	}
}

// Ready tells the master that this worker can take traffic, with
// Config.WorkerReady: its slot moves to it only then. Call it from the
// work function (or a goroutine it starts) once the application is ready
// to serve: caches warm, connections to its backends open. Until then its
// listeners' Accept returns no connection (it waits): no new route points
// at the worker, but one that takes over a crashed worker's slot inherits
// that worker's sockets and the clients waiting in them. Safe to call more
// than once, and from any goroutine; without WorkerReady it does nothing,
// as the worker reported ready before the function was called.
func (w *Worker) Ready() {
	w.appReadyOnce.Do(func() { close(w.appReady) })
}

// workerEnv reads the variables the master set.
func workerEnv(cfg *Config) (slot, gen int, socket string, err error) {
	name := os.Getenv(EnvWorker)
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s; workers are started by their master: run this binary without the IPCLUSTER_* variables to start a master",
			ErrNotStartedByMaster, fmt.Sprintf(format, args...))
	}
	if name != cfg.Name {
		return 0, 0, "", bad("%s=%q but Config.Name is %q", EnvWorker, name, cfg.Name)
	}
	workers := envWorkers(cfg)
	if os.Getenv(EnvSlot) == envSlotSpare {
		slot = spareSlot
	} else if slot, err = strconv.Atoi(os.Getenv(EnvSlot)); err != nil || slot < 0 || slot >= workers {
		return 0, 0, "", bad("%s=%q is not a slot in 0..%d nor %q", EnvSlot, os.Getenv(EnvSlot), workers-1, envSlotSpare)
	}
	gen, err = strconv.Atoi(os.Getenv(EnvGeneration))
	if err != nil || gen < 1 {
		return 0, 0, "", bad("%s=%q is not a generation", EnvGeneration, os.Getenv(EnvGeneration))
	}
	socket = os.Getenv(EnvSocket)
	if socket == "" {
		return 0, 0, "", bad("%s is not set", EnvSocket)
	}
	return slot, gen, socket, nil
}

// envWorkers is the master's slot count when it spawned this worker,
// which a resize may have changed from Config.Workers.
func envWorkers(cfg *Config) int {
	if n, err := strconv.Atoi(os.Getenv(EnvWorkers)); err == nil && n > 0 && n <= MaxWorkers {
		return n
	}
	return cfg.Workers
}

// runWorker is the worker half of Run: it listens, says hello, and runs
// the worker's loop until the worker has drained (see workerLoop).
func runWorker(ctx context.Context, cfg *Config, work func(*Worker) error) error {
	w, err := newWorker(cfg)
	if err != nil {
		return err
	}
	w.ctx, w.cancel = context.WithCancel(context.Background())
	defer w.cancel()
	go w.probe.run(w.ctx)
	defer w.serveOperator()()

	// Whatever way Run returns, the UDP sockets close with it: they are
	// not closed by retirement alone.
	defer w.closePacketConns()
	if err := w.openSockets(); err != nil {
		return err
	}

	// Signals are caught before the master hears "ready": from then on a
	// SIGTERM must hand the slot over, never kill the worker outright.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	l, err := w.hello(work, sigs)
	if err != nil {
		w.closeListeners()
		return err
	}
	defer l.beat.Stop()
	defer l.drainCheck.Stop()
	return l.run(ctx)
}

// newHandle is a Worker with its identity set and nothing open: a worker
// process's (newWorker), or development mode's (socket "", no master).
func newHandle(cfg *Config, slot, gen int, build, socket string) *Worker {
	return &Worker{
		cluster:     cfg.Name,
		slot:        slot,
		gen:         gen,
		build:       build,
		socket:      socket,
		cfg:         cfg,
		started:     time.Now(),
		listeners:   map[uint16]*listener{},
		packets:     map[uint16]*packetConn{},
		retired:     make(chan struct{}),
		retireAsked: make(chan string, 1),
		appReady:    make(chan struct{}),
	}
}

// newWorker builds the worker from the variables its master set.
func newWorker(cfg *Config) (*Worker, error) {
	slot, gen, socket, err := workerEnv(cfg)
	if err != nil {
		return nil, err
	}
	w := newHandle(cfg, slot, gen, os.Getenv(EnvBuild), socket)
	w.handoff.workers.Store(int64(envWorkers(cfg)))
	w.setLogger()
	// The master execs workers through /proc/self/exe (or /proc/self/fd/N),
	// so the kernel named this process "exe": take the program's name
	// back, for ps, top and ss.
	if err := procfs.SetComm(filepath.Base(os.Args[0])); err != nil {
		w.log.Info("keeping the kernel's name for this process", "err", err)
	}
	return w, nil
}

// openSockets takes the sockets the master made for this worker
// (EnvSockets, descriptors 3 on: sockets.go), before the hello. A spare
// gets its slot's with the assign (onAssign). A worker spawned by a
// master that makes no sockets listens itself (listen).
func (w *Worker) openSockets() error {
	v, ok := os.LookupEnv(EnvSockets)
	switch {
	case ok:
		n, err := parseEnvSockets(v, w.cfg.Ports)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrNotStartedByMaster, err)
		}
		fds := make([]int, n)
		for i := range fds {
			fds[i] = int(inheritedFD(i))
		}
		return w.takeSockets(fds)
	case w.slot == spareSlot:
		return nil
	}
	return w.listen()
}

// takeSockets makes the worker's listeners and packet conns of fds, one
// per Config.Ports entry, in order, then (bpf backend) the worker's own
// socket for each; it owns fds (closing them: the Go sockets are
// duplicates). On failure nothing is kept.
func (w *Worker) takeSockets(fds []int) error {
	n := len(w.cfg.Ports)
	if len(fds) != n && len(fds) != 2*n && len(fds) != 3*n {
		proto.CloseFDs(fds)
		return fmt.Errorf("worker slot %d: %d sockets for %d public ports", w.slot, len(fds), n)
	}
	if len(fds) == 3*n {
		// The bpf backend's arrays: kept for a master started after a
		// kill -9 of this one (bpfWriter.offerArrays), never used here.
		for _, fd := range fds[2*n:] {
			w.arrays = append(w.arrays, os.NewFile(uintptr(fd), "reuseport-sockarray"))
		}
		fds = fds[:2*n]
	}
	var err error
	for i, p := range w.cfg.Ports {
		f := os.NewFile(uintptr(fds[i]), "socket "+p.String())
		var direct *os.File
		if len(fds) == 2*n {
			direct = os.NewFile(uintptr(fds[n+i]), "own socket "+p.String())
		}
		if err == nil {
			err = w.takeSocket(p, f, direct)
		}
		f.Close()
		if direct != nil {
			direct.Close()
		}
	}
	if err != nil {
		w.closeListeners()
		w.closePacketConns()
		clear(w.listeners)
		clear(w.packets)
		w.listenersClosed.Store(false)
	}
	return err
}

// takeSocket takes f, the socket the routes steer p's clients to, and
// direct, the worker's own (nil but on the bpf backend): a TCP listener
// accepts from both; a UDP socket's own one only names the worker.
func (w *Worker) takeSocket(p Port, f, direct *os.File) error {
	if direct != nil {
		if err := w.takeSocket(p, f, nil); err != nil {
			return err
		}
		if p.Proto == UDP {
			c, err := net.FilePacketConn(direct)
			if err != nil {
				return fmt.Errorf("worker slot %d: the own socket for public port %s: %w", w.slot, p, err)
			}
			w.packets[p.Public].own = c
			return nil
		}
		l, err := net.FileListener(direct)
		if err != nil {
			return fmt.Errorf("worker slot %d: the own socket for public port %s: %w", w.slot, p, err)
		}
		w.listeners[p.Public].addDirect(l)
		return nil
	}
	if p.Proto == UDP {
		c, err := net.FilePacketConn(f)
		if err != nil {
			return fmt.Errorf("worker slot %d: the socket for public port %s: %w", w.slot, p, err)
		}
		uc, ok := c.(*net.UDPConn)
		if !ok {
			c.Close()
			return fmt.Errorf("worker slot %d: the socket for public port %s is a %T, not UDP", w.slot, p, c)
		}
		w.packets[p.Public] = &packetConn{UDPConn: uc}
		return nil
	}
	l, err := net.FileListener(f)
	if err != nil {
		return fmt.Errorf("worker slot %d: the socket for public port %s: %w", w.slot, p, err)
	}
	if _, ok := l.(*net.TCPListener); !ok {
		l.Close()
		return fmt.Errorf("worker slot %d: the socket for public port %s is a %T, not TCP", w.slot, p, l)
	}
	w.listeners[p.Public] = w.newListener(l)
	return nil
}

// socketFDs returns duplicates of the worker's sockets, in Config.Ports
// order, for its hello: a new master holds them then. A retired worker,
// or one whose sockets are closed, sends none: no master needs them.
// The caller closes what it gets.
func (w *Worker) socketFDs() []int {
	if w.isRetired() || w.listenersClosed.Load() || w.packetsClosed() && len(w.packets) > 0 {
		return nil
	}
	var out, own []int
	for _, p := range w.cfg.Ports {
		var c, d syscall.Conn
		if p.Proto == UDP {
			if pc := w.packets[p.Public]; pc != nil {
				c = pc.UDPConn
				d, _ = pc.own.(syscall.Conn)
			}
		} else if l := w.listeners[p.Public]; l != nil {
			c, _ = l.Listener.(syscall.Conn)
			d, _ = l.direct.(syscall.Conn)
		}
		fd := -1
		if c != nil {
			fd = dupFD(c)
		}
		if fd < 0 {
			proto.CloseFDs(out)
			proto.CloseFDs(own)
			return nil
		}
		out = append(out, fd)
		if d != nil {
			if fd := dupFD(d); fd >= 0 {
				own = append(own, fd)
			}
		}
	}
	if len(own) != len(out) {
		proto.CloseFDs(own)
		return out
	}
	out = append(out, own...)
	if len(w.arrays) == len(out)/2 {
		for _, f := range w.arrays {
			if fd := dupFD(f); fd >= 0 {
				out = append(out, fd)
			}
		}
		if len(out) != 3*len(own) {
			proto.CloseFDs(out[2*len(own):])
			out = out[:2*len(own)]
		}
	}
	return out
}

// dupFD duplicates c's descriptor (close-on-exec), or returns -1. Not
// through File, whose Fd would put the shared socket in blocking mode.
func dupFD(c syscall.Conn) int {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1
	}
	fd := -1
	_ = rc.Control(func(u uintptr) {
		if d, err := unix.FcntlInt(u, unix.F_DUPFD_CLOEXEC, 0); err == nil {
			fd = d
		}
	})
	return fd
}

// listen opens the socket of every public port itself, before the hello,
// so the port exists before the master can route to it. On failure it
// closes the TCP listeners; the caller closes the UDP sockets.
func (w *Worker) listen() error {
	for _, p := range w.cfg.Ports {
		network, addr := w.cfg.listenNetwork(p.Proto)
		var err error
		if p.Proto == UDP {
			var pc net.PacketConn
			if pc, err = net.ListenPacket(network, addr); err == nil {
				w.packets[p.Public] = &packetConn{UDPConn: pc.(*net.UDPConn)}
			}
		} else {
			var ln net.Listener
			if ln, err = listenTCP(network, addr); err == nil {
				w.listeners[p.Public] = w.newListener(ln)
			}
		}
		if err != nil {
			w.closeListeners()
			return fmt.Errorf("worker slot %d: listen for public port %s on %s: %w", w.slot, p, addr, err)
		}
	}
	return nil
}

// workerLoop is the worker's state once its master has welcomed it. It
// belongs to runWorker's goroutine: only run and the methods it calls
// read or write it. What other goroutines share lives in Worker, behind
// atomics, channels and Worker.mu.
//
// The worker's lifecycle, as the worker sees it:
//
//	listening ──▶ hello ──▶ ready ──▶ serving ──retire──▶ retired ──drained──▶ exit
//	 (listen)   (hello)  (hello, or      │                    │ die               ▲
//	                      onAppReady)    │                    ▼                   │
//	                                     └───────die───────▶ dying ───drained─────┤
//	                                                           └────StopTimeout───┘
//
// The transitions:
//
//   - ready is sent in hello, or with Config.WorkerReady once the
//     application calls Worker.Ready (onAppReady): the work function runs
//     first, and if it returns before Ready the worker leaves with an
//     error and the master counts a failed start (onWorkDone).
//   - A spare is ready at hello and runs no application code until the
//     master assigns it a slot (onAssign); with WorkerReady it then reports
//     ready again when the application does.
//   - retire: a "retire" message, a master that welcomes the worker as
//     retired or refuses it on reconnect (onMasterMsg, onReconnect). A work
//     function that returns while serving asks the master for it, flagged
//     as returned (onWorkDone); so does RequestRetire or SIGUSR1.
//   - die: a "die" message, Run's context, or a signal (onSignal). A
//     serving worker that is signalled asks to be retired first and dies
//     once retired, or after a bounded wait for its replacement.
//   - drained (drained): the work function has returned, the listeners
//     are closed (a retired worker's once their accept queues are empty),
//     and so are every connection and the UDP sockets (a retired worker's
//     once idle, closeIdlePackets).
//
// A worker that loses its master keeps serving in whichever state it is in
// and reconnects (onLost, onReconnect); what it could not tell the master
// meanwhile (unsentRetire) it tells the next one.
type workerLoop struct {
	w    *Worker
	cfg  *Config
	work func(*Worker) error

	msgs chan proto.Msg // from the reader of the current connection
	lost chan struct{}  // the current connection failed
	sigs chan os.Signal

	// appReady is Worker.appReady while the loop waits for the
	// application's Ready, nil otherwise; reported is set once ready has
	// been sent for the slot the worker serves.
	appReady <-chan struct{}
	reported bool

	// workDone receives the work function's result; worked is set once
	// it has returned. A spare calls the application only once it has a
	// slot; until then it counts as done with it, so that it can finish
	// at once.
	workDone chan error
	worked   bool

	beat *time.Ticker
	// Connections close on application goroutines; once the worker is
	// winding down, re-check the drain condition this often. An active
	// worker never polls.
	drainCheck *time.Ticker
	draining   bool

	connected    bool
	reconnect    <-chan time.Time
	unsentRetire string           // a retirement request made while no master listened
	lostAt       time.Time        // when the master went away, while it is away
	lonely       <-chan time.Time // fires if no master comes back for noMasterWarnAfter

	// heapHold (Welcome.HeapSnapshots): once retired and drained, say
	// drained and wait for the master's die, which it sends after its
	// last heap snapshot, at most heapHoldTimeout (holdOver then).
	heapHold    bool
	drainedSent bool
	holdDone    <-chan time.Time
	holdOver    bool

	dying          bool
	dieDeadline    <-chan time.Time
	dieAfterRetire <-chan time.Time // a signalled worker waits this long for its replacement
	ctxDone        <-chan struct{}  // Run's context, until it is done
}

// hello makes the first connection to the master, reports ready unless
// the application is to say so, and starts the work function (unless the
// worker is a spare). The first connection must succeed: a worker nobody
// accepts has no business serving.
func (w *Worker) hello(work func(*Worker) error, sigs chan os.Signal) (*workerLoop, error) {
	conn, r, welcome, err := w.dial()
	if err != nil {
		return nil, err
	}
	if welcome.Retired {
		w.retire("adopted as retired")
	}
	l := &workerLoop{
		w:         w,
		cfg:       w.cfg,
		work:      work,
		msgs:      make(chan proto.Msg, 8),
		lost:      make(chan struct{}, 1),
		sigs:      sigs,
		workDone:  make(chan error, 1),
		worked:    true,
		connected: true,
		heapHold:  welcome.HeapSnapshots,
	}
	// With WorkerReady the application reports ready (appReady); a spare
	// is ready at once, as it runs no application code until given a
	// slot, and then reports ready again when the application does.
	l.reported = true
	if w.cfg.WorkerReady && w.slot != spareSlot {
		l.appReady, l.reported = w.appReady, false
	} else {
		_ = conn.SetWriteDeadline(time.Now().Add(writeTimeout))
		if err := proto.Write(conn, proto.TypeReady, &proto.Heartbeat{Stats: w.stats()}); err != nil {
			return nil, fmt.Errorf("worker slot %d: report ready: %w", w.slot, err)
		}
		w.log.Debug("worker ready")
	}
	w.setConn(conn)
	go w.read(r, conn, l.msgs, l.lost)

	if w.slot != spareSlot {
		l.startWork()
	}
	l.beat = time.NewTicker(heartbeatEvery(welcome))
	l.drainCheck = time.NewTicker(100 * time.Millisecond)
	l.drainCheck.Stop()
	return l, nil
}

// run is the worker's loop: one named step per event, until the worker
// has drained or its stop deadline passed.
func (l *workerLoop) run(ctx context.Context) error {
	w := l.w
	l.ctxDone = ctx.Done()
	for {
		l.closeIdlePackets()
		if l.drained() && !l.holdForMaster() {
			w.log.Info("worker exiting: drained")
			return nil
		}
		l.startDrainCheck()
		select {
		case <-l.appReady:
			l.onAppReady()
		case err := <-l.workDone:
			if err := l.onWorkDone(err); err != nil {
				return err
			}
		case reason := <-w.retireAsked:
			l.onRetireAsked(reason)
		case m := <-l.msgs:
			l.onMasterMsg(m)
		case <-l.lost:
			l.onLost()
		case <-l.lonely:
			l.onLonely()
		case <-l.reconnect:
			l.onReconnect()
		case <-l.beat.C:
			w.sendMsg(proto.TypeHeartbeat, &proto.Heartbeat{Stats: w.stats()})
		case sig := <-l.sigs:
			l.onSignal(sig)
		case <-l.dieAfterRetire:
			l.die("signalled; no replacement in time")
		case <-l.ctxDone:
			l.ctxDone = nil
			l.die("context done")
		case <-l.dieDeadline:
			w.log.Warn("worker exiting with connections still open", "connections", w.conns.Load(), "timeout", l.cfg.StopTimeout)
			return nil
		case <-l.holdDone:
			l.holdDone, l.holdOver = nil, true
			w.log.Warn("drained, and no word from the master; exiting", "waited", heapHoldTimeout)
		case <-l.drainCheck.C:
		}
	}
}

// holdForMaster reports whether a drained worker waits for its master's
// die instead of exiting: a retired worker of a master that takes heap
// snapshots (heap.go) tells it it has drained, once, and waits, at most
// heapHoldTimeout, while the master can still reach it.
func (l *workerLoop) holdForMaster() bool {
	if !l.heapHold || l.dying || l.holdOver || !l.connected || !l.w.isRetired() {
		return false
	}
	if !l.drainedSent {
		l.drainedSent = true
		l.holdDone = time.After(heapHoldTimeout)
		l.w.sendMsg(proto.TypeDrained, nil)
		l.w.log.Info("worker drained; waiting for the master's last heap snapshot")
	}
	return true
}

// startWork calls the work function on its own goroutine.
func (l *workerLoop) startWork() {
	l.worked = false
	go func() { l.workDone <- l.work(l.w) }()
}

// closeIdlePackets closes a retired worker's UDP sockets once no datagram
// has reached them for udpDrainIdle.
func (l *workerLoop) closeIdlePackets() {
	w := l.w
	if w.isRetired() && !l.dying && w.packetsIdle(udpDrainIdle) {
		w.log.Info("closing UDP sockets: retired, and no datagram for a while", "idle", udpDrainIdle)
		w.closePacketConns()
	}
}

// drained reports whether the worker may exit: the application is done,
// the listeners closed (a retired worker's close once their accept queues
// are empty), every connection closed and the UDP sockets too, and no
// state handoff is being written.
func (l *workerLoop) drained() bool {
	w := l.w
	// A handoff in flight (bounded by HandoffTimeout) ends first: without
	// WorkerReady the slot may have moved before the new worker asked.
	return l.worked && w.conns.Load() == 0 && (l.dying || w.isRetired()) && w.listenersClosed.Load() && w.packetsClosed() &&
		w.handoff.sending.Load() == 0
}

// startDrainCheck starts polling the drain condition once the worker is
// winding down.
func (l *workerLoop) startDrainCheck() {
	if !l.draining && (l.worked || l.dying || l.w.isRetired()) {
		l.draining = true
		l.drainCheck.Reset(100 * time.Millisecond)
	}
}

// onAppReady reports ready once the application has called Worker.Ready.
func (l *workerLoop) onAppReady() {
	l.appReady, l.reported = nil, true
	// Not connected: the next master finds no route to this
	// worker and adopts it as retired, so there is no one to tell.
	l.w.sendMsg(proto.TypeReady, &proto.Heartbeat{Stats: l.w.stats()})
	l.w.log.Debug("worker ready: the application says so")
}

// onWorkDone handles the work function's return. An error it returns ends
// the worker at once.
func (l *workerLoop) onWorkDone(err error) error {
	w := l.w
	l.worked = true
	if !l.reported && !l.dying && !w.isRetired() {
		// It never served: leave, and the master counts a
		// failed start.
		w.closeListeners()
		return fmt.Errorf("worker slot %d: the work function returned before calling Worker.Ready (Config.WorkerReady): %v", w.slot, err)
	}
	if !l.dying && !w.isRetired() {
		// The function returned while still serving its slot:
		// have the master move the slot before this worker goes.
		reason := fmt.Sprintf("worker function returned: %v", err)
		w.log.Warn("worker function returned while active; asking to be retired", "err", err)
		if l.connected {
			w.sendMsg(proto.TypeRetire, &proto.Reason{Reason: reason, Returned: true})
		} else {
			l.unsentRetire = reason
		}
	}
	return nil
}

// onRetireAsked passes Worker.RequestRetire's request on to the master,
// or keeps it for the next one.
func (l *workerLoop) onRetireAsked(reason string) {
	if !l.connected {
		l.unsentRetire = reason
		return
	}
	l.w.sendMsg(proto.TypeRetire, &proto.Reason{Reason: reason})
}

// onMasterMsg handles a message from the master.
func (l *workerLoop) onMasterMsg(m proto.Msg) {
	w := l.w
	switch m.Type {
	case proto.TypeAssign, proto.TypeHandoff, proto.TypeHandoffSend:
	default:
		proto.CloseFDs(m.FDs) // only these carry any
	}
	switch m.Type {
	case proto.TypeRetire:
		w.retire(m.Body.(*proto.Reason).Reason)
		if l.dieAfterRetire != nil {
			l.die("signalled, and replaced")
		}
	case proto.TypeDie:
		l.die(m.Body.(*proto.Reason).Reason)
	case proto.TypeAssign:
		l.onAssign(m.Body.(*proto.Assign), m.FDs)
	case proto.TypeInfo:
		w.sendMsg(proto.TypeInfo, &proto.Heartbeat{Stats: w.stats()})
	case proto.TypeHandoff:
		w.onHandoffAnswer(m)
	case proto.TypeHandoffSend:
		w.onHandoffSend(m.Body.(*proto.Handoff), m.FDs)
	}
}

// onAssign gives a spare its slot and the slot's sockets, and starts the
// application.
func (l *workerLoop) onAssign(a *proto.Assign, fds []int) {
	w := l.w
	if w.slot != spareSlot || l.dying || w.isRetired() {
		proto.CloseFDs(fds)
		return
	}
	if err := w.takeSockets(fds); err != nil {
		l.die(fmt.Sprintf("assigned slot %d: %v", a.Slot, err))
		return
	}
	w.slot = a.Slot
	w.setLogger()
	w.log.Info("spare given a slot")
	if l.cfg.WorkerReady {
		l.appReady, l.reported = w.appReady, false
	}
	l.startWork()
}

// onLost notes that the master went away and starts reconnecting.
func (l *workerLoop) onLost() {
	l.connected = false
	l.w.setConn(nil)
	// Every deploy and takeover closes the workers' connections:
	// only a master that does not come back needs a human.
	l.w.log.Info("lost the master; serving on and reconnecting")
	l.lostAt, l.lonely = time.Now(), time.After(noMasterWarnAfter)
	l.reconnect = time.After(0)
}

// onLonely warns once no master has come back for noMasterWarnAfter.
func (l *workerLoop) onLonely() {
	l.lonely = nil
	l.w.log.Warn("no master for a while; serving on the rules in the kernel and reconnecting", "since", l.lostAt, "socket", l.w.socket)
}

// onReconnect tries to say hello to the next master: retrying every
// second, draining if it refuses this worker.
func (l *workerLoop) onReconnect() {
	w := l.w
	l.reconnect = nil
	conn, r, welcome, err := w.dial()
	if err != nil {
		if errors.Is(err, proto.ErrRefused) {
			// A master that refuses us wants us gone: finish
			// what we serve, then leave. A spare (it serves
			// nobody) is refused by every deploy's new master.
			lvl := slog.LevelWarn
			if w.slot == spareSlot {
				lvl = slog.LevelInfo
			}
			w.log.Log(context.Background(), lvl, "new master refused this worker; draining", "err", err)
			w.retire("refused by master")
			return
		}
		l.reconnect = time.After(time.Second)
		return
	}
	if welcome.Retired {
		w.retire("adopted as retired")
	}
	w.setConn(conn)
	l.connected = true
	l.heapHold = welcome.HeapSnapshots
	l.drainedSent = false // a new master: tell it
	l.beat.Reset(heartbeatEvery(welcome))
	go w.read(r, conn, l.msgs, l.lost)
	w.log.Info("reconnected to master", "after", time.Since(l.lostAt).Round(time.Millisecond))
	l.lonely = nil
	if l.unsentRetire != "" {
		w.RequestRetire(l.unsentRetire)
		l.unsentRetire = ""
	}
}

// onSignal handles SIGUSR1 (ask to be retired) and the signals that
// finish the worker: those hand the slot over first when they can.
func (l *workerLoop) onSignal(sig os.Signal) {
	w := l.w
	switch {
	case sig == syscall.SIGUSR1:
		w.RequestRetire("SIGUSR1")
	case l.connected && !l.dying && !w.isRetired() && l.dieAfterRetire == nil && w.slot != spareSlot && l.reported:
		// Have the master move the slot first, so its clients
		// are never refused; finish once replaced, or after
		// a bounded wait if the master cannot replace us.
		w.log.Info("signalled to finish; asking the master for a replacement first", "signal", sig.String())
		w.RequestRetire(sig.String())
		l.dieAfterRetire = time.After(2*l.cfg.startTimeout() + time.Second)
	default:
		l.die(sig.String())
	}
}

// die finishes the worker: its listeners and UDP sockets close, its
// context is cancelled, and it exits once drained or after StopTimeout.
// Safe to call more than once.
func (l *workerLoop) die(why string) {
	w := l.w
	if l.dying {
		return
	}
	l.dying = true
	w.log.Info("worker finishing", "reason", why, "connections", w.conns.Load())
	w.closeListeners()
	w.closePacketConns()
	w.cancel()
	// The master kills us after StopTimeout; this bounds the wait if
	// there is no master any more.
	l.dieDeadline = time.After(l.cfg.StopTimeout)
}

// setLogger derives the worker's logger from its current slot.
func (w *Worker) setLogger() {
	w.log = w.cfg.Logger.With("cluster", w.cluster, "slot", w.slot, "pid", os.Getpid(), "generation", w.gen)
}

// dial connects to the master and completes the hello. The reader it
// returns must be used for the rest of the connection: it may already hold
// the master's next frames.
func (w *Worker) dial() (net.Conn, *proto.Reader, *proto.Welcome, error) {
	conn, err := net.DialTimeout("unix", w.socket, w.cfg.ConnectTimeout)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: no master answers at %s (%v); workers are started by their master: "+
			"run this binary without the IPCLUSTER_* variables to start a master", ErrNotStartedByMaster, w.socket, err)
	}
	hello := &proto.Hello{
		Version:    proto.Version,
		Role:       proto.RoleWorker,
		Cluster:    w.cluster,
		PID:        os.Getpid(),
		Slot:       w.slot,
		Generation: w.gen,
		Retired:    w.isRetired(),
		Build:      w.build,

		OperatorSocket: w.opsPath,
		Handoff:        true,
	}
	for _, p := range w.cfg.Ports {
		pp := proto.Port{Public: p.Public, Proto: p.Proto.String()}
		if c, ok := w.packets[p.Public]; ok && p.Proto == UDP {
			pp.Worker = c.port()
		} else if l, ok := w.listeners[p.Public]; ok && p.Proto == TCP {
			pp.Worker = l.port()
		} else {
			continue // a spare: no sockets yet
		}
		hello.Ports = append(hello.Ports, pp)
	}
	fds := w.socketFDs()
	uc := conn.(*net.UnixConn)
	_ = conn.SetDeadline(time.Now().Add(w.cfg.ConnectTimeout))
	err = proto.WriteFDs(uc, proto.TypeHello, hello, fds)
	proto.CloseFDs(fds)
	if err != nil {
		conn.Close()
		return nil, nil, nil, fmt.Errorf("send hello to master at %s: %w", w.socket, err)
	}
	r := proto.NewUnixReader(uc)
	m, err := r.Read()
	if err != nil {
		conn.Close()
		return nil, nil, nil, fmt.Errorf("read master's answer to hello at %s: %w", w.socket, err)
	}
	_ = conn.SetDeadline(time.Time{})
	switch b := m.Body.(type) {
	case *proto.Welcome:
		if b.Version != proto.Version {
			conn.Close()
			return nil, nil, nil, fmt.Errorf("master at %s speaks protocol version %d, this worker speaks version %d", w.socket, b.Version, proto.Version)
		}
		w.handoff.master.Store(b.Handoff)
		if b.Workers > 0 {
			w.handoff.workers.Store(int64(b.Workers))
		}
		return conn, r, b, nil
	case *proto.Refuse:
		conn.Close()
		return nil, nil, nil, fmt.Errorf("%w: %w: %s", ErrNotStartedByMaster, proto.ErrRefused, b.Reason)
	}
	conn.Close()
	return nil, nil, nil, fmt.Errorf("master answered hello with %q", m.Type)
}

// heartbeatEvery is the heartbeat period a master asked for.
func heartbeatEvery(wel *proto.Welcome) time.Duration {
	return time.Duration(max(wel.HeartbeatMillis, 10)) * time.Millisecond
}

// read forwards the master's messages until the connection fails.
func (w *Worker) read(r *proto.Reader, conn net.Conn, msgs chan<- proto.Msg, lost chan<- struct{}) {
	for {
		m, err := r.Read()
		if err != nil {
			conn.Close()
			select {
			case lost <- struct{}{}:
			default:
			}
			return
		}
		msgs <- m
	}
}

func (w *Worker) setConn(c net.Conn) {
	w.mu.Lock()
	w.conn = c
	w.mu.Unlock()
}

func (w *Worker) sendMsg(typ string, body any) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.conn == nil {
		return
	}
	_ = w.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	if err := proto.Write(w.conn, typ, body); err != nil {
		w.conn.Close() // the reader notices and reconnects
	}
}

func (w *Worker) isRetired() bool {
	select {
	case <-w.retired:
		return true
	default:
		return false
	}
}

// retire marks the worker retired and closes its listeners once their
// accept queues are empty.
func (w *Worker) retire(reason string) {
	w.retireOnce.Do(func() {
		w.log.Info("worker retired", "reason", reason, "connections", w.conns.Load())
		w.retiredAt = time.Now()
		close(w.retired)
		go w.closeWhenQueuesEmpty()
	})
}

// closeWhenQueuesEmpty closes the listeners once no accepted-but-unserved
// connection waits in their queues. The slot no longer points here, but a
// handshake that began before the rule swap may still complete: give it a
// moment, then close only when the kernel's accept queues are empty and no
// connection has arrived for a quiet period, so no client that reached us
// is reset. (A handshake completes in the kernel, but on a starved machine
// the softirq that finishes it may run late; the quiet period covers those
// stragglers, the grace the common case.)
func (w *Worker) closeWhenQueuesEmpty() {
	const (
		grace = 200 * time.Millisecond
		quiet = 100 * time.Millisecond
		limit = 5 * time.Second
	)
	time.Sleep(grace)
	deadline := time.Now().Add(limit)
	last, since := w.accepted.Load(), time.Now()
	for time.Now().Before(deadline) {
		if n := w.accepted.Load(); n != last {
			last, since = n, time.Now()
		}
		queued := 0
		for _, l := range w.listeners {
			queued += l.queued()
		}
		if queued == 0 && time.Since(since) >= quiet {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	w.closeListeners()
}

func (w *Worker) closeListeners() {
	for _, l := range w.listeners {
		l.Close()
	}
	w.listenersClosed.Store(true)
}

// listener counts the connections it hands out. With Config.WorkerReady
// it hands out none before the application's Ready (gate): a worker
// that inherits a slot's sockets inherits the clients waiting in them,
// whom a not yet ready application must not see.
type listener struct {
	net.Listener
	w      *Worker
	gate   <-chan struct{} // nil: none
	done   chan struct{}   // closed by Close
	closer sync.Once

	// direct is the worker's own socket on the bpf backend (DialWorker's
	// way to this worker), or nil. Its connections are rare (health
	// checks): a goroutine accepts them into fromDirect and wakes Accept
	// by a deadline in the past on the routed socket, so that the routed
	// socket's connections take no detour.
	direct     net.Listener
	fromDirect chan net.Conn
}

// addDirect adds the worker's own socket and starts accepting from it.
func (l *listener) addDirect(d net.Listener) {
	l.direct, l.fromDirect = d, make(chan net.Conn, 16)
	go func() {
		for {
			c, err := d.Accept()
			if err != nil {
				return
			}
			select {
			case l.fromDirect <- c:
			case <-l.done:
				c.Close()
				return
			}
			if tl, ok := l.Listener.(*net.TCPListener); ok {
				_ = tl.SetDeadline(time.Unix(1, 0)) // wake Accept
			}
		}
	}()
}

func (w *Worker) newListener(l net.Listener) *listener {
	ln := &listener{Listener: l, w: w, done: make(chan struct{})}
	if w.cfg.WorkerReady {
		ln.gate = w.appReady
	}
	return ln
}

// Close closes the listener; safe to call more than once.
func (l *listener) Close() error {
	err := net.ErrClosed
	l.closer.Do(func() {
		close(l.done)
		err = l.Listener.Close()
		if l.direct != nil {
			l.direct.Close()
			for len(l.fromDirect) > 0 { // accepted, never handed out
				(<-l.fromDirect).Close()
			}
		}
	})
	return err
}

func (l *listener) Accept() (net.Conn, error) {
	if l.gate != nil {
		select {
		case <-l.gate:
		case <-l.done:
			return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: net.ErrClosed}
		}
	}
	c, err := l.accept()
	if err != nil {
		return nil, err
	}
	l.w.conns.Add(1)
	l.w.accepted.Add(1)
	if tc, ok := c.(*net.TCPConn); ok {
		return &trackedConn{TCPConn: tc, w: l.w}, nil
	}
	return c, nil
}

// accept takes the next connection, from the routed socket or (bpf) the
// worker's own.
func (l *listener) accept() (net.Conn, error) {
	if l.direct == nil {
		return l.Listener.Accept()
	}
	tl := l.Listener.(*net.TCPListener)
	for {
		select {
		case c := <-l.fromDirect:
			return c, nil
		default:
		}
		c, err := tl.Accept()
		var ne net.Error
		if err != nil && errors.As(err, &ne) && ne.Timeout() {
			// Woken for a connection on the own socket: clear the
			// deadline first, then look, so no wake is missed.
			_ = tl.SetDeadline(time.Time{})
			continue
		}
		return c, err
	}
}

func (l *listener) port() uint16 {
	if l.direct != nil {
		return uint16(l.direct.Addr().(*net.TCPAddr).Port)
	}
	return uint16(l.Listener.Addr().(*net.TCPAddr).Port)
}

// queued returns the length of the listener's accept queue (for a
// listening socket, TCP_INFO's unacked field holds it).
func (l *listener) queued() int {
	tl, ok := l.Listener.(*net.TCPListener)
	if !ok {
		return 0
	}
	rc, err := tl.SyscallConn()
	if err != nil {
		return 0
	}
	n := 0
	_ = rc.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			n = int(info.Unacked)
		}
	})
	return n
}

// trackedConn decrements the worker's count once, on the first Close. It
// embeds *net.TCPConn so servers keep every TCP method (ReadFrom for
// sendfile, SetKeepAlive, CloseWrite).
type trackedConn struct {
	*net.TCPConn
	w    *Worker
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() { c.w.conns.Add(-1) })
	return c.TCPConn.Close()
}

// noMasterWarnAfter is how long a worker serves without a master before it
// warns: a takeover reconnects it in milliseconds, a master that crashed is
// restarted (by systemd, say) in seconds.
const noMasterWarnAfter = 10 * time.Second

// udpDrainIdle is how long a retired worker's UDP sockets must go without a
// datagram before they close. The master moves the slot's flows away when it
// retires the worker, so this normally only lets the datagrams already
// queued, and the application's replies to them, go through.
const udpDrainIdle = time.Second

// packetConn is a worker's UDP socket for one public port. It records when
// a datagram last arrived, so a retired worker can tell when no flow reaches
// it any more. It embeds *net.UDPConn for its other methods, but only
// ReadFrom counts: reads through ReadFromUDP or ReadMsgUDP are not seen, and
// then the socket closes udpDrainIdle after retirement whatever arrives.
type packetConn struct {
	*net.UDPConn
	own    net.PacketConn // bpf backend: the worker's own socket, which names it (nothing reads it)
	last   atomic.Int64   // UnixNano of the last datagram read
	once   sync.Once
	closed atomic.Bool
}

func (c *packetConn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, addr, err := c.UDPConn.ReadFrom(b)
	if err == nil {
		c.last.Store(time.Now().UnixNano())
	}
	return n, addr, err
}

// Close closes the socket; safe to call more than once.
func (c *packetConn) Close() error {
	err := net.ErrClosed
	c.once.Do(func() {
		c.closed.Store(true)
		err = c.UDPConn.Close()
		if c.own != nil {
			c.own.Close()
		}
	})
	return err
}

func (c *packetConn) port() uint16 {
	if c.own != nil {
		return uint16(c.own.LocalAddr().(*net.UDPAddr).Port)
	}
	return uint16(c.LocalAddr().(*net.UDPAddr).Port)
}

// queued reports whether a datagram waits in the socket's receive queue.
func (c *packetConn) queued() bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	n := 0
	_ = rc.Control(func(fd uintptr) {
		// SIOCINQ on a UDP socket: the size of the next datagram, 0 if
		// none (or if it is empty: such a datagram may be lost on close).
		n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
	})
	return n > 0
}

// packetsIdle reports whether the worker has open UDP sockets and none has
// received a datagram for d, counting from retirement, nor holds one
// unread.
func (w *Worker) packetsIdle(d time.Duration) bool {
	if w.packetsClosed() {
		return false
	}
	since := w.retiredAt
	for _, c := range w.packets {
		if last := time.Unix(0, c.last.Load()); last.After(since) {
			since = last
		}
	}
	if time.Since(since) < d {
		return false
	}
	for _, c := range w.packets {
		if !c.closed.Load() && c.queued() {
			return false
		}
	}
	return true
}

func (w *Worker) packetsClosed() bool {
	for _, c := range w.packets {
		if !c.closed.Load() {
			return false
		}
	}
	return true
}

func (w *Worker) closePacketConns() {
	for _, c := range w.packets {
		c.Close()
	}
}

// listenTCP listens as a worker does for a TCP public port: plain TCP,
// never Multipath TCP, which net.Listen has chosen by default on Linux
// since Go 1.24. An MPTCP connection's extra subflows come from the
// client's other addresses (its other interfaces), and routing by source
// address sends each to another slot's worker, which knows nothing of the
// connection and resets it: a worker can only ever use the first subflow,
// so MPTCP buys nothing here and costs its clients throughput: a client
// that asks for MPTCP gets 0.84 of the keep-alive rate and 0.90 of the
// short-connection rate it gets from a plain TCP listener, while plain TCP
// clients see no difference (bench/mptcp, docs/BENCHMARKS.md). Refused at
// the listener, MPTCP falls back to TCP in the handshake.
func listenTCP(network, addr string) (net.Listener, error) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	return lc.Listen(context.Background(), network, addr)
}
