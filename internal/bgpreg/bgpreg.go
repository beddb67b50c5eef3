// Package bgpreg is where the BGP speaker (package bgp, which links
// GoBGP) registers itself with the library, so that only the programs
// that announce over BGP (Config.BGP) carry GoBGP: importing package bgp
// sets Start.
package bgpreg

import (
	"log/slog"
	"net/netip"
	"time"

	"github.com/ipcluster/ipcluster/internal/proto"
)

// Config is what the speaker needs of Config.BGP, with defaults applied.
type Config struct {
	ASN         uint32
	RouterID    netip.Addr
	Peers       []Peer
	Addrs       []netip.Addr
	HoldTime    time.Duration
	RestartTime time.Duration
}

// Peer is one router.
type Peer struct {
	Addr netip.Addr
	ASN  uint32
	Port uint16
}

// Speaker is a running BGP speaker, owned by the master's loop.
type Speaker interface {
	// Announce announces (on) or withdraws every service address.
	Announce(on bool) error
	// Stop closes the sessions (a Cease to each peer) and stops.
	Stop()
	// Abandon cuts the sessions without a word, so that the routers keep
	// the routes for RestartTime (graceful restart), and stops.
	Abandon()
	// Peers is the sessions' state.
	Peers() []proto.BGPPeer
}

// Start starts a speaker with nothing announced; restarting sets the
// graceful restart flag (this master took over from one whose sessions
// the routers hold). Nil until package bgp is imported.
var Start func(cfg Config, restarting bool, log *slog.Logger) (Speaker, error)
