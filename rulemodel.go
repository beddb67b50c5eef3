package ipcluster

// The backend-neutral model of the rules: the address families, the
// routing derived from Config (which bits of a client's address pick its
// slot), the slot targets, and the ruleBackend interface every backend
// implements. The part that drives a backend, deciding when to write,
// retrying and cleaning conntrack after a write, is ruleSync (rules.go);
// the backends are in nftables.go and iptables.go.
//
// Not Linux-only, unlike rules.go: the iptables rule generator (and its
// fuzz tests) build on every platform.

import (
	"context"
	"maps"
	"net/netip"
	"strconv"
	"strings"
)

// family is one address family and the iptables binaries that manage it.
type family struct {
	name    string // "ipv4" or "ipv6", as in logs and status
	bits    int    // address length in bits
	cmd     string // iptables or ip6tables
	restore string
	save    string
}

var (
	familyIPv4 = &family{name: "ipv4", bits: 32, cmd: "iptables", restore: "iptables-restore", save: "iptables-save"}
	familyIPv6 = &family{name: "ipv6", bits: 128, cmd: "ip6tables", restore: "ip6tables-restore", save: "ip6tables-save"}
)

// ruleBackend is the seam between the rule sync (rules.go) and the kernel:
// it places each slot's listeners, so that a new connection from a client
// of the slot reaches them, and keeps them placed. Three implement it: two
// by DNAT to the worker's own port, nftWriter (nftables.go, nf_tables over
// netlink) and ruleWriter (iptables.go, iptables-restore), and bpfWriter
// (bpf.go), which points an SO_REUSEPORT group's BPF program at the
// slot's socket, found from the slot target (see slotTarget).
// fakeBackend (rules_fake_test.go) is the in-memory one the rule sync's
// unit tests use.
//
// A backend is used only from the master's loop goroutine, through its
// ruleSync, and shares the ruleSync's routing read-only.
type ruleBackend interface {
	// apply places each slot's listeners (targets[slot]; nil: the slot
	// gets no route) in one atomic change per kernel interface; the
	// first call replaces whatever a crashed master left. workers are the
	// listeners of every live worker: unless Config.AllowDirect, the
	// nftables backend refuses direct connections to them (the iptables
	// backend does not).
	apply(ctx context.Context, targets, workers []slotTarget) error
	// remove deletes everything the cluster owns; idempotent.
	remove(ctx context.Context) error
	// check reports, wrapping ErrRulesLost, when the kernel no longer
	// holds the rules the master believes in (say, an operator's `nft
	// flush ruleset`); the next apply then writes them whole again. Cheap
	// enough to call every few seconds.
	check(ctx context.Context) error
	// routes reads the slots' routes from the kernel, not from the
	// writer's belief: what a starting master finds left by the master
	// before it. A slot with no route, or whose families disagree, is nil.
	routes(ctx context.Context) ([]slotTarget, error)
	// invalidate forgets what the writer believes the kernel holds, so
	// that the next apply replaces the cluster's rules whole: after a
	// resize changed the slot mask, which every rule or key embeds.
	invalidate()
	// rulesText renders the rules the master believes in, per family.
	rulesText() map[string]string
	// changes counts the kernel operations so far: iptables processes, or
	// nf_tables netlink transactions.
	changes() int
}

// routing is everything the rule generator needs, derived once from Config.
// Its owner is the master's ruleSync; the backends it made read it. Only
// the slot count changes, and only through ruleSync.resize, which tells
// the backend in the same call.
type routing struct {
	name     string
	chain    string // IPC-<name>
	addr     netip.Addr
	families []*family
	workers  int
	prefix   map[*family]int // slot bits are the low bits of the first prefix bits
	ports    []Port          // public ports, in Config order
	guard    bool            // refuse direct connections to worker ports (nftables only)
	bpf      bool            // the bpf backend: the sockets are in reuseport groups (bpf.go)
}

// slotAddr is the address whose only set bits are v in the slot bits of
// family f: a slot's masked source address, or with v = workers-1 the mask.
func (r *routing) slotAddr(f *family, v int) netip.Addr {
	return shiftedAddr(f, uint64(v), uint(f.bits-r.prefix[f]))
}

// shiftedAddr is the address whose only set bits are v << shift.
func shiftedAddr(f *family, v uint64, shift uint) netip.Addr {
	var b [16]byte
	n := f.bits / 8
	// v has at most 8 significant bits (256 workers), so it touches at most
	// two bytes once shifted.
	for i := 0; i < n; i++ {
		bitPos := uint(n-1-i) * 8 // weight of byte i's lowest bit
		if bitPos+8 <= shift || bitPos >= shift+16 {
			continue
		}
		var x uint64
		if bitPos >= shift {
			x = v >> (bitPos - shift)
		} else {
			x = v << (shift - bitPos)
		}
		b[i] = byte(x)
	}
	if f.bits == 32 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16(b)
}

// slotTarget is where a slot's new connections go: for each public port,
// the listener of the worker that serves the slot. A nil map means the
// slot has no ready worker and gets no route.
//
// A listener is named by the port it is bound to: all a nat rule can
// steer to. The bpf backend, which needs the socket itself, takes the
// port of the worker's own second socket as the name and finds the
// master's sockets by it (bpfWriter.resolve, master.findSockets), so the
// rule sync and the master pass slot targets alike for every backend.
type slotTarget map[Port]uint16

// agreeingRoutes keeps the slots whose route covers every public port and
// is the same in every family.
func agreeingRoutes(perFamily [][]slotTarget, r *routing) []slotTarget {
	out := make([]slotTarget, r.workers)
	for slot := range out {
		t := perFamily[0][slot]
		if len(t) != len(r.ports) {
			continue
		}
		same := true
		for _, other := range perFamily[1:] {
			same = same && maps.Equal(t, other[slot])
		}
		if same {
			out[slot] = t
		}
	}
	return out
}

// portsString is a compact public→worker port list for logs.
func portsString(t slotTarget, order []Port) string {
	parts := make([]string, 0, len(order))
	for _, p := range order {
		if w, ok := t[p]; ok {
			parts = append(parts, p.String()+"→"+strconv.Itoa(int(w)))
		}
	}
	return strings.Join(parts, ",")
}
