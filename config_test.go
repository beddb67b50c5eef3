package ipcluster

import (
	"log/slog"

	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ipcluster/ipcluster/internal/bgpreg"
)

// Every bad field is named in its error, and validation touches nothing.
// withBGP gives c a valid BGP configuration, for a test to break, and
// has validation find a speaker linked in. Not package bgp itself: GoBGP
// in this test binary would add its init, a megabyte of heap (more under
// the race detector), to every worker the package's tests start, and
// TestLeakOnceScenario's threshold met a plain worker.
func withBGP(c *Config) {
	if bgpreg.Start == nil {
		bgpreg.Start = func(bgpreg.Config, bool, *slog.Logger) (bgpreg.Speaker, error) {
			return nil, errors.New("no speaker in the config tests")
		}
	}
	c.Addr = netip.MustParseAddr("198.19.100.1")
	c.BGP = BGPConfig{ASN: 65001, RouterID: netip.MustParseAddr("198.18.16.2"),
		Peers: []BGPPeer{{Addr: netip.MustParseAddr("198.18.16.1"), ASN: 65000}}}
}

func TestValidateNamesTheField(t *testing.T) {
	ok := Config{Name: "chat", Workers: 4, Ports: []Port{{Public: 8080}}}
	for _, tc := range []struct {
		field string
		edit  func(*Config)
	}{
		{"Name", func(c *Config) { c.Name = "" }},
		{"Name", func(c *Config) { c.Name = "a-name-far-too-long" }},
		{"Name", func(c *Config) { c.Name = "Chat" }},
		{"Name", func(c *Config) { c.Name = "chat;rm" }},
		{"Name", func(c *Config) { c.Name = "../etc" }},
		{"Workers", func(c *Config) { c.Workers = 3 }},
		{"Workers", func(c *Config) { c.Workers = 512 }},
		{"Workers", func(c *Config) { c.Workers = -2 }},
		{"Ports", func(c *Config) { c.Ports = nil }},
		{"Ports[1].Public", func(c *Config) { c.Ports = []Port{{Public: 80}, {Public: 80}} }},
		{"Ports[0].Public", func(c *Config) { c.Ports = []Port{{Public: 0}} }},
		{"Ports[2].Public", func(c *Config) { c.Ports = []Port{{Public: 53, Proto: UDP}, {Public: 53}, {Public: 53, Proto: UDP}} }},
		{"Ports[0].Proto", func(c *Config) { c.Ports = []Port{{Public: 53, Proto: 7}} }},
		{"Ports[1].Proto", func(c *Config) { c.Ports = []Port{{Public: 53}, {Public: 0, Proto: 2}} }},
		{"Addr", func(c *Config) { c.Addr = netip.MustParseAddr("fe80::1%eth0") }},
		{"Addr", func(c *Config) { c.Addr = netip.MustParseAddr("224.0.0.1") }},
		{"Addr", func(c *Config) { c.Addr = netip.MustParseAddr("::ffff:198.18.0.1") }},
		{"IPv4SlotPrefix", func(c *Config) { c.IPv4SlotPrefix = 33 }},
		{"IPv4SlotPrefix", func(c *Config) { c.Workers, c.IPv4SlotPrefix = 256, 4 }},
		{"IPv6SlotPrefix", func(c *Config) { c.IPv6SlotPrefix = 129 }},
		{"RunDir", func(c *Config) { c.RunDir = "run/x" }},
		{"WorkerGroup", func(c *Config) { c.WorkerGroup = "nogroup" }},
		{"HeartbeatInterval", func(c *Config) { c.HeartbeatInterval = time.Microsecond }},
		{"MonitorInterval", func(c *Config) { c.MonitorInterval = time.Millisecond }},
		{"MonitorInterval", func(c *Config) { c.MonitorInterval = -time.Second }},
		{"PingTimeout", func(c *Config) { c.PingTimeout = time.Second; c.HeartbeatInterval = time.Second }},
		{"RetireWindow", func(c *Config) { c.RetireWindow = -time.Second }},
		{"MemoryLowWatermark/MemoryHighWatermark", func(c *Config) { c.MemoryLowWatermark = 0.99 }},
		{"MemoryLowWatermark/MemoryHighWatermark", func(c *Config) { c.MemoryHighWatermark = 1.5 }},
		{"MemoryLowWatermark/MemoryHighWatermark", func(c *Config) { c.MemoryLowWatermark = -0.5 }},
		{"RetiredNice", func(c *Config) { c.RetiredNice = 20 }},
		{"Spares", func(c *Config) { c.Spares = -1 }},
		{"HealthCheckInterval", func(c *Config) { c.HealthCheckInterval = time.Microsecond }},
		{"HealthCheckFailures", func(c *Config) { c.HealthCheckFailures = -1 }},
		{"HTTPAddr", func(c *Config) { c.HTTPAddr = "127.0.0.1" }},
		{"HTTPAddr", func(c *Config) { c.HTTPAddr = "localhost:9100" }},
		{"HTTPAddr", func(c *Config) { c.HTTPAddr = "127.0.0.1:0" }},
		{"HTTPAddr", func(c *Config) { c.HTTPAddr = "[::1]:99999" }},
		{"StableAfter", func(c *Config) { c.StableAfter = -time.Second }},
		{"ReadyTimeout", func(c *Config) { c.ReadyTimeout = time.Minute }},
		{"ReadyTimeout", func(c *Config) { c.WorkerReady, c.ReadyTimeout = true, -time.Second }},
		{"HeapProfileWarmup", func(c *Config) { c.HeapProfileDir, c.HeapProfileWarmup = "/var/tmp/heaps", -time.Second }},
		{"HeapProfileMaxBytes", func(c *Config) { c.HeapProfileDir, c.HeapProfileMaxBytes = "/var/tmp/heaps", -1 }},
		{"HeapProfileWarmup/HeapProfileMaxBytes", func(c *Config) { c.HeapProfileWarmup = time.Minute }},
		{"HeapProfileDir", func(c *Config) { c.HeapProfileDir = "heaps" }},
		{"HandoffTimeout", func(c *Config) { c.HandoffTimeout = -time.Second }},
		{"HandoffTimeout", func(c *Config) { c.WorkerReady, c.ReadyTimeout, c.HandoffTimeout = true, 4*time.Second, 4*time.Second }},
		{"HandoffMaxBytes", func(c *Config) { c.HandoffMaxBytes = -1 }},
		{"BGP.Peers", func(c *Config) { c.BGP.ASN = 65001 }},
		{"BGP.ASN", func(c *Config) { withBGP(c); c.BGP.ASN = 0 }},
		{"BGP.RouterID", func(c *Config) { withBGP(c); c.BGP.RouterID = netip.MustParseAddr("fd00::1") }},
		{"BGP.Addrs", func(c *Config) { withBGP(c); c.Addr = netip.Addr{} }},
		{"BGP.Addrs[0]", func(c *Config) { withBGP(c); c.BGP.Addrs = []netip.Addr{netip.MustParseAddr("224.0.0.1")} }},
		{"BGP.Peers[1].Addr", func(c *Config) { withBGP(c); c.BGP.Peers = append(c.BGP.Peers, c.BGP.Peers[0]) }},
		{"BGP.Peers[0].ASN", func(c *Config) { withBGP(c); c.BGP.Peers[0].ASN = 0 }},
		{"BGP.HoldTime", func(c *Config) { withBGP(c); c.BGP.HoldTime = time.Second }},
		{"BGP.RestartTime", func(c *Config) { withBGP(c); c.BGP.RestartTime = 2 * time.Hour }},
	} {
		c := ok
		tc.edit(&c)
		err := c.Validate() // what Run checks first
		var ce *ConfigError
		if !errors.As(err, &ce) || !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: got %v, want a *ConfigError", tc.field, err)
			continue
		}
		if ce.Field != tc.field || !strings.Contains(err.Error(), "Config."+tc.field) {
			t.Errorf("error %q names field %q, want %q", err, ce.Field, tc.field)
		}
		if ce.Fix == "" {
			t.Errorf("%s: error %q gives no fix", tc.field, err)
		}
	}
	if err := ok.Validate(); err != nil {
		t.Errorf("valid config rejected: %v", err)
	}
	withB := ok
	withBGP(&withB)
	if err := withB.Validate(); err != nil {
		t.Errorf("valid BGP config rejected: %v", err)
	}
	if d := withB.withDefaults().BGP; len(d.Addrs) != 1 || d.Addrs[0] != withB.Addr || d.Peers[0].Port != 179 || d.HoldTime != 9*time.Second {
		t.Errorf("BGP defaults: %+v", d)
	}
	t.Setenv(EnvDev, "maybe")
	if err := ok.Validate(); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), EnvDev) {
		t.Errorf("%s=maybe: Validate says %v, want the error Run gives", EnvDev, err)
	}
	os.Unsetenv(EnvDev)
	c := ok.withDefaults()
	// One number, both protocols: two ports.
	c.Ports = []Port{{Public: 443}, {Public: 443, Proto: UDP}}
	if err := c.validate(); err != nil {
		t.Errorf("TCP 443 and UDP 443 rejected: %v", err)
	}
}

