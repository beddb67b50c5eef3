//go:build linux

package ipcluster

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math/bits"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

// FuzzConfigValidate builds a Config from fuzzed values. withDefaults and
// validate never panic; every problem is a *ConfigError naming its field;
// and a config they accept is one the master can run: the invariants below
// are what the rest of the package relies on without checking again.
// Seeds: testdata/fuzz/FuzzConfigValidate.
func FuzzConfigValidate(f *testing.F) {
	f.Fuzz(func(t *testing.T, name string, workers int, ports []byte, addr string, v4, v6 int,
		backend, runDir string, connect, heartbeat, monitor, stop int64,
		user, group, httpAddr string, ping int64, retireLimit int, retireWindow int64,
		low, high float64, nice, spares int, hcInterval int64, hcFailures int, version string, pace int64) {
		cfg := Config{
			Name: name, Workers: workers, IPv4SlotPrefix: v4, IPv6SlotPrefix: v6,
			Backend: Backend(backend), RunDir: runDir,
			ConnectTimeout: time.Duration(connect), HeartbeatInterval: time.Duration(heartbeat),
			MonitorInterval: time.Duration(monitor), StopTimeout: time.Duration(stop),
			WorkerUser: user, WorkerGroup: group, HTTPAddr: httpAddr,
			PingTimeout: time.Duration(ping), RetireLimit: retireLimit, RetireWindow: time.Duration(retireWindow),
			MemoryLowWatermark: low, MemoryHighWatermark: high, RetiredNice: nice, Spares: spares,
			HealthCheckInterval: time.Duration(hcInterval), HealthCheckFailures: hcFailures,
			Version: version, DeployPace: time.Duration(pace),
		}
		// Three bytes a port: public port, then protocol (0 TCP, 1 UDP,
		// anything else as is).
		for ; len(ports) >= 3; ports = ports[3:] {
			cfg.Ports = append(cfg.Ports, Port{Public: binary.BigEndian.Uint16(ports), Proto: Protocol(ports[2])})
		}
		if a, err := netip.ParseAddr(addr); err == nil {
			cfg.Addr = a
		}
		cfg = cfg.withDefaults()
		err := cfg.validate()
		if err != nil {
			checkConfigError(t, err)
			return
		}
		checkAccepted(t, &cfg)
	})
}

// checkConfigError checks every error joined in err is a *ConfigError whose
// message names Config.<Field>.
func checkConfigError(t *testing.T, err error) {
	t.Helper()
	var ce *ConfigError
	if !errors.As(err, &ce) || !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("validate returned %T %v, not a *ConfigError", err, err)
	}
	errs := []error{err}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	}
	for _, e := range errs {
		if !errors.As(e, &ce) || ce.Field == "" {
			t.Fatalf("%T %v is not a *ConfigError", e, e)
		}
		if !strings.Contains(e.Error(), "Config."+ce.Field) {
			t.Fatalf("%q does not name Config.%s", e.Error(), ce.Field)
		}
	}
}

// checkAccepted checks what the master assumes of a validated config, and
// that its rules can be generated.
func checkAccepted(t *testing.T, c *Config) {
	t.Helper()
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("accepted %+v: %s", *c, fmt.Sprintf(format, args...))
	}
	if c.Workers < 1 || c.Workers > MaxWorkers || bits.OnesCount(uint(c.Workers)) != 1 {
		fail("Workers %d", c.Workers)
	}
	if !nameRE.MatchString(c.Name) || len(c.Name) > MaxNameLen {
		fail("Name %q", c.Name)
	}
	if len(c.Ports) == 0 {
		fail("no ports")
	}
	seen := map[Port]bool{}
	for _, p := range c.Ports {
		if p.Public == 0 || (p.Proto != TCP && p.Proto != UDP) || seen[p] {
			fail("port %+v", p)
		}
		seen[p] = true
	}
	k := bits.Len(uint(c.Workers)) - 1
	if c.IPv4SlotPrefix < k || c.IPv4SlotPrefix > 32 || c.IPv6SlotPrefix < k || c.IPv6SlotPrefix > 128 {
		fail("prefixes %d, %d", c.IPv4SlotPrefix, c.IPv6SlotPrefix)
	}
	// Tickers panic on a non-positive interval.
	if c.ConnectTimeout <= 0 || c.HeartbeatInterval <= 0 || c.StopTimeout <= 0 || c.MonitorInterval <= 0 || c.HealthCheckInterval <= 0 {
		fail("a non-positive interval")
	}
	if c.RunDir == "" || c.RunDir[0] != '/' {
		fail("RunDir %q", c.RunDir)
	}
	if c.Addr.IsValid() && (c.Addr.IsMulticast() || c.Addr.Zone() != "" || c.Addr.Is4In6()) {
		fail("Addr %s", c.Addr)
	}
	if !(c.MemoryLowWatermark > 0 && c.MemoryLowWatermark <= c.MemoryHighWatermark && c.MemoryHighWatermark <= 1) {
		fail("watermarks")
	}
	if c.Spares < 0 || c.Spares > MaxWorkers || c.HealthCheckFailures < 1 {
		fail("Spares %d, HealthCheckFailures %d", c.Spares, c.HealthCheckFailures)
	}
	r := c.routing()
	targets := make([]slotTarget, r.workers)
	for s := range targets {
		targets[s] = slotTarget{}
		for i, p := range r.ports {
			targets[s][p] = uint16(1 + s*len(r.ports) + i)
		}
	}
	for _, fam := range r.families {
		if n := len(r.chainRules(fam, targets)); n != r.workers*len(r.ports) {
			fail("%d %s rules for %d slots of %d ports", n, fam.name, r.workers, len(r.ports))
		}
		// The rules read back as written (the IPv4 and IPv6 dumps
		// differ only in their addresses).
		have, err := parseSave([]byte(saveDump(r, fam, targets)))
		if err != nil {
			fail("own rules do not parse: %v", err)
		}
		got := r.routesIn(fam, have)
		for s := range targets {
			if !maps.Equal(got[s], targets[s]) {
				fail("%s slot %d reads back as %v, written %v", fam.name, s, got[s], targets[s])
			}
		}
	}
}

