//go:build linux

package main

// Beyond one host: three hosts, each a cluster of this example announcing
// the service address over BGP to a router running FRR, which spreads
// clients over them by ECMP. Needs root and FRR (test.sh installs it).

import (
	"bufio"
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/examplelab"
	"github.com/ipcluster/ipcluster/internal/netlab"
	"github.com/ipcluster/ipcluster/internal/proto"
)

const (
	routerASN = 65000
	hostASN   = 65001
	echoPort  = 7000
)

// routerConf is FRR's: every host that connects from the hosts' links is
// a neighbor (a listen range), eBGP, multipath over all of them, graceful
// restart on.
const routerConf = `frr defaults datacenter
hostname lab-router
router bgp 65000
 bgp router-id 198.18.0.1
 no bgp ebgp-requires-policy
 bgp graceful-restart
 neighbor HOSTS peer-group
 neighbor HOSTS remote-as external
 neighbor HOSTS timers 3 9
 bgp listen range 198.18.16.0/20 peer-group HOSTS
 address-family ipv4 unicast
  maximum-paths 16
 exit-address-family
`

// echoReply is the first line a worker writes on a connection.
type echoReply struct {
	slot, pid int
}

// dialEcho connects from src to the service address through the router
// and reads the worker's first line; the connection stays open for the
// caller to close.
func dialEcho(f *netlab.Fabric, src netip.Addr) (net.Conn, echoReply, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := f.Client.Dial(ctx, "tcp4", src, netip.AddrPortFrom(f.ServiceAddr4, echoPort))
	if err != nil {
		return nil, echoReply{}, err
	}
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	_ = c.SetDeadline(time.Time{})
	if err != nil {
		c.Close()
		return nil, echoReply{}, fmt.Errorf("read the worker's line from %s: %w", src, err)
	}
	var r echoReply
	if _, err := fmt.Sscanf(line, "slot=%d pid=%d", &r.slot, &r.pid); err != nil {
		c.Close()
		return nil, echoReply{}, fmt.Errorf("parse %q: %w", line, err)
	}
	return c, r, nil
}

// fabricRun is a fabric of three hosts, each a 4-worker echo cluster
// announcing the service address to FRR in the router.
type fabricRun struct {
	f      *netlab.Fabric
	frr    *netlab.FRR
	hosts  []*examplelab.Cluster
	hostOf map[int]int // worker pid → host index
	exe    string
	up     time.Duration // from the masters' start to every host routed
}

// startFabric starts the fabric. With resilient, bgpd installs nothing:
// the test programs the router's route as a resilient nexthop group of
// the hosts bgpd would use, within 20ms of each change, as a router doing
// resilient hashing natively would (FRR ignores its resilient options).
func startFabric(t *testing.T, resilient bool, extra ...string) *fabricRun {
	netlab.FRRAvailable(t)
	r := &fabricRun{f: netlab.NewFabricT(t, netlab.FabricOptions{Hosts: 3, Clients: 128}), hostOf: map[int]int{}}
	f := r.f
	r.frr = netlab.StartFRR(t, f.Router, routerConf, resilient)
	if resilient {
		stop := make(chan struct{})
		done := make(chan struct{})
		t.Cleanup(func() { close(stop); <-done })
		go func() {
			defer close(done)
			r.program(t, stop)
		}()
	}
	dir := t.TempDir()
	r.exe = filepath.Join(dir, "echo")
	examplelab.Build(t, r.exe, "")
	start := time.Now()
	for i, h := range f.Hosts {
		hd := filepath.Join(dir, fmt.Sprintf("host%d", i))
		c := examplelab.StartIn(t, h.NS, r.exe, mkdir(t, hd), "echo", append([]string{"-workers", "4", "-port", fmt.Sprint(echoPort),
			"-addr", f.ServiceAddr4.String(), "-bgp-peer", fmt.Sprintf("%s,%d", h.Gateway4, routerASN),
			"-bgp-asn", fmt.Sprint(hostASN), "-bgp-router-id", h.Addr4.String()}, extra...)...)
		r.hosts = append(r.hosts, c)
	}
	waitRoute(t, f, "every host announced", func(gws []netip.Addr) bool { return len(gws) == 3 })
	r.up = time.Since(start)
	for i, c := range r.hosts {
		st := c.Wait("host ready and announcing", func(st *proto.Status) bool { return st.Ready && st.BGP != nil && st.BGP.Announced })
		for _, w := range st.Workers {
			r.hostOf[w.PID] = i
		}
	}
	return r
}