func TestProtocolString(t *testing.T) {
	for p, want := range map[Protocol]string{TCP: "tcp", UDP: "udp", 9: "Protocol(9)"} {
		if got := p.String(); got != want {
			t.Errorf("Protocol(%d).String() = %q, want %q", p, got, want)
		}
		if back, ok := parseProtocol(want); ok != (p <= UDP) || ok && back != p {
			t.Errorf("parseProtocol(%q) = %v, %v", want, back, ok)
		}
	}
	if got := (Port{Public: 443, Proto: UDP}).String(); got != "443/udp" {
		t.Errorf("Port.String() = %q", got)
	}
	var zero Port
	if zero.Proto != TCP {
		t.Error("the zero Port is not TCP")
	}
	// Port keys marshal as text, so events with port maps are JSON.
	b, err := json.Marshal(map[Port]uint16{{Public: 443}: 40001, {Public: 53, Proto: UDP}: 40002})
	if err != nil || string(b) != `{"443/tcp":40001,"53/udp":40002}` {
		t.Errorf("marshal port map: %s %v", b, err)
	}
	var back map[Port]uint16
	if err := json.Unmarshal(b, &back); err != nil || back[Port{Public: 53, Proto: UDP}] != 40002 {
		t.Errorf("unmarshal port map: %v %v", back, err)
	}
	for _, bad := range []string{"0/tcp", "x", "53/sctp", "70000"} {
		var p Port
		if err := p.UnmarshalText([]byte(bad)); err == nil {
			t.Errorf("UnmarshalText(%q) = %v, want an error", bad, p)
		}
	}
}