// saveDump is the nat table iptables-save prints once the master wrote
// targets for family f, with the chain hooked.
func saveDump(r *routing, f *family, targets []slotTarget) string {
	var b strings.Builder
	b.WriteString("# Generated by iptables-save v1.8.9 (nf_tables)\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n")
	fmt.Fprintf(&b, ":%s - [0:0]\n-A PREROUTING %s\n-A OUTPUT %s\n", r.chain, r.hookSpec(), r.hookSpec())
	for _, l := range r.chainRules(f, targets) {
		b.WriteString(l + "\n")
	}
	b.WriteString("COMMIT\n# Completed\n")
	return b.String()
}

// fuzzRoutings are the clusters FuzzParseSave reads routes for: the
// name of the real dumps among the seeds, one slot, and mixed protocols.
var fuzzRoutings = []Config{
	{Name: "chat", Workers: 4, Ports: []Port{tcp8080, tcp8443}},
	{Name: "chat", Workers: 1, Ports: []Port{tcp8080}},
	{Name: "chat", Workers: 2, Ports: []Port{tcp8080, udp8080}, Addr: netip.MustParseAddr("198.18.0.1")},
}

// FuzzParseSave feeds parseSave arbitrary iptables-save output, and reads
// the routes of a cluster from what it accepts: neither panics, every rule
// accepted is in a declared chain, and a route read holds only the
// cluster's public ports and non-zero worker ports. Seeds (real dumps
// among them): testdata/fuzz/FuzzParseSave.
func FuzzParseSave(f *testing.F) {
	routings := make([]*routing, len(fuzzRoutings))
	for i, cfg := range fuzzRoutings {
		cfg = cfg.withDefaults()
		if err := cfg.validate(); err != nil {
			f.Fatal(err)
		}
		routings[i] = cfg.routing()
	}
	f.Fuzz(func(t *testing.T, dump []byte, which uint8) {
		tab, err := parseSave(dump)
		if err != nil {
			return
		}
		for chain := range tab.rules {
			if !tab.chains[chain] {
				t.Fatalf("rules of undeclared chain %q accepted", chain)
			}
		}
		r := routings[int(which)%len(routings)]
		for _, fam := range r.families {
			got := r.routesIn(fam, tab)
			if len(got) != r.workers {
				t.Fatalf("%d slots read, want %d", len(got), r.workers)
			}
			for s, tg := range got {
				for p, w := range tg {
					if w == 0 || !slices.Contains(r.ports, p) {
						t.Fatalf("slot %d routes %v to %d, not one of the cluster's ports %v", s, p, w, r.ports)
					}
				}
			}
		}
	})
}

// The kernel applies the first of two rules for one slot and port (a DNAT
// ends the walk), so that is the route read.
func TestRoutesInFirstRuleWins(t *testing.T) {
	cfg := fuzzRoutings[0].withDefaults()
	r := cfg.routing()
	first, stale := targetsFor(4), targetsFor(4)
	for _, tg := range stale {
		for p := range tg {
			tg[p] += 5
		}
	}
	dump := saveDump(r, familyIPv4, first)
	dump = strings.Replace(dump, "COMMIT", strings.Join(r.chainRules(familyIPv4, stale), "\n")+"\nCOMMIT", 1)
	tab, err := parseSave([]byte(dump))
	if err != nil {
		t.Fatal(err)
	}
	got := r.routesIn(familyIPv4, tab)
	for s := range first {
		if !maps.Equal(got[s], first[s]) {
			t.Errorf("slot %d reads as %v, the kernel routes it to %v", s, got[s], first[s])
		}
	}
}
