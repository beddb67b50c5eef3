//go:build linux

package ipcluster

// BGP announcements (Config.BGP): the master is a BGP speaker (GoBGP,
// embedded: the program stays one binary) that announces the service
// addresses to its peers while the cluster is ready, so that the routers
// in front send clients to this host only while it serves them.
//
//	ready (every slot served), not drained, not stopping → announced
//	otherwise                                            → withdrawn
//
// The master's loop owns the speaker and calls it after every event
// (master.syncBGP); GoBGP runs its sessions on goroutines of its own.
//
// How each way a master ends looks to the routers:
//
//   - A graceful stop withdraws first, waits BGPConfig.WithdrawDelay for
//     the routers to stop sending new clients, then stops as without BGP
//     (local routes out, workers told to finish), and closes the sessions
//     last.
//   - A handover (a deploy, a takeover) must not withdraw: the host goes
//     on serving. Every session is negotiated with graceful restart (RFC
//     4724); the old master cuts its sessions' sockets without a word
//     (speaker.abandon), which routers take for a restart: they keep the
//     routes, marked stale, for BGPConfig.RestartTime. The new master
//     opens its sessions with the restart flag set and announces as soon
//     as it is ready; the routers then drop the stale marks. The routes
//     never leave the routers' tables.
//   - A SIGKILL of the master closes its sockets the same way: the
//     routers keep the routes for RestartTime (the workers serve on), and
//     withdraw them then unless a new master has come back.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strconv"
	"time"

	api "github.com/osrg/gobgp/v3/api"
	bgplog "github.com/osrg/gobgp/v3/pkg/log"
	"github.com/osrg/gobgp/v3/pkg/server"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// bgpCallTimeout bounds each call into GoBGP from the master's loop.
const bgpCallTimeout = 5 * time.Second

// speaker is the master's BGP speaker. Owned by the master's loop.
type speaker struct {
	cfg         BGPConfig
	log         *slog.Logger
	srv         *server.BgpServer
	on          bool               // the service routes are announced
	paths       []*api.Path        // what announce(true) added
	since       time.Time          // when on last changed
	cancelWatch context.CancelFunc // ends the session watch
	closed      bool               // stop or abandon ran
}

var (
	familyV4 = &api.Family{Afi: api.Family_AFI_IP, Safi: api.Family_SAFI_UNICAST}
	familyV6 = &api.Family{Afi: api.Family_AFI_IP6, Safi: api.Family_SAFI_UNICAST}
)

// startSpeaker starts the speaker and its sessions to every peer, with
// nothing announced. restarting sets the graceful restart flag: this
// master took the cluster over from one whose sessions the routers hold
// as restarting.
func startSpeaker(cfg BGPConfig, restarting bool, log *slog.Logger) (*speaker, error) {
	log = log.With("bgp", cfg.RouterID.String())
	srv := server.NewBgpServer(server.LoggerOption(bgpLogger{log}))
	go srv.Serve()
	s := &speaker{cfg: cfg, log: log, srv: srv, since: time.Now()}
	ctx, cancel := context.WithTimeout(context.Background(), bgpCallTimeout)
	defer cancel()
	if err := srv.StartBgp(ctx, &api.StartBgpRequest{Global: &api.Global{
		Asn:        cfg.ASN,
		RouterId:   cfg.RouterID.String(),
		ListenPort: -1, // connect only: no privilege, no port 179 here
	}}); err != nil {
		srv.Stop()
		return nil, fmt.Errorf("bgp: start the speaker: %w", err)
	}
	hold := uint64(cfg.HoldTime / time.Second)
	for _, p := range cfg.Peers {
		var families []*api.AfiSafi
		for _, f := range []*api.Family{familyV4, familyV6} {
			families = append(families, &api.AfiSafi{
				Config:            &api.AfiSafiConfig{Family: f, Enabled: true},
				MpGracefulRestart: &api.MpGracefulRestart{Config: &api.MpGracefulRestartConfig{Enabled: true}},
			})
		}
		err := srv.AddPeer(ctx, &api.AddPeerRequest{Peer: &api.Peer{
			Conf: &api.PeerConf{NeighborAddress: p.Addr.String(), PeerAsn: p.ASN},
			Timers: &api.Timers{Config: &api.TimersConfig{
				HoldTime: hold, KeepaliveInterval: max(1, hold/3),
				ConnectRetry: 1, IdleHoldTimeAfterReset: 1,
			}},
			Transport: &api.Transport{RemotePort: uint32(p.Port)},
			GracefulRestart: &api.GracefulRestart{
				Enabled:         true,
				RestartTime:     uint32(cfg.RestartTime / time.Second),
				LocalRestarting: restarting,
			},
			AfiSafis: families,
		}})
		if err != nil {
			srv.Stop()
			return nil, fmt.Errorf("bgp: add peer %s (AS %d): %w", p.Addr, p.ASN, err)
		}
	}
	wctx, wcancel := context.WithCancel(context.Background())
	s.cancelWatch = wcancel
	err := srv.WatchEvent(wctx, &api.WatchEventRequest{Peer: &api.WatchEventRequest_Peer{}}, func(r *api.WatchEventResponse) {
		if pe := r.GetPeer(); pe != nil && pe.Type == api.WatchEventResponse_PeerEvent_STATE && pe.Peer != nil && pe.Peer.State != nil {
			st := pe.Peer.State
			log.Info("BGP session "+sessionState(st.SessionState), "peer", st.NeighborAddress, "asn", st.PeerAsn)
		}
	})
	if err != nil {
		log.Warn("BGP: watch the sessions", "err", err)
	}
	log.Info("BGP speaker started", "asn", cfg.ASN, "peers", len(cfg.Peers), "addrs", cfg.Addrs, "restarting", restarting)
	return s, nil
}

