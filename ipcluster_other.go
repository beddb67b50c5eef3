//go:build !linux

package ipcluster

// Outside Linux only development mode runs (Config.Dev, dev.go): Run
// returns ErrNotSupported otherwise. The Worker here is development
// mode's, with the fields the shared code (dev.go, serve.go) uses; its
// methods mirror worker.go's.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

// Worker is the handle a worker's function receives. Outside Linux it
// exists in development mode only (see Config.Dev).
type Worker struct {
	cfg       *Config
	log       *slog.Logger
	build     string
	listeners map[uint16]*listener
	packets   map[uint16]*net.UDPConn

	ctx    context.Context
	cancel context.CancelFunc

	retired     chan struct{}
	retireOnce  sync.Once
	retireAsked chan string

	conns    atomic.Int64
	appStats atomic.Pointer[func() any]
}

// Slot is the slot this worker serves: 0 in development mode.
func (w *Worker) Slot() int { return 0 }

// Generation is the master generation that spawned this worker: 0 in
// development mode, which has no master.
func (w *Worker) Generation() int { return 0 }

// Version is Config.Version, or "dev" if unset.
func (w *Worker) Version() string { return w.build }

// Logger is the library's logger with the worker's cluster and slot
// attached.
func (w *Worker) Logger() *slog.Logger { return w.log }

// Listener returns the listener for a public TCP port. It returns nil if
// public is listed in Config.Ports only as a UDP port (use PacketConn),
// and panics if it is not listed at all. It closes when the worker is told
// to finish.
func (w *Worker) Listener(public uint16) net.Listener {
	if l, ok := w.listeners[public]; ok {
		return l
	}
	if _, ok := w.packets[public]; ok {
		return nil
	}
	panic(fmt.Sprintf("ipcluster: Worker.Listener(%d): not one of Config.Ports", public))
}

// PacketConn returns the socket for a public UDP port. It returns nil if
// public is listed in Config.Ports only as a TCP port (use Listener), and
// panics if it is not listed at all. It closes when the worker is told to
// finish.
func (w *Worker) PacketConn(public uint16) net.PacketConn {
	if c, ok := w.packets[public]; ok {
		return c
	}
	if _, ok := w.listeners[public]; ok {
		return nil
	}
	panic(fmt.Sprintf("ipcluster: Worker.PacketConn(%d): not one of Config.Ports", public))
}

// Ports returns the public ports, in Config order.
func (w *Worker) Ports() []Port { return slices.Clone(w.cfg.Ports) }

// Context is cancelled when the worker must finish.
func (w *Worker) Context() context.Context { return w.ctx }

// Retired is closed when the worker stops: development mode never
// retires a worker otherwise.
func (w *Worker) Retired() <-chan struct{} { return w.retired }

// Connections is the number of open connections accepted through the
// worker's listeners.
func (w *Worker) Connections() int64 { return w.conns.Load() }

// RequestRetire is logged and ignored in development mode. Safe to call
// more than once.
func (w *Worker) RequestRetire(reason string) {
	select {
	case w.retireAsked <- reason:
	default:
	}
}

// Ready does nothing in development mode: the worker serves at once.
func (w *Worker) Ready() {}

// SetOperatorHandler does nothing outside Linux: in development mode
// there is no master and no operator socket to serve it on.
func (w *Worker) SetOperatorHandler(h http.Handler) {}

// SetStats registers the application's stats function; in development
// mode no master reads it.
func (w *Worker) SetStats(fn func() any) {
	if fn == nil {
		w.appStats.Store(nil)
		return
	}
	w.appStats.Store(&fn)
}

// OnHandoff does nothing in development mode: no new worker ever takes
// this one's slot.
func (w *Worker) OnHandoff(fn func(w io.Writer) error) {}

// Handoff returns an empty reader in development mode: no worker came
// before this one.
func (w *Worker) Handoff() io.Reader { return strings.NewReader("") }

// Owns reports true in development mode: the one worker serves every
// client.
func (w *Worker) Owns(addr netip.Addr) bool { return true }

// listener counts the connections it hands out, as worker.go's does.
type listener struct {
	net.Listener
	w *Worker
}

func (l *listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.w.conns.Add(1)
	if tc, ok := c.(*net.TCPConn); ok {
		return &trackedConn{TCPConn: tc, w: l.w}, nil
	}
	return c, nil
}

// trackedConn decrements the worker's count once, on the first Close.
type trackedConn struct {
	*net.TCPConn
	w    *Worker
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() { c.w.conns.Add(-1) })
	return c.TCPConn.Close()
}

func newDevWorker(cfg *Config, s *devSockets) *Worker {
	w := &Worker{
		cfg:         cfg,
		log:         cfg.Logger.With("cluster", cfg.Name, "slot", 0, "pid", os.Getpid(), "dev", true),
		build:       devVersion(cfg),
		listeners:   map[uint16]*listener{},
		packets:     s.udp,
		retired:     make(chan struct{}),
		retireAsked: make(chan string, 1),
	}
	w.ctx, w.cancel = context.WithCancel(context.Background())
	for p, l := range s.tcp {
		w.listeners[p] = &listener{Listener: l, w: w}
	}
	return w
}

func (w *Worker) devStop() {
	w.retireOnce.Do(func() { close(w.retired) })
	for _, l := range w.listeners {
		l.Close()
	}
	for _, c := range w.packets {
		c.Close()
	}
	w.cancel()
}

func (w *Worker) devConns() int64 { return w.conns.Load() }

func devRefused(string) error { return nil }

func deployReporter() func(error) { return func(error) {} }

func runWorker(context.Context, *Config, func(*Worker) error) error { return ErrNotSupported }
func runMaster(context.Context, *Config) error                      { return ErrNotSupported }

func dialMarked(context.Context, string, string) (net.Conn, error) { return nil, ErrNotSupported }
