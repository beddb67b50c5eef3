package ipcluster

// Development mode (Config.Dev, IPCLUSTER_DEV=1): Run calls the work
// function in this process, as slot 0, on sockets bound to the public
// ports themselves. No master, no rules, no RunDir, no privilege, any OS.
//
// The lifecycle here is shared by every OS. The Worker it hands out is
// the production one on Linux, built from plain sockets (dev_linux.go), so
// Listener, PacketConn, ServeHTTP, Connections and the rest behave as in a
// worker process; elsewhere it is the small Worker of ipcluster_other.go,
// with the same ServeHTTP (serve.go).
//
//	listening ──▶ serving ──signal, ctx done──▶ stopping ──drained──▶ Run returns
//	                 │                              ▲    └─StopTimeout─▶ Run returns
//	                 └──work returns──▶ (logged) ───┘
//
// Stopping is a worker told to finish: Retired closed, listeners and UDP
// sockets closed, Context cancelled; Run returns once work has returned
// and every accepted connection is closed, or after StopTimeout.

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"reflect"
	"runtime"
	"strconv"
	"syscall"
	"time"
)

// devMode says whether Run runs in development mode, and why: EnvDev
// turns it on whatever cfg.Dev says; "0" or unset leaves it to cfg.Dev.
func devMode(cfg *Config) (on bool, why string, err error) {
	if v, ok := os.LookupEnv(EnvDev); ok && v != "" {
		b, perr := strconv.ParseBool(v)
		if perr != nil {
			return false, "", fmt.Errorf("%w: %s=%q is not a boolean; set it to 1 for development mode, or to 0 (or unset it) to leave the mode to Config.Dev",
				ErrInvalidConfig, EnvDev, v)
		}
		if b {
			return true, EnvDev + "=" + v, nil
		}
	}
	if cfg.Dev {
		return true, "Config.Dev", nil
	}
	return false, "", nil
}

// devUsed are the Config fields development mode uses; any other field
// the caller set is ignored, with a log line (devIgnored).
var devUsed = map[string]bool{
	"Name": true, "Workers": true, "Ports": true, "Addr": true, "Dev": true,
	"StopTimeout": true, "Logger": true, "Version": true,
}

// devIgnored names the fields set (non-zero in set, the Config before
// defaults) that development mode ignores. Fields added to Config later
// are ignored unless listed in devUsed.
func devIgnored(set *Config) []string {
	var out []string
	v := reflect.ValueOf(set).Elem()
	for i := range v.NumField() {
		name := v.Type().Field(i).Name
		if !devUsed[name] && !v.Field(i).IsZero() {
			out = append(out, name)
		}
	}
	return out
}

// devSockets are development mode's sockets, one per public port.
type devSockets struct {
	tcp map[uint16]net.Listener
	udp map[uint16]*net.UDPConn
}

func (s *devSockets) close() {
	for _, l := range s.tcp {
		l.Close()
	}
	for _, c := range s.udp {
		c.Close()
	}
}

// devListen binds every public port on Config.Addr (or every address), as
// the bpf backend's sockets are bound in production. On failure nothing
// stays open.
func devListen(cfg *Config) (*devSockets, error) {
	s := &devSockets{tcp: map[uint16]net.Listener{}, udp: map[uint16]*net.UDPConn{}}
	// Plain TCP, never Multipath TCP, as a worker listens (listenTCP):
	// the application sees the same connections in both modes.
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	for _, p := range cfg.Ports {
		network, addr := cfg.groupNetwork(p)
		var err error
		if p.Proto == UDP {
			var pc net.PacketConn
			if pc, err = lc.ListenPacket(context.Background(), network, addr); err == nil {
				s.udp[p.Public] = pc.(*net.UDPConn)
			}
		} else {
			var ln net.Listener
			if ln, err = lc.Listen(context.Background(), network, addr); err == nil {
				s.tcp[p.Public] = ln
			}
		}
		if err != nil {
			s.close()
			return nil, devListenError(p, addr, err)
		}
	}
	return s, nil
}

// Why a bind failed, as far as devListenError tells them apart
// (bindCause: dev_errno.go).
const (
	bindOther = iota
	bindDenied
	bindInUse
	bindNotAvailable
)

