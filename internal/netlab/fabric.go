//go:build linux

package netlab

// A multi-host lab: clients behind a router that spreads them over hosts.
//
//	client ns                 router ns                      host ns (one per host)
//	198.18.4.0/22 on fabc0 ── fabr0 198.18.0.1/24
//	  (via 198.18.0.1)        fabh<i> 198.18.(16+i).1/24 ─── fabu0 198.18.(16+i).2/24
//	                                                          lo: the service address 198.19.100.1/32
//	                                                          (default via 198.18.(16+i).1)
//
// The router forwards, and hashes a flow on its addresses only
// (fib_multipath_hash_policy 0), so a client address always takes one
// path while the route's nexthops stay the same. Who programs the
// service route is the test's business: a BGP daemon in the router
// namespace (FRR, frr.go), or NexthopGroup.

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

const (
	fabricClientLink = "fabc0" // the client's end of its link to the router
	fabricRouterLink = "fabr0" // the router's end of it
	fabricUplink     = "fabu0" // a host's end of its link to the router
	maxHosts         = 16
)

// FabricOptions are a Fabric's size.
type FabricOptions struct {
	Hosts   int // 1 to 16; default 3
	Clients int // client addresses, 1 to 1024; default 128
}

// Fabric is a multi-host lab. Its namespaces are NS, as a Lab's.
type Fabric struct {
	Client, Router *NS
	Hosts          []*FabricHost

	ClientAddrs4 []netip.Addr // 198.18.4.0 on: their low bits take every value
	RouterAddr4  netip.Addr   // 198.18.0.1, the clients' gateway
	ServiceAddr4 netip.Addr   // 198.19.100.1, on every host's lo

	closeOnce sync.Once
	closeErr  error
}

// FabricHost is one host of a Fabric.
type FabricHost struct {
	NS       *NS
	Addr4    netip.Addr // its uplink address, 198.18.(16+i).2
	Gateway4 netip.Addr // the router's address on that link, 198.18.(16+i).1
	Link     string     // the router's end of the host's link: fabh<i>
}

// NewFabric builds a fabric; on error nothing is left behind. Call it
// from an ordinary goroutine.
func NewFabric(opts FabricOptions) (_ *Fabric, err error) {
	if opts.Hosts == 0 {
		opts.Hosts = 3
	}
	if opts.Clients == 0 {
		opts.Clients = 128
	}
	if opts.Hosts < 1 || opts.Hosts > maxHosts {
		return nil, fmt.Errorf("netlab: FabricOptions.Hosts %d is outside 1..%d", opts.Hosts, maxHosts)
	}
	if opts.Clients < 1 || opts.Clients > 1024 {
		return nil, fmt.Errorf("netlab: FabricOptions.Clients %d is outside 1..1024", opts.Clients)
	}
	f := &Fabric{
		RouterAddr4:  netip.AddrFrom4([4]byte{198, 18, 0, 1}),
		ServiceAddr4: netip.AddrFrom4([4]byte{198, 19, 100, 1}),
	}
	for i := range opts.Clients {
		f.ClientAddrs4 = append(f.ClientAddrs4, netip.AddrFrom4([4]byte{198, 18, byte(4 + i>>8), byte(i)}))
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, f.Close())
		}
	}()
	if f.Client, err = newNS(); err != nil {
		return nil, err
	}
	if f.Router, err = newNS(); err != nil {
		return nil, err
	}
	for i := range opts.Hosts {
		ns, err := newNS()
		if err != nil {
			return nil, err
		}
		f.Hosts = append(f.Hosts, &FabricHost{
			NS:       ns,
			Addr4:    netip.AddrFrom4([4]byte{198, 18, byte(16 + i), 2}),
			Gateway4: netip.AddrFrom4([4]byte{198, 18, byte(16 + i), 1}),
			Link:     fmt.Sprintf("fabh%d", i),
		})
	}
	if err := f.wire(); err != nil {
		return nil, err
	}
	return f, nil
}

// NewFabricT builds a fabric for a test and removes it when the test
// ends, skipping (or failing, with IPCLUSTER_REQUIRE_NETNS=1) without the
// privileges, as NewT does.
func NewFabricT(t testing.TB, opts FabricOptions) *Fabric {
	t.Helper()
	requirePrivileges(t)
	f, err := NewFabric(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if n := f.KillProcesses(); n > 0 {
			t.Logf("netlab: killed %d processes left in the fabric's namespaces", n)
		}
		if err := f.Close(); err != nil {
			t.Error(err)
		}
	})
	return f
}

