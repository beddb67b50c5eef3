//go:build !linux

package ipcluster

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
)

// Worker is the handle a worker process's function receives. On platforms
// other than Linux no worker ever runs: Run returns ErrNotSupported. The
// methods exist so programs build on a laptop.
type Worker struct{}

func (w *Worker) Slot() int                               { return 0 }
func (w *Worker) Generation() int                         { return 0 }
func (w *Worker) Version() string                         { return "" }
func (w *Worker) Logger() *slog.Logger                    { return slog.Default() }
func (w *Worker) Listener(public uint16) net.Listener     { return nil }
func (w *Worker) PacketConn(public uint16) net.PacketConn { return nil }
func (w *Worker) Ports() []Port                           { return nil }
func (w *Worker) Context() context.Context                { return context.Background() }
func (w *Worker) Retired() <-chan struct{}                { return nil }
func (w *Worker) Connections() int64                      { return 0 }
func (w *Worker) RequestRetire(reason string)             {}
func (w *Worker) Ready()                                  {}
func (w *Worker) SetStats(fn func() any)                  {}
func (w *Worker) ServeHTTP(*http.Server, ...uint16) error { return ErrNotSupported }
func (w *Worker) OnHandoff(fn func(w io.Writer) error)    {}
func (w *Worker) Handoff() io.Reader                      { return strings.NewReader("") }
func (w *Worker) Owns(addr netip.Addr) bool               { return false }

func deployReporter() func(error) { return func(error) {} }

func runWorker(context.Context, *Config, func(*Worker) error) error { return ErrNotSupported }
func runMaster(context.Context, *Config) error                      { return ErrNotSupported }

func dialMarked(context.Context, string, string) (net.Conn, error) { return nil, ErrNotSupported }