// devListenError says why public port p could not be bound at addr, and
// what to do about it.
func devListenError(p Port, addr string, err error) error {
	n := strconv.Itoa(int(p.Public))
	var fix string
	cause := bindCause(err)
	switch {
	case cause == bindDenied && p.Public < 1024:
		fix = "ports below 1024 need privilege: use a port of 1024 or more while developing (8080 for 80, 8443 for 443), " +
			"or on Linux grant the binary CAP_NET_BIND_SERVICE (sudo setcap cap_net_bind_service+ep <binary>) " +
			"or lower net.ipv4.ip_unprivileged_port_start to " + n
	case cause == bindDenied:
		fix = "the system refuses this port to this user: use another one"
	case cause == bindInUse:
		find := "ss -lntup 'sport = :" + n + "'"
		if runtime.GOOS != "linux" {
			find = "lsof -nP -i :" + n
		}
		fix = "another process listens there (find it with `" + find + "`): stop it, or use another port"
	case cause == bindNotAvailable:
		fix = "Config.Addr is not an address of this machine: use one it has (127.0.0.1 on a laptop), or leave Addr unset for every address"
	default:
		fix = "check Config.Addr and Config.Ports"
	}
	return fmt.Errorf("ipcluster: development mode: listen on public port %s at %s: %w; %s", p, addr, err, fix)
}

// runDev is Run in development mode. set is the Config as the caller
// passed it, before defaults, to name the fields it set that this mode
// ignores.
func runDev(ctx context.Context, cfg *Config, set *Config, why string, work func(*Worker) error) error {
	if IsWorker() {
		return fmt.Errorf("ipcluster: development mode (%s) in a worker process its master started: the master runs in production mode; "+
			"give master and workers the same mode (the same Config.Dev and %s)", why, EnvDev)
	}
	if err := devRefused(why); err != nil {
		return err
	}
	log := cfg.Logger.With("cluster", cfg.Name, "dev", true)
	log.Warn("development mode: the work function runs in this process, on the public ports; stickiness, deploys, health retirements and rules are off",
		"by", why, "ports", fmt.Sprint(cfg.Ports))
	if cfg.Workers > 1 {
		log.Info("development mode runs one worker, slot 0, whatever Config.Workers says: every client reaches it", "workers", cfg.Workers)
	}
	if ignored := devIgnored(set); len(ignored) > 0 {
		log.Info("development mode ignores these Config fields", "fields", fmt.Sprint(ignored))
	}
	socks, err := devListen(cfg)
	if err != nil {
		return err
	}
	listening := socks.addrs(cfg.Ports)
	w := newDevWorker(cfg, socks)
	defer w.devStop()

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)

	done := make(chan error, 1)
	go func() { done <- work(w) }()
	log.Info("development mode serving", "listen", listening)

	var (
		workErr error
		worked  bool
		retires int
	)
serving:
	for {
		select {
		case err := <-done:
			worked = true
			// In production the master would retire this worker and
			// start another: here Run ends, with the function's error.
			log.Warn("development mode: the work function returned; stopping (a master would start another worker)", "err", err)
			workErr = err
			break serving
		case reason := <-w.retireAsked:
			lvl := slog.LevelWarn
			if retires++; retires > 1 {
				lvl = slog.LevelDebug // an application may ask at every check
			}
			log.Log(context.Background(), lvl, "development mode does not retire workers: RequestRetire ignored; restart the program for a fresh process", "reason", reason)
		case sig := <-sigs:
			log.Info("development mode stopping", "signal", sig.String())
			break serving
		case <-ctx.Done():
			log.Info("development mode stopping: context done")
			break serving
		}
	}

	w.devStop()
	drain := time.NewTicker(100 * time.Millisecond)
	defer drain.Stop()
	deadline := time.NewTimer(cfg.StopTimeout)
	defer deadline.Stop()
	for !worked || w.devConns() > 0 {
		select {
		case err := <-done:
			worked = true
			if err != nil {
				log.Warn("work function returned an error as it finished", "err", err)
			}
		case <-drain.C:
		case <-sigs: // a second ^C: do not wait
			log.Warn("development mode exiting at a second signal", "connections", w.devConns())
			return workErr
		case <-deadline.C:
			log.Warn("development mode exiting with connections still open, or the work function still running", "connections", w.devConns(), "timeout", cfg.StopTimeout)
			return workErr
		}
	}
	log.Info("development mode stopped")
	return workErr
}

// addrs lists where the sockets listen, in Config.Ports order, for the
// log.
func (s *devSockets) addrs(ports []Port) string {
	var out []string
	for _, p := range ports {
		if p.Proto == UDP {
			out = append(out, s.udp[p.Public].LocalAddr().String()+"/udp")
		} else {
			out = append(out, s.tcp[p.Public].Addr().String()+"/tcp")
		}
	}
	return fmt.Sprint(out)
}

// devVersion is Worker.Version in development mode: Config.Version, or
// "dev".
func devVersion(cfg *Config) string {
	if cfg.Version != "" {
		return cfg.Version
	}
	return "dev"
}