func TestDefaults(t *testing.T) {
	c := Config{Name: "x", Ports: []Port{{Public: 1}}}.withDefaults()
	if c.Workers < 1 || c.Workers&(c.Workers-1) != 0 {
		t.Errorf("default Workers %d is not a power of two", c.Workers)
	}
	if c.RunDir != DefaultRunDir || c.ConnectTimeout != DefaultConnectTimeout || c.IPv6SlotPrefix != 64 || c.IPv4SlotPrefix != 32 ||
		c.MonitorInterval != DefaultMonitorInterval {
		t.Errorf("defaults not applied: %+v", c)
	}
	if c.MemoryLimit != DefaultMemoryLimit || c.LagLimit != DefaultLagLimit || c.PingTimeout != DefaultPingTimeout ||
		c.StartupGrace != DefaultStartupGrace || c.RetireLimit != DefaultRetireLimit || c.RetireWindow != DefaultRetireWindow ||
		c.DrainTimeout != DefaultDrainTimeout || c.MemoryLowWatermark != DefaultMemoryLowWatermark ||
		c.MemoryHighWatermark != DefaultMemoryHighWatermark || c.RetiredNice != DefaultRetiredNice ||
		c.HealthCheckInterval != DefaultHealthCheckInterval || c.HealthCheckFailures != DefaultHealthCheckFailures {
		t.Errorf("health defaults not applied: %+v", c)
	}
	if c.StableAfter != DefaultStableAfter || c.ReadyTimeout != 0 {
		t.Errorf("StableAfter %s, ReadyTimeout %s: want %s and none without WorkerReady", c.StableAfter, c.ReadyTimeout, DefaultStableAfter)
	}
	if r := (Config{Name: "x", Ports: []Port{{Public: 1}}, WorkerReady: true}).withDefaults(); r.ReadyTimeout != DefaultReadyTimeout || r.validate() != nil {
		t.Errorf("WorkerReady: ReadyTimeout %s, want %s", r.ReadyTimeout, DefaultReadyTimeout)
	}
	if c.HandoffTimeout != DefaultHandoffTimeout || c.HandoffMaxBytes != DefaultHandoffMaxBytes {
		t.Errorf("HandoffTimeout %s, HandoffMaxBytes %d: want the defaults", c.HandoffTimeout, c.HandoffMaxBytes)
	}
	// With WorkerReady the default handoff fits in half the ready timeout,
	// so a worker reading its state before Ready is never killed for it.
	if r := (Config{Name: "x", Ports: []Port{{Public: 1}}, WorkerReady: true, ReadyTimeout: 4 * time.Second, ConnectTimeout: time.Second}).withDefaults(); r.HandoffTimeout != 2*time.Second || r.validate() != nil {
		t.Errorf("WorkerReady, ReadyTimeout 4s: HandoffTimeout %s (%v), want 2s", r.HandoffTimeout, r.validate())
	}
	if err := c.validate(); err != nil {
		t.Error(err)
	}
	if c.HeapProfileDir != "" || c.HeapProfileWarmup != 0 || c.HeapProfileMaxBytes != 0 {
		t.Errorf("heap snapshots on by default: %q %s %d", c.HeapProfileDir, c.HeapProfileWarmup, c.HeapProfileMaxBytes)
	}
	if h := (Config{Name: "x", Ports: []Port{{Public: 1}}, HeapProfileDir: "/var/tmp/heaps"}).withDefaults(); h.HeapProfileWarmup != DefaultHeapProfileWarmup ||
		h.HeapProfileMaxBytes != DefaultHeapProfileMaxBytes || h.validate() != nil {
		t.Errorf("HeapProfileDir set: warm-up %s, cap %d, want %s and %d", h.HeapProfileWarmup, h.HeapProfileMaxBytes, DefaultHeapProfileWarmup, DefaultHeapProfileMaxBytes)
	}
	// Negative values turn the policies off and are valid.
	off := Config{Name: "x", Ports: []Port{{Public: 1}}, MemoryLimit: -1, LagLimit: -1, PingTimeout: -1,
		StartupGrace: -1, RetireLimit: -1, DrainTimeout: -1, MemoryBudget: -1, RetiredNice: -1}.withDefaults()
	if err := off.validate(); err != nil {
		t.Errorf("policies turned off: %v", err)
	}
}