func sessionState(s api.PeerState_SessionState) string {
	switch s {
	case api.PeerState_ESTABLISHED:
		return "established"
	case api.PeerState_IDLE:
		return "idle"
	case api.PeerState_CONNECT, api.PeerState_ACTIVE:
		return "connecting"
	case api.PeerState_OPENSENT, api.PeerState_OPENCONFIRM:
		return "opening"
	}
	return "unknown"
}

// path is the announcement of one service address: a host route, this
// host as its next hop (GoBGP puts the session's local address for an
// unspecified one).
func path(a netip.Addr) (*api.Path, error) {
	bits, family, nh := 32, familyV4, "0.0.0.0"
	if a.Is6() {
		bits, family, nh = 128, familyV6, "::"
	}
	nlri, err := anypb.New(&api.IPAddressPrefix{Prefix: a.String(), PrefixLen: uint32(bits)})
	if err != nil {
		return nil, err
	}
	origin, err := anypb.New(&api.OriginAttribute{Origin: 0}) // IGP
	if err != nil {
		return nil, err
	}
	var hop *anypb.Any
	if a.Is4() {
		hop, err = anypb.New(&api.NextHopAttribute{NextHop: nh})
	} else {
		hop, err = anypb.New(&api.MpReachNLRIAttribute{Family: family, NextHops: []string{nh}, Nlris: []*anypb.Any{nlri}})
	}
	if err != nil {
		return nil, err
	}
	return &api.Path{Family: family, Nlri: nlri, Pattrs: []*anypb.Any{origin, hop}}, nil
}

// announce announces (on) or withdraws every service address.
func (s *speaker) announce(on bool, why string) error {
	if on == s.on {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), bgpCallTimeout)
	defer cancel()
	var errs []error
	if on {
		for _, a := range s.cfg.Addrs {
			p, err := path(a)
			if err == nil {
				_, err = s.srv.AddPath(ctx, &api.AddPathRequest{Path: p})
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("bgp: announce %s: %w", a, err))
				continue
			}
			s.paths = append(s.paths, p)
		}
		s.log.Info("BGP: announcing", "addrs", s.cfg.Addrs, "why", why)
	} else {
		for _, p := range s.paths {
			if err := s.srv.DeletePath(ctx, &api.DeletePathRequest{Path: p}); err != nil {
				errs = append(errs, fmt.Errorf("bgp: withdraw: %w", err))
			}
		}
		s.paths = nil
		s.log.Info("BGP: withdrawn", "addrs", s.cfg.Addrs, "why", why)
	}
	s.on, s.since = on, time.Now()
	return errors.Join(errs...)
}

// stop closes the sessions (a Cease to each peer: the routers drop what
// is left) and stops the speaker: the cluster stopped.
func (s *speaker) stop() {
	if s.closed {
		return
	}
	s.closed = true
	s.cancelWatch()
	s.srv.Stop()
}

// abandon cuts the sessions as a crash would, without a NOTIFICATION, so
// that the routers keep the routes (graceful restart) for the master
// that took the cluster over, then stops the speaker, whose Cease can no
// longer reach anyone.
func (s *speaker) abandon() {
	n := shutdownPeerSockets(s.cfg.Peers)
	s.log.Info("BGP: sessions left to the new master (graceful restart)", "sockets", n)
	s.stop()
}

