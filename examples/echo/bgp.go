//go:build !ipcluster_nobgp

package main

// BGP flags: with -bgp-peer, the master announces -addr to the routers
// while the cluster serves (ipcluster.BGPConfig; "Beyond one host" in the
// README).

import (
	"flag"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/ipcluster/ipcluster"
	// The BGP speaker, for -bgp-peer: a program that announces over BGP
	// imports it (it links GoBGP, which others leave out).
	_ "github.com/ipcluster/ipcluster/bgp"
)

// peersFlag is -bgp-peer, repeatable: addr,asn[,port].
type peersFlag []ipcluster.BGPPeer

func (p *peersFlag) String() string {
	var out []string
	for _, x := range *p {
		out = append(out, fmt.Sprintf("%s,%d,%d", x.Addr, x.ASN, x.Port))
	}
	return strings.Join(out, " ")
}

func (p *peersFlag) Set(v string) error {
	parts := strings.Split(v, ",")
	if len(parts) < 2 || len(parts) > 3 {
		return fmt.Errorf("%q: want addr,asn or addr,asn,port (say 198.18.16.1,65000)", v)
	}
	addr, err := netip.ParseAddr(parts[0])
	if err != nil {
		return fmt.Errorf("%q: the router's address: %w", v, err)
	}
	asn, err := strconv.ParseUint(parts[1], 10, 32)
	if err != nil {
		return fmt.Errorf("%q: the router's AS number: %w", v, err)
	}
	peer := ipcluster.BGPPeer{Addr: addr, ASN: uint32(asn)}
	if len(parts) == 3 {
		port, err := strconv.ParseUint(parts[2], 10, 16)
		if err != nil {
			return fmt.Errorf("%q: the router's BGP port: %w", v, err)
		}
		peer.Port = uint16(port)
	}
	*p = append(*p, peer)
	return nil
}

// bgpFlags registers the BGP flags; the returned function fills cfg.BGP
// from them after flag.Parse.
func bgpFlags() func(cfg *ipcluster.Config) error {
	var peers peersFlag
	flag.Var(&peers, "bgp-peer", "a router to announce -addr to while the cluster serves: addr,asn[,port]; repeat for more")
	asn := flag.Uint("bgp-asn", 0, "this host's AS number (with -bgp-peer)")
	routerID := flag.String("bgp-router-id", "", "this host's BGP identifier, an IPv4 address (with -bgp-peer)")
	hold := flag.Duration("bgp-hold-time", 0, "BGP hold time (default 9s)")
	restart := flag.Duration("bgp-restart-time", 0, "how long routers keep this host's routes after its master went without a word (default 15s)")
	return func(cfg *ipcluster.Config) error {
		if len(peers) == 0 {
			return nil
		}
		cfg.BGP.Peers, cfg.BGP.ASN = peers, uint32(*asn)
		cfg.BGP.HoldTime, cfg.BGP.RestartTime = *hold, *restart
		if *routerID != "" {
			id, err := netip.ParseAddr(*routerID)
			if err != nil {
				return fmt.Errorf("-bgp-router-id: %w", err)
			}
			cfg.BGP.RouterID = id
		}
		return nil
	}
}
