//go:build linux

package ipcluster

import (
	"context"
	"fmt"
	"os"
	"time"
)

// newDevWorker builds the production Worker (worker.go) from development
// mode's sockets, as slot 0 of generation 0, with no master: nothing
// reads its stats or its retirement requests but runDev.
func newDevWorker(cfg *Config, s *devSockets) *Worker {
	w := newHandle(cfg, 0, 0, devVersion(cfg), "")
	w.log = cfg.Logger.With("cluster", cfg.Name, "slot", 0, "pid", os.Getpid(), "dev", true)
	// Ready at once: with Config.WorkerReady the listeners would wait
	// for the application's Ready, and no master waits for it here.
	w.Ready()
	w.handoff.workers.Store(1) // Owns: the one worker serves every client
	w.ctx, w.cancel = context.WithCancel(context.Background())
	for p, l := range s.tcp {
		w.listeners[p] = w.newListener(l)
	}
	for p, c := range s.udp {
		w.packets[p] = &packetConn{UDPConn: c}
	}
	return w
}

// devStop tells the worker to finish, as a master's "die" does, and marks
// it retired; safe to call more than once.
func (w *Worker) devStop() {
	w.retireOnce.Do(func() {
		w.retiredAt = time.Now()
		close(w.retired)
	})
	w.closeListeners()
	w.closePacketConns()
	w.cancel()
}

// devConns is the number of open connections accepted through the
// worker's listeners.
func (w *Worker) devConns() int64 { return w.conns.Load() }

// devRefused refuses development mode in a master a deploy started: the
// running cluster is in production mode, and its successor must not bind
// the public ports itself.
func devRefused(why string) error {
	if deployReport.Load() == nil {
		return nil
	}
	return fmt.Errorf("ipcluster: development mode (%s) in the new master of a deploy: the running cluster is in production mode; "+
		"turn Config.Dev and %s off in the build you deploy", why, EnvDev)
}