// shutdownPeerSockets shuts down, both ways, every TCP socket of this
// process connected to a peer's BGP port, and returns how many.
func shutdownPeerSockets(peers []BGPPeer) int {
	want := map[netip.AddrPort]bool{}
	for _, p := range peers {
		want[netip.AddrPortFrom(p.Addr, p.Port)] = true
	}
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		sa, err := unix.Getpeername(fd)
		if err != nil {
			continue
		}
		var ap netip.AddrPort
		switch sa := sa.(type) {
		case *unix.SockaddrInet4:
			ap = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
		case *unix.SockaddrInet6:
			ap = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port))
		default:
			continue
		}
		if want[ap] && unix.Shutdown(fd, unix.SHUT_RDWR) == nil {
			n++
		}
	}
	return n
}

// peers is the sessions' state, for the status.
func (s *speaker) peers() []proto.BGPPeer {
	ctx, cancel := context.WithTimeout(context.Background(), bgpCallTimeout)
	defer cancel()
	var out []proto.BGPPeer
	_ = s.srv.ListPeer(ctx, &api.ListPeerRequest{}, func(p *api.Peer) {
		if p.State == nil {
			return
		}
		bp := proto.BGPPeer{Addr: p.State.NeighborAddress, ASN: p.State.PeerAsn, State: sessionState(p.State.SessionState)}
		if p.Timers != nil && p.Timers.State != nil && p.Timers.State.Uptime != nil && bp.State == "established" {
			bp.Since = float64(p.Timers.State.Uptime.AsTime().UnixNano()) / 1e9
		}
		out = append(out, bp)
	})
	return out
}

// bgpLogger has GoBGP log through the master's logger: its errors and
// warnings as they are, its chatter at debug level.
type bgpLogger struct{ log *slog.Logger }

func (l bgpLogger) attrs(f bgplog.Fields) []any {
	out := make([]any, 0, 2*len(f))
	for k, v := range f {
		out = append(out, k, v)
	}
	return out
}
func (l bgpLogger) Panic(msg string, f bgplog.Fields) { l.log.Error("gobgp: "+msg, l.attrs(f)...) }
func (l bgpLogger) Fatal(msg string, f bgplog.Fields) { l.log.Error("gobgp: "+msg, l.attrs(f)...) }
func (l bgpLogger) Error(msg string, f bgplog.Fields) { l.log.Error("gobgp: "+msg, l.attrs(f)...) }
func (l bgpLogger) Warn(msg string, f bgplog.Fields)  { l.log.Warn("gobgp: "+msg, l.attrs(f)...) }
func (l bgpLogger) Info(msg string, f bgplog.Fields)  { l.log.Debug("gobgp: "+msg, l.attrs(f)...) }
func (l bgpLogger) Debug(msg string, f bgplog.Fields) { l.log.Debug("gobgp: "+msg, l.attrs(f)...) }
func (l bgpLogger) SetLevel(bgplog.LogLevel)          {}
func (l bgpLogger) GetLevel() bgplog.LogLevel         { return bgplog.InfoLevel }

// syncBGP announces the service addresses while the cluster is ready (not
// drained, not stopping) and withdraws them otherwise. Called by the loop
// after every event.
func (m *master) syncBGP() {
	if m.bgp == nil || m.phase == phaseHandedOver {
		return
	}
	why := m.notReady()
	if err := m.bgp.announce(why == "", cmp.Or(why, "ready")); err != nil {
		m.log.Warn("BGP", "err", err)
	}
}

// drain withdraws the host from the front tier (on) or returns it: the
// master reports not ready, and its BGP announcements follow (syncBGP).
func (m *master) drain(on bool) {
	if m.drained == on {
		return
	}
	m.drained = on
	if on {
		m.log.Info("drained: not ready, announcements withdrawn, until undrained")
	} else {
		m.log.Info("undrained: ready again once every slot is served")
	}
}

// bgpStatus is the speaker's part of the status.
func (m *master) bgpStatus() *proto.BGPStatus {
	if m.bgp == nil {
		return nil
	}
	st := &proto.BGPStatus{Announced: m.bgp.on, Since: float64(m.bgp.since.UnixNano()) / 1e9, Peers: m.bgp.peers()}
	for _, a := range m.bgp.cfg.Addrs {
		st.Addrs = append(st.Addrs, a.String())
	}
	return st
}