func (f *Fabric) namespaces() []*NS {
	nss := []*NS{f.Client, f.Router}
	for _, h := range f.Hosts {
		nss = append(nss, h.NS)
	}
	return nss
}

// KillProcesses SIGKILLs every process in the fabric's namespaces.
func (f *Fabric) KillProcesses() int { return killIn(f.namespaces()...) }

// Close removes the namespaces; safe to call more than once.
func (f *Fabric) Close() error {
	f.closeOnce.Do(func() {
		var errs []error
		for _, ns := range f.namespaces() {
			if ns != nil {
				errs = append(errs, ns.close())
			}
		}
		f.closeErr = errors.Join(errs...)
	})
	return f.closeErr
}

func prefix(a netip.Addr, bits int) *net.IPNet {
	p := netip.PrefixFrom(a, bits).Masked()
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(bits, a.BitLen())}
}

func (f *Fabric) wire() error {
	cli, err := f.Client.netlink()
	if err != nil {
		return err
	}
	defer cli.Close()
	rtr, err := f.Router.netlink()
	if err != nil {
		return err
	}
	defer rtr.Close()
	for _, ns := range []struct {
		h  *netlink.Handle
		ns *NS
	}{{cli, f.Client}, {rtr, f.Router}} {
		if _, err := linkUp(ns.h, ns.ns, "lo"); err != nil {
			return err
		}
	}
	for _, kv := range [][2]string{{"net/ipv4/ip_forward", "1"}, {"net/ipv4/fib_multipath_hash_policy", "0"}} {
		if err := f.Router.Sysctl(kv[0], kv[1]); err != nil {
			return err
		}
	}

	// The clients' side.
	rl, cl, err := veth(f.Router, f.Client, rtr, cli, fabricRouterLink, fabricClientLink)
	if err != nil {
		return err
	}
	clientGW := netip.AddrFrom4([4]byte{198, 18, 0, 2})
	if err := addAddrs(rtr, rl, []netip.Addr{f.RouterAddr4}, 24, 64); err != nil {
		return err
	}
	if err := addAddrs(cli, cl, []netip.Addr{clientGW}, 24, 64); err != nil {
		return err
	}
	if err := addAddrs(cli, cl, f.ClientAddrs4, 32, 128); err != nil {
		return err
	}
	if err := cli.RouteAdd(&netlink.Route{LinkIndex: cl.Attrs().Index, Gw: f.RouterAddr4.AsSlice()}); err != nil {
		return fmt.Errorf("netlab: the clients' default route: %w", err)
	}
	if err := rtr.RouteAdd(&netlink.Route{LinkIndex: rl.Attrs().Index, Dst: prefix(f.ClientAddrs4[0], 22), Gw: clientGW.AsSlice()}); err != nil {
		return fmt.Errorf("netlab: the router's route to the clients: %w", err)
	}

	// The hosts.
	for _, h := range f.Hosts {
		hh, err := h.NS.netlink()
		if err != nil {
			return err
		}
		err = func() error {
			defer hh.Close()
			lo, err := linkUp(hh, h.NS, "lo")
			if err != nil {
				return err
			}
			if err := addAddrs(hh, lo, []netip.Addr{f.ServiceAddr4}, 32, 128); err != nil {
				return err
			}
			rl, hl, err := veth(f.Router, h.NS, rtr, hh, h.Link, fabricUplink)
			if err != nil {
				return err
			}
			if err := addAddrs(rtr, rl, []netip.Addr{h.Gateway4}, 24, 64); err != nil {
				return err
			}
			if err := addAddrs(hh, hl, []netip.Addr{h.Addr4}, 24, 64); err != nil {
				return err
			}
			if err := hh.RouteAdd(&netlink.Route{LinkIndex: hl.Attrs().Index, Gw: h.Gateway4.AsSlice()}); err != nil {
				return fmt.Errorf("netlab: host %s's default route: %w", h.Addr4, err)
			}
			return nil
		}()
		if err != nil {
			return err
		}
	}
	return nil
}

