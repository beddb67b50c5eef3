package ipcluster

// Config.BGP: the host announces its service addresses to routers over
// BGP while it serves (bgp.go). Its defaults and checks are here, with
// the rest of Config's.

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/ipcluster/ipcluster/internal/bgpreg"
)

// BGPConfig makes the master a BGP speaker that announces the service
// addresses (a /32 or /128 each) to its peers, routers that spread
// clients over hosts by their source address (ECMP), while the cluster is
// ready (every slot served, not drained, not stopping). The zero value
// (no Peers) is off. See "Beyond one host" in the README.
//
// The master connects to its peers (it never listens, so it needs no
// privilege for port 179); each peer must accept the session from the
// host's address: a neighbor for it, passive, or a listen range.
type BGPConfig struct {
	// ASN is this host's autonomous system number. Required with Peers.
	ASN uint32
	// RouterID is the BGP identifier, an IPv4 address unique among the
	// peers' neighbors; usually the host's address toward them. Required
	// with Peers.
	RouterID netip.Addr
	// Peers are the routers to announce to. None: BGP is off.
	Peers []BGPPeer
	// Addrs are the service addresses to announce, each on a local
	// interface (lo, say) so that the host accepts their traffic.
	// Default: Config.Addr, which must then be a single address.
	Addrs []netip.Addr
	// HoldTime is the session's hold time: how long a router keeps the
	// routes of a host that went silent (a power cut) before it withdraws
	// them. Keepalives go every third of it. Default 9s; at least 3s.
	HoldTime time.Duration
	// RestartTime is the graceful restart time this host advertises: how
	// long a router keeps its routes after its session closed without a
	// word (a new master taking over in a deploy, or a master killed by
	// SIGKILL whose workers serve on), waiting for the session to come
	// back. Default 15s; 0 below 1s is refused (use the default).
	RestartTime time.Duration
	// WithdrawDelay is how long a graceful stop waits between withdrawing
	// the routes and taking the local routes out, so that routers have
	// stopped sending new clients to this host before its workers stop
	// taking them. Default 3s.
	WithdrawDelay time.Duration
}

// BGPPeer is one router the master announces to.
type BGPPeer struct {
	Addr netip.Addr // the router's address
	ASN  uint32     // its AS number
	Port uint16     // its BGP port; default 179
}

// Enabled reports whether BGP is configured.
func (b *BGPConfig) Enabled() bool { return len(b.Peers) > 0 }

const (
	defaultBGPHoldTime      = 9 * time.Second
	defaultBGPRestartTime   = 15 * time.Second
	defaultBGPWithdrawDelay = 3 * time.Second
	defaultBGPPort          = 179
)

func (b BGPConfig) withDefaults(addr netip.Addr) BGPConfig {
	if !b.Enabled() {
		return b
	}
	setDefault(&b.HoldTime, defaultBGPHoldTime)
	setDefault(&b.RestartTime, defaultBGPRestartTime)
	setDefault(&b.WithdrawDelay, defaultBGPWithdrawDelay)
	if len(b.Addrs) == 0 && addr.IsValid() && !addr.IsUnspecified() {
		b.Addrs = []netip.Addr{addr}
	}
	peers := make([]BGPPeer, len(b.Peers))
	for i, p := range b.Peers {
		setDefault(&p.Port, defaultBGPPort)
		peers[i] = p
	}
	b.Peers = peers
	return b
}

// validate reports the problems of a BGPConfig with defaults applied.
func (b *BGPConfig) validate(bad func(field, problem, fix string)) {
	if !b.Enabled() {
		if b.ASN != 0 || b.RouterID.IsValid() || len(b.Addrs) > 0 {
			bad("BGP.Peers", "empty while other BGP fields are set", "add the routers to announce to, or leave Config.BGP zero to turn BGP off")
		}
		return
	}
	if bgpreg.Start == nil {
		bad("BGP", "set, but this program has no BGP speaker", `import _ "github.com/ipcluster/ipcluster/bgp" in main (it links GoBGP, which programs without BGP leave out; Unix only)`)
	}
	if b.ASN == 0 {
		bad("BGP.ASN", "0", "set this host's AS number (a private one is from 64512 to 65534, or 4200000000 to 4294967294)")
	}
	if !b.RouterID.Is4() || b.RouterID.IsUnspecified() {
		bad("BGP.RouterID", fmt.Sprintf("%v is not an IPv4 address", b.RouterID), "set a unique IPv4 identifier, usually the host's address toward its peers")
	}
	if len(b.Addrs) == 0 {
		bad("BGP.Addrs", "empty, and Config.Addr is not one address", "list the service addresses to announce, or set Config.Addr")
	}
	for i, a := range b.Addrs {
		if !a.IsValid() || a.IsUnspecified() || a.IsMulticast() || a.Is4In6() || a.Zone() != "" || a.IsLinkLocalUnicast() {
			bad(fmt.Sprintf("BGP.Addrs[%d]", i), fmt.Sprintf("%v is not a unicast service address", a), "announce addresses clients connect to, each on a local interface")
		}
	}
	seen := map[netip.Addr]bool{}
	for i, p := range b.Peers {
		field := fmt.Sprintf("BGP.Peers[%d]", i)
		switch {
		case !p.Addr.IsValid() || p.Addr.IsUnspecified() || p.Addr.IsMulticast() || p.Addr.Is4In6():
			bad(field+".Addr", fmt.Sprintf("%v is not a router's address", p.Addr), "give the router's unicast address")
		case seen[p.Addr]:
			bad(field+".Addr", fmt.Sprintf("%v is listed twice", p.Addr), "list each router once")
		}
		seen[p.Addr] = true
		if p.ASN == 0 {
			bad(field+".ASN", "0", "set the router's AS number")
		}
	}
	if b.HoldTime < 3*time.Second {
		bad("BGP.HoldTime", b.HoldTime.String(), "use at least 3s (keepalives go every third of it), or 0 for the default 9s")
	}
	if b.RestartTime < time.Second || b.RestartTime > 4095*time.Second {
		bad("BGP.RestartTime", b.RestartTime.String(), "use 1s to 4095s (BGP's limit), or 0 for the default 15s")
	}
	if b.WithdrawDelay < 0 {
		bad("BGP.WithdrawDelay", b.WithdrawDelay.String(), "use a positive duration, or 0 for the default 3s")
	}
}