// The resilient group's settings, as a router doing resilient hashing
// would have them: 128 buckets; a bucket is idle after idleTimer without
// a packet (held connections here ping more often, as realtime clients
// send heartbeats); a host that withdrew is drained, with the least
// weight, for drainDeadline: its active buckets (its held connections)
// stay, its idle ones go to the others; then it leaves the group.
const (
	buckets       = 128
	idleTimer     = 2 * time.Second
	drainDeadline = 8 * time.Second
)

// program keeps the router's resilient group to the hosts bgpd would
// use, within 20ms of each change, draining a host that withdrew for
// drainDeadline before it leaves, until stop is closed.
func (r *fabricRun) program(t *testing.T, stop <-chan struct{}) {
	draining := map[netip.Addr]time.Time{} // a withdrawn host → when it leaves the group
	routed := map[netip.Addr]bool{}        // the hosts bgpd used last time
	var prev string
	for {
		select {
		case <-stop:
			return
		case <-time.After(20 * time.Millisecond):
		}
		gws, err := r.frr.BestPaths(r.f.ServiceAddr4.String() + "/32")
		if err != nil {
			continue
		}
		var members []netlab.Member
		now := time.Now()
		for _, h := range r.f.Hosts {
			switch until, ok := draining[h.Addr4]; {
			case slices.Contains(gws, h.Addr4):
				delete(draining, h.Addr4)
				members = append(members, netlab.Member{Gw: h.Addr4, Weight: 100})
			case ok && now.Before(until):
				members = append(members, netlab.Member{Gw: h.Addr4, Weight: 1})
			case !ok && routed[h.Addr4]:
				draining[h.Addr4] = now.Add(drainDeadline)
				members = append(members, netlab.Member{Gw: h.Addr4, Weight: 1})
			}
		}
		routed = map[netip.Addr]bool{}
		for _, gw := range gws {
			routed[gw] = true
		}
		key := fmt.Sprint(members)
		if key == prev {
			continue
		}
		if err := r.f.SetResilient(members, buckets, idleTimer, drainDeadline); err != nil {
			t.Errorf("program the resilient group: %v", err)
			return
		}
		prev = key
	}
}