// ServiceRoute returns the router's route to the service address: the
// gateways of its nexthops (none: no route), as the kernel forwards.
func (f *Fabric) ServiceRoute() ([]netip.Addr, error) {
	rtr, err := f.Router.netlink()
	if err != nil {
		return nil, err
	}
	defer rtr.Close()
	routes, err := rtr.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: prefix(f.ServiceAddr4, 32)}, netlink.RT_FILTER_DST)
	if err != nil {
		return nil, fmt.Errorf("netlab: list the router's routes to %s: %w", f.ServiceAddr4, err)
	}
	var gws []netip.Addr
	for _, r := range routes {
		if r.Gw != nil {
			a, _ := netip.AddrFromSlice(r.Gw)
			gws = append(gws, a.Unmap())
		}
		for _, nh := range r.MultiPath {
			a, _ := netip.AddrFromSlice(nh.Gw)
			gws = append(gws, a.Unmap())
		}
	}
	if len(routes) > 0 && len(gws) == 0 {
		return f.groupRoute() // a route by nexthop id, which this netlink package cannot read
	}
	return gws, nil
}

// groupRoute reads a route by nexthop group (SetResilient's) with ip(8).
func (f *Fabric) groupRoute() ([]netip.Addr, error) {
	out, err := exec.Command("ip", "-j", "-n", f.Router.Name, "route", "show", f.ServiceAddr4.String()+"/32").Output()
	if err != nil {
		return nil, fmt.Errorf("netlab: ip route show: %w", err)
	}
	var routes []struct {
		NHID int `json:"nhid"`
	}
	if err := json.Unmarshal(out, &routes); err != nil || len(routes) == 0 || routes[0].NHID == 0 {
		return nil, fmt.Errorf("netlab: the route to %s has no gateway nor nexthop group: %s", f.ServiceAddr4, out)
	}
	out, err = exec.Command("ip", "-j", "-n", f.Router.Name, "nexthop", "show", "id", strconv.Itoa(routes[0].NHID)).Output()
	if err != nil {
		return nil, fmt.Errorf("netlab: ip nexthop show: %w", err)
	}
	var groups []struct {
		Group []struct {
			ID int `json:"id"`
		} `json:"group"`
	}
	if err := json.Unmarshal(out, &groups); err != nil || len(groups) == 0 {
		return nil, fmt.Errorf("netlab: decode nexthop group %d: %v: %s", routes[0].NHID, err, out)
	}
	var gws []netip.Addr
	for _, m := range groups[0].Group {
		if m.ID >= 1 && m.ID <= len(f.Hosts) {
			gws = append(gws, f.Hosts[m.ID-1].Addr4)
		}
	}
	return gws, nil
}

// HostOf returns the host whose uplink address is gw, or nil.
func (f *Fabric) HostOf(gw netip.Addr) *FabricHost {
	for _, h := range f.Hosts {
		if h.Addr4 == gw {
			return h
		}
	}
	return nil
}

// resilientGroup is the id of the router's resilient nexthop group (and
// host i's nexthop is i+1).
const resilientGroup = 100

// Member is one host of a resilient nexthop group, with its weight (1 to
// 255): its share of the buckets.
type Member struct {
	Gw     netip.Addr
	Weight int
}

// SetResilient points the router's route to the service address at a
// resilient nexthop group (Linux 5.13+) of members, creating or changing
// it. A change moves only the buckets it must: those of a host that
// left, and, for a change of weights or a host that joins, buckets idle
// for idleTimer, or any once the group has been unbalanced for
// unbalancedTimer (0: never forced). No member removes the route.
func (f *Fabric) SetResilient(members []Member, buckets int, idleTimer, unbalancedTimer time.Duration) error {
	ip := func(args ...string) error {
		out, err := exec.Command("ip", append([]string{"-n", f.Router.Name}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("netlab: ip %s: %w: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	var ids []string
	for _, m := range members {
		for i, h := range f.Hosts {
			if h.Addr4 == m.Gw {
				id := strconv.Itoa(i + 1)
				if err := ip("nexthop", "replace", "id", id, "via", m.Gw.String(), "dev", h.Link); err != nil {
					return err
				}
				ids = append(ids, id+","+strconv.Itoa(m.Weight))
			}
		}
	}
	dst := f.ServiceAddr4.String() + "/32"
	if len(ids) == 0 {
		_ = ip("route", "del", dst)
		_ = ip("nexthop", "del", "id", strconv.Itoa(resilientGroup))
		return nil
	}
	if err := ip("nexthop", "replace", "id", strconv.Itoa(resilientGroup), "group", strings.Join(ids, "/"), "type", "resilient",
		"buckets", strconv.Itoa(buckets), "idle_timer", strconv.Itoa(int(idleTimer/time.Second)),
		"unbalanced_timer", strconv.Itoa(int(unbalancedTimer/time.Second))); err != nil {
		return err
	}
	return ip("route", "replace", dst, "nhid", strconv.Itoa(resilientGroup))
}
