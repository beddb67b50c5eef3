//go:build unix

// Package bgp is the BGP speaker of ipcluster's Config.BGP. Import it in
// main, for its effect, in a program that announces over BGP:
//
//	import _ "github.com/ipcluster/ipcluster/bgp"
//
// It embeds GoBGP, which the program then carries (about 10 MB of binary,
// a millisecond and a megabyte of heap at each process's start, workers
// included); programs that do not announce leave it out. Without it, a
// Config with BGP peers is refused by Run, naming this import.
//
// The speaker (see the README's "Beyond one host"): the master connects
// to each peer, never listens, and negotiates graceful restart (RFC 4724)
// on every session; it announces each service address as a host route,
// with this host as the next hop, when the master asks. Handing the
// cluster over, the master cuts its sockets without a NOTIFICATION
// (Abandon), which routers take for a restart: they keep the routes for
// the restart time while the new master, started with the restart flag,
// opens its sessions and announces.
package bgp

import (
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

	"github.com/ipcluster/ipcluster/internal/bgpreg"
	"github.com/ipcluster/ipcluster/internal/proto"
)

func init() { bgpreg.Start = start }

// bgpCallTimeout bounds each call into GoBGP from the master's loop.
const bgpCallTimeout = 5 * time.Second

// speaker is the master's BGP speaker. Owned by the master's loop.
type speaker struct {
	cfg         bgpreg.Config
	log         *slog.Logger
	srv         *server.BgpServer
	paths       []*api.Path        // what Announce(true) added: announced while not empty
	cancelWatch context.CancelFunc // ends the session watch
	closed      bool               // stop or abandon ran
}

var (
	familyV4 = &api.Family{Afi: api.Family_AFI_IP, Safi: api.Family_SAFI_UNICAST}
	familyV6 = &api.Family{Afi: api.Family_AFI_IP6, Safi: api.Family_SAFI_UNICAST}
)

// start starts the speaker and its sessions to every peer, with
// nothing announced. restarting sets the graceful restart flag: this
// master took the cluster over from one whose sessions the routers hold
// as restarting.
func start(cfg bgpreg.Config, restarting bool, log *slog.Logger) (bgpreg.Speaker, error) {
	log = log.With("bgp", cfg.RouterID.String())
	srv := server.NewBgpServer(server.LoggerOption(bgpLogger{log}))
	go srv.Serve()
	s := &speaker{cfg: cfg, log: log, srv: srv}
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

// Announce announces (on) or withdraws every service address.
func (s *speaker) Announce(on bool) error {
	if on == (len(s.paths) > 0) {
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
	} else {
		for _, p := range s.paths {
			if err := s.srv.DeletePath(ctx, &api.DeletePathRequest{Path: p}); err != nil {
				errs = append(errs, fmt.Errorf("bgp: withdraw: %w", err))
			}
		}
		s.paths = nil
	}
	return errors.Join(errs...)
}

// Stop closes the sessions (a Cease to each peer: the routers drop what
// is left) and stops the speaker: the cluster stopped.
func (s *speaker) Stop() {
	if s.closed {
		return
	}
	s.closed = true
	s.cancelWatch()
	s.srv.Stop()
}

// Abandon cuts the sessions as a crash would, without a NOTIFICATION, so
// that the routers keep the routes (graceful restart) for the master
// that took the cluster over, then stops the speaker, whose Cease can no
// longer reach anyone.
func (s *speaker) Abandon() {
	n := shutdownPeerSockets(s.cfg.Peers)
	s.log.Info("BGP: sessions left to the new master (graceful restart)", "sockets", n)
	s.Stop()
}

// shutdownPeerSockets shuts down, both ways, every TCP socket of this
// process connected to a peer's BGP port, and returns how many.
func shutdownPeerSockets(peers []bgpreg.Peer) int {
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

// Peers is the sessions' state, for the status.
func (s *speaker) Peers() []proto.BGPPeer {
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