func TestFabricBGP(t *testing.T) {
	r := startFabric(t, false, "-bgp-restart-time", "4s")
	f, hosts, hostOf := r.f, r.hosts, r.hostOf
	t.Logf("3 hosts announced %s within %s of their start", f.ServiceAddr4, r.up.Round(time.Millisecond))

	// Every client reaches one host, and always the same worker there;
	// every host sees each of its slots.
	first := map[netip.Addr]echoReply{}
	slots := map[int]map[int]bool{}
	for round := range 2 {
		for _, src := range f.ClientAddrs4 {
			c, r, err := dialEcho(f, src)
			if err != nil {
				t.Fatal(err)
			}
			c.Close()
			if round == 0 {
				first[src] = r
			} else if r != first[src] {
				t.Errorf("client %s reached slot %d pid %d, then slot %d pid %d", src, first[src].slot, first[src].pid, r.slot, r.pid)
			}
			h, ok := hostOf[r.pid]
			if !ok {
				t.Fatalf("client %s reached pid %d, a worker of no host", src, r.pid)
			}
			if slots[h] == nil {
				slots[h] = map[int]bool{}
			}
			slots[h][r.slot] = true
		}
	}
	perHost := make([]int, len(hosts))
	for _, r := range first {
		perHost[hostOf[r.pid]]++
	}
	for i := range hosts {
		if len(slots[i]) != 4 {
			t.Errorf("host %d saw slots %v of its 4: the router's hash correlates with the slot bits", i, slices.Sorted(maps.Keys(slots[i])))
		}
	}
	t.Logf("128 clients over the hosts: %v", perHost)

	// A drain: the host's route goes, new clients reach the others.
	drained := f.Hosts[0]
	t0 := time.Now()
	if _, err := hosts[0].Request(proto.TypeDrain, &proto.Drain{On: true}); err != nil {
		t.Fatal(err)
	}
	waitRoute(t, f, "the drained host withdrawn", func(gws []netip.Addr) bool { return len(gws) == 2 && !slices.Contains(gws, drained.Addr4) })
	drainTime := time.Since(t0)
	if st, err := hosts[0].Status(); err != nil || st.Ready || !st.Drained || st.BGP.Announced {
		t.Errorf("drained host's status: %+v, %v", st, err)
	}
	for _, src := range f.ClientAddrs4 {
		c, r, err := dialEcho(f, src)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if hostOf[r.pid] == 0 {
			t.Fatalf("client %s reached the drained host (pid %d)", src, r.pid)
		}
	}
	t0 = time.Now()
	if _, err := hosts[0].Request(proto.TypeDrain, &proto.Drain{On: false}); err != nil {
		t.Fatal(err)
	}
	waitRoute(t, f, "the undrained host back", func(gws []netip.Addr) bool { return len(gws) == 3 })
	t.Logf("drain → route withdrawn at the router: %s; undrain → back: %s", drainTime.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))

	// A deploy on host 1 (a new master takes over): its route never
	// leaves the router.
	st1, err := hosts[1].Status()
	if err != nil {
		t.Fatal(err)
	}
	hosts[1].BuildNext("-X main.fabricTestBuild=2")
	hosts[1].Deploy()
	missing := 0
	deadline := time.Now().Add(30 * time.Second)
	for {
		gws, err := f.ServiceRoute()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(gws, f.Hosts[1].Addr4) {
			missing++
		}
		st, err := hosts[1].Status()
		if err == nil && st.MasterPID != st1.MasterPID && st.Ready && st.BGP != nil && st.BGP.Announced {
			peersUp := len(st.BGP.Peers) > 0 && st.BGP.Peers[0].State == "established"
			if peersUp {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("host 1's new master did not take over and announce within 30s: %+v %v", st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(2 * time.Second) // stale routes refreshed, or not
	if gws, _ := f.ServiceRoute(); missing > 0 || !slices.Contains(gws, f.Hosts[1].Addr4) {
		t.Errorf("host 1's route left the router %d times (20ms samples) during its deploy; now %v", missing, gws)
	}

	// A SIGKILL of host 1's master: the routers keep its route for the
	// restart time (4s here) while its workers serve on, then withdraw it;
	// a new master adopts the workers and announces again.
	st1, err = hosts[1].Status()
	if err != nil {
		t.Fatal(err)
	}
	held, _, err := dialEchoHost(f, hostOf, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := syscall.Kill(st1.MasterPID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	if !alive(held) {
		t.Error("a connection held on host 1 broke when its master was killed")
	}
	if gws, _ := f.ServiceRoute(); !slices.Contains(gws, f.Hosts[1].Addr4) {
		t.Errorf("host 1's route went at once when its master was killed (%v), not after the restart time", gws)
	}
	waitRoute(t, f, "host 1 withdrawn after its master's SIGKILL", func(gws []netip.Addr) bool { return !slices.Contains(gws, f.Hosts[1].Addr4) })
	withdrawnAfter := time.Since(killed)
	if withdrawnAfter < 3*time.Second {
		t.Errorf("host 1's route went %s after its master's SIGKILL, before the 4s restart time", withdrawnAfter)
	}
	restarted := time.Now()
	hosts[1].StartMaster()
	waitRoute(t, f, "host 1 back with a new master", func(gws []netip.Addr) bool { return slices.Contains(gws, f.Hosts[1].Addr4) })
	t.Logf("SIGKILL of a master → its route withdrawn after %s (restart time 4s); a new master → routed again after %s",
		withdrawnAfter.Round(time.Millisecond), time.Since(restarted).Round(time.Millisecond))

	// A graceful stop of host 2: its route goes before its workers stop
	// taking clients, so no new connection fails for want of a worker.
	// One attempt may fail at the route change itself: the attempts go
	// one at a time, and hash-threshold ECMP moves the one in flight then
	// (to host 2 or another) to a host that has no socket for it.
	st2, err := hosts[2].Status()
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(st2.MasterPID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	attempts := 0
	try := func(srcs []netip.Addr) (failed int) { // a connection from each, closed
		for _, src := range srcs {
			attempts++
			if c, _, err := dialEcho(f, src); err != nil {
				failed++
			} else {
				c.Close()
			}
		}
		return failed
	}
	atChange := 0
	for gone := false; !gone; {
		atChange += try(f.ClientAddrs4[:32])
		gws, _ := f.ServiceRoute()
		gone = !slices.Contains(gws, f.Hosts[2].Addr4)
	}
	// Then its master stops as without BGP; the others serve on.
	after := try(f.ClientAddrs4)
	t.Logf("graceful stop of host 2: %d of %d connection attempts failed (%d around the route change)", atChange+after, attempts, atChange)
	if atChange > 1 || after > 0 {
		t.Errorf("%d connection attempts failed around host 2's withdrawal (at most the one in flight may) and %d after it, of %d", atChange, after, attempts)
	}
}

// dialEchoHost opens a connection from the first client address that
// reaches host h.
func dialEchoHost(f *netlab.Fabric, hostOf map[int]int, h int) (net.Conn, echoReply, error) {
	for _, src := range f.ClientAddrs4 {
		c, r, err := dialEcho(f, src)
		if err != nil {
			return nil, r, err
		}
		if hostOf[r.pid] == h {
			return c, r, nil
		}
		c.Close()
	}
	return nil, echoReply{}, fmt.Errorf("no client reaches host %d", h)
}

// alive reports whether a held echo connection still answers.
func alive(c net.Conn) bool { return ping(c) == nil }

// ping sends a line on a held echo connection and reads the answer: an
// error says how it ended (io.EOF: the worker closed it).
func ping(c net.Conn) error {
	// Generous: a test beside the others on a busy machine must not take
	// a slow answer for a broken connection.
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return err
	}
	buf := make([]byte, 64)
	_, err := c.Read(buf)
	return err
}

// heldConn is a connection held open and pinged every 300ms, as a
// realtime client's heartbeat: broken once a ping goes unanswered.
type heldConn struct {
	host    int
	broken  atomic.Bool
	brokeAt atomic.Int64 // when, in Unix nanoseconds
}

// holdFrom opens a connection from each of srcs and pings each until the
// test ends.
func (r *fabricRun) holdFrom(t *testing.T, srcs []netip.Addr) []*heldConn {
	t.Helper()
	var out []*heldConn
	stop := make(chan struct{})
	var wg sync.WaitGroup
	t.Cleanup(func() { close(stop); wg.Wait() })
	for _, src := range srcs {
		c, rep, err := dialEcho(r.f, src)
		if err != nil {
			t.Fatal(err)
		}
		h := &heldConn{host: r.hostOf[rep.pid]}
		out = append(out, h)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			for {
				select {
				case <-stop:
					return
				case <-time.After(300 * time.Millisecond):
				}
				if h.broken.Load() {
					continue
				}
				if err := ping(c); err != nil {
					h.brokeAt.Store(time.Now().UnixNano())
					h.broken.Store(true)
				}
			}
		}()
	}
	return out
}

// brokenOn counts the held connections on hosts other than skip that
// broke, of how many.
func brokenOn(held []*heldConn, skip int) (n, of int) {
	for _, h := range held {
		if h.host == skip {
			continue
		}
		of++
		if h.broken.Load() {
			n++
		}
	}
	return n, of
}

// reaching counts the new connections from srcs that reach host.
func (r *fabricRun) reaching(t *testing.T, srcs []netip.Addr, host int) int {
	t.Helper()
	n := 0
	for _, src := range srcs {
		c, rep, err := dialEcho(r.f, src)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if r.hostOf[rep.pid] == host {
			n++
		}
	}
	return n
}

// Collateral damage: when a host leaves (drained) or joins (undrained),
// how many connections held on the other hosts break, with the routes FRR
// installs (hash-threshold ECMP, which remaps part of every host's
// clients) and with a resilient nexthop group (which moves only the
// buckets of the host that left, or, for one that joins, idle ones). In
// resilient mode the drained host also keeps its held connections, and
// gets fewer new clients, until the drain deadline.
func TestFabricCollateral(t *testing.T) {
	var results []string
	for _, mode := range []string{"hash-threshold", "resilient"} {
		t.Run(mode, func(t *testing.T) {
			r := startFabric(t, mode == "resilient")
			f := r.f
			held, probes := f.ClientAddrs4[:64], f.ClientAddrs4[64:]
			reachedBefore := r.reaching(t, probes, 0)
			before := r.holdFrom(t, held)
			time.Sleep(idleTimer + time.Second) // every bucket but the held connections' idle
			drainedAt := time.Now()
			if _, err := r.hosts[0].Request(proto.TypeDrain, &proto.Drain{On: true}); err != nil {
				t.Fatal(err)
			}
			note := ""
			if mode == "resilient" {
				time.Sleep(time.Second) // the idle buckets moved
				reachedDuring := r.reaching(t, probes, 0)
				lost, of := 0, 0
				for _, h := range before {
					if h.host == 0 {
						of++
						if h.broken.Load() {
							lost++
						}
					}
				}
				note = fmt.Sprintf("; while draining, %d of %d connections held on it broke and %d of %d new clients reached it (%d before the drain)",
					lost, of, reachedDuring, len(probes), reachedBefore)
				if lost != 0 {
					t.Errorf("draining host: %d of its %d held connections broke before the deadline", lost, of)
				}
				if reachedDuring >= reachedBefore {
					t.Errorf("draining host got %d of %d new clients, no fewer than before the drain (%d)", reachedDuring, len(probes), reachedBefore)
				}
			}
			waitRoute(t, f, "host 0 out of the route", func(gws []netip.Addr) bool { return len(gws) == 2 })
			gone := time.Since(drainedAt)
			time.Sleep(time.Second) // pings find what broke
			leave, leaveOf := brokenOn(before, 0)
			during := r.holdFrom(t, f.ClientAddrs4)
			if _, err := r.hosts[0].Request(proto.TypeDrain, &proto.Drain{On: false}); err != nil {
				t.Fatal(err)
			}
			waitRoute(t, f, "host 0 back", func(gws []netip.Addr) bool { return len(gws) == 3 })
			time.Sleep(time.Second)
			join, joinOf := brokenOn(during, 0)
			t.Logf("%s: drain → host out of the route %s; a host leaving broke %d of %d connections held on the others; joining, %d of %d%s",
				mode, gone.Round(time.Millisecond), leave, leaveOf, join, joinOf, note)
			results = append(results, fmt.Sprintf("%s: leave %d/%d, join %d/%d", mode, leave, leaveOf, join, joinOf))
			if mode == "resilient" && (leave != 0 || join != 0) {
				t.Errorf("resilient nexthop group: %d and %d held connections broke on the other hosts, want 0", leave, join)
			}
			if mode != "resilient" {
				return
			}
			// A graceful stop of host 2: the router drains it, so its held
			// connections go on until its workers close them.
			last := r.holdFrom(t, f.ClientAddrs4)
			st, err := r.hosts[2].Status()
			if err != nil {
				t.Fatal(err)
			}
			if err := syscall.Kill(st.MasterPID, syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			// The master tells its workers to finish WithdrawDelay (3s by
			// default) after the signal; an end from then on is their
			// close (a FIN, or a reset when a ping was in flight).
			workersTold := time.Now().Add(3 * time.Second)
			for deadline := time.Now().Add(time.Minute); netlab.Running(st.MasterPID); time.Sleep(50 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("host 2's master did not stop within a minute")
				}
			}
			time.Sleep(time.Second) // pings find the ends
			closed, reset, on := 0, 0, 0
			for _, h := range last {
				if h.host != 2 {
					continue
				}
				on++
				switch {
				case !h.broken.Load():
				case h.brokeAt.Load() >= workersTold.UnixNano():
					closed++
				default:
					reset++
				}
			}
			t.Logf("graceful stop of host 2: of the %d connections held on it, %d were closed by its workers, %d broke before", on, closed, reset)
			if reset != 0 || closed != on {
				t.Errorf("graceful stop: %d of %d held connections broke before the host's workers closed them (%d closed)", reset, on, closed)
			}
		})
	}
	t.Logf("collateral damage, connections held on the other hosts broken: %s", strings.Join(results, "; "))
}

// waitRoute polls the router's route to the service address until ok.
func waitRoute(t *testing.T, f *netlab.Fabric, what string, ok func([]netip.Addr) bool) {
	t.Helper()
	var gws []netip.Addr
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		var err error
		if gws, err = f.ServiceRoute(); err != nil {
			t.Fatal(err)
		}
		if ok(gws) {
			return
		}
	}
	t.Fatalf("timed out waiting for %s: the router routes %s via %v", what, f.ServiceAddr4, gws)
}

func mkdir(t *testing.T, dir string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}
