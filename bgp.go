//go:build linux

package ipcluster

// BGP announcements (Config.BGP): the master is a BGP speaker (package
// bgp, GoBGP embedded: the program stays one binary) that announces the
// service addresses to its peers while the cluster is ready, so that the
// routers in front send clients to this host only while it serves them.
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
//     (Speaker.Abandon), which routers take for a restart: they keep the
//     routes, marked stale, for BGPConfig.RestartTime. The new master
//     opens its sessions with the restart flag set and announces as soon
//     as it is ready; the routers then drop the stale marks. The routes
//     never leave the routers' tables.
//   - A SIGKILL of the master closes its sockets the same way: the
//     routers keep the routes for RestartTime (the workers serve on), and
//     withdraw them then unless a new master has come back.

import (
	"cmp"
	"time"

	"github.com/ipcluster/ipcluster/internal/bgpreg"
	"github.com/ipcluster/ipcluster/internal/proto"
)

// syncBGP announces the service addresses while the cluster is ready (not
// drained, not stopping) and withdraws them otherwise. Called by the loop
// after every event.
func (m *master) syncBGP() {
	if m.bgp == nil || m.phase == phaseHandedOver {
		return
	}
	why := m.notReady()
	m.announce(why == "", cmp.Or(why, "ready"))
}

// announce has the speaker announce (on) or withdraw the service
// addresses, if it does not already.
func (m *master) announce(on bool, why string) {
	if on == m.bgpOn {
		return
	}
	err := m.bgp.Announce(on)
	m.bgpOn, m.bgpSince = on, time.Now()
	what := "BGP: withdrawn"
	if on {
		what = "BGP: announcing"
	}
	m.log.Info(what, "addrs", m.cfg.BGP.Addrs, "why", why)
	if err != nil {
		m.log.Warn(what, "err", err)
	}
}

// startBGP starts the speaker of Config.BGP (package bgp registers it).
func (m *master) startBGP() error {
	if !m.cfg.BGP.Enabled() {
		return nil
	}
	b := m.cfg.BGP
	cfg := bgpreg.Config{ASN: b.ASN, RouterID: b.RouterID, Addrs: b.Addrs, HoldTime: b.HoldTime, RestartTime: b.RestartTime}
	for _, p := range b.Peers {
		cfg.Peers = append(cfg.Peers, bgpreg.Peer{Addr: p.Addr, ASN: p.ASN, Port: p.Port})
	}
	// A master that took over from a running one opens its sessions as a
	// graceful restart: the routers held the old one's routes.
	sp, err := bgpreg.Start(cfg, m.tookOver, m.log)
	if err != nil {
		return err
	}
	m.bgp, m.bgpSince = sp, time.Now()
	return nil
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
	st := &proto.BGPStatus{Announced: m.bgpOn, Since: float64(m.bgpSince.UnixNano()) / 1e9, Peers: m.bgp.Peers()}
	for _, a := range m.cfg.BGP.Addrs {
		st.Addrs = append(st.Addrs, a.String())
	}
	return st
}
