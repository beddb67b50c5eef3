//go:build linux

package ipcluster

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// flow is a DNATed conntrack entry as the kernel reports it: the client
// sent to public, the worker on wport answers.
func flow(proto uint8, public, wport uint16) *netlink.ConntrackFlow {
	client, server := net.ParseIP("198.18.1.1"), net.ParseIP("198.18.0.1")
	return &netlink.ConntrackFlow{
		FamilyType: unix.AF_INET,
		Forward:    netlink.IPTuple{Protocol: proto, SrcIP: client, SrcPort: 51234, DstIP: server, DstPort: public},
		Reverse:    netlink.IPTuple{Protocol: proto, SrcIP: server, SrcPort: wport, DstIP: client, DstPort: 51234},
	}
}

func TestUDPFlowFilterMatchesOnlyMovedUDP(t *testing.T) {
	f := staleFlows{udp: map[movedFlow]bool{{Public: 8080, Worker: 40001}: true, {Public: 53, Worker: 40002}: true}}
	for _, tc := range []struct {
		name string
		flow *netlink.ConntrackFlow
		want bool
	}{
		{"moved UDP flow", flow(unix.IPPROTO_UDP, 8080, 40001), true},
		{"second moved port", flow(unix.IPPROTO_UDP, 53, 40002), true},
		{"TCP with the same ports", flow(unix.IPPROTO_TCP, 8080, 40001), false},
		{"UDP to another worker port", flow(unix.IPPROTO_UDP, 8080, 40003), false},
		{"pairs do not mix", flow(unix.IPPROTO_UDP, 8080, 40002), false},
		{"not DNATed by us", flow(unix.IPPROTO_UDP, 40001, 40001), false},
		{"other protocol", flow(unix.IPPROTO_SCTP, 8080, 40001), false},
	} {
		if got := f.MatchConntrackFlow(tc.flow); got != tc.want {
			t.Errorf("%s: match = %v, want %v", tc.name, got, tc.want)
		}
	}
	if got := f.String(); got != "53/udp→40002,8080/udp→40001" {
		t.Errorf("String() = %q", got)
	}
}

// fakeConntrack records what the master asks to delete.
type fakeConntrack struct {
	calls []string // family: filter
	fail  error
}

func (c *fakeConntrack) delete(f *family, filter netlink.CustomConntrackFilter) (uint, error) {
	c.calls = append(c.calls, f.name+": "+filter.(staleFlows).String())
	return 3, c.fail
}

func testMaster(t *testing.T, cfg Config, ct *fakeConntrack) *master {
	t.Helper()
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	m := newState(&cfg, "")
	m.rules = newRuleSync(testRouting(t, cfg), &fakeBackend{}, m.log, func(Event) {}, func(event) {})
	m.rules.conntrack, m.rules.installed = ct.delete, true
	return m
}

// Only UDP ports whose slot now points elsewhere are cleaned, once, in
// every family; TCP ports and unchanged slots never are.
func TestMovedUDPFlowsAreCleanedOnce(t *testing.T) {
	ct := &fakeConntrack{}
	m := testMaster(t, Config{Name: "chat", Workers: 4, Ports: []Port{tcp8080, udp8080}}, ct)
	clean := func(want string) {
		t.Helper()
		ct.calls = nil
		m.rules.cleanConntrack()
		if want == "" && len(ct.calls) != 0 || want != "" && strings.Join(ct.calls, "\n") != "ipv4: "+want+"\nipv6: "+want {
			t.Errorf("deleted:\n%s\nwant %s in both families", strings.Join(ct.calls, "\n"), want)
		}
	}
	old := targetsForPorts(4, []Port{tcp8080, udp8080})
	m.rules.noteMovedUDP(nil, old) // the first write moves nothing
	clean("")

	now := targetsForPorts(4, []Port{tcp8080, udp8080})
	now[1] = slotTarget{tcp8080: 41000, udp8080: 41001} // replaced or retired
	now[2] = nil                                        // lost its worker: rules removed
	now[3] = slotTarget{tcp8080: 42000, udp8080: 40031} // same UDP port: nothing moved
	m.rules.noteMovedUDP(old, now)
	clean("8080/udp→40011,8080/udp→40021")
	clean("") // done: nothing is deleted twice

	// Slot 2 gets a worker again: its flows were not DNATed meanwhile.
	next := slices.Clone(now)
	next[2] = slotTarget{tcp8080: 43000, udp8080: 43001}
	m.rules.noteMovedUDP(now, next)
	clean("")
}

// A failure is a warning: the master goes on, and other families are
// still cleaned.
func TestConntrackFailureIsNotFatal(t *testing.T) {
	ct := &fakeConntrack{fail: errors.New("netlink: operation not permitted")}
	m := testMaster(t, Config{Name: "chat", Workers: 2, Ports: []Port{udp8443}}, ct)
	var logs strings.Builder
	m.rules.log = slog.New(slog.NewTextHandler(&logs, nil))
	m.rules.noteMovedUDP(targetsForPorts(2, []Port{udp8443}), []slotTarget{nil, nil})
	m.rules.cleanConntrack()
	if len(ct.calls) != 2 {
		t.Errorf("families tried: %v, want ipv4 and ipv6", ct.calls)
	}
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "operation not permitted") {
		t.Errorf("failure not logged as a warning:\n%s", logs.String())
	}
}

// Adopted workers' UDP flows are cleaned after this master's first write,
// not before: until then the earlier master's rules may still route to
// them.
func TestAdoptedUDPFlowsWaitForFirstInstall(t *testing.T) {
	ct := &fakeConntrack{}
	m := testMaster(t, Config{Name: "chat", Workers: 2, Ports: []Port{tcp8080, udp8080}, Addr: netip.MustParseAddr("198.18.0.1")}, ct)
	m.rules.installed = false
	m.rules.noteAdoptedUDP(slotTarget{tcp8080: 39000, udp8080: 39001})
	m.rules.cleanConntrack()
	if len(ct.calls) != 0 {
		t.Fatalf("cleaned before the first install: %v", ct.calls)
	}
	m.rules.installed = true
	m.rules.cleanConntrack()
	if want := "ipv4: 8080/udp→39001"; strings.Join(ct.calls, "\n") != want {
		t.Errorf("deleted %v, want %s", ct.calls, want)
	}
}
