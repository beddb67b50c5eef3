//go:build linux

package ipcluster

// Conntrack cleanup for UDP ports.
//
// The nat chain only sees a flow's first packet; conntrack keeps its
// translation for every later one, in both directions. For TCP that is the
// point: an established connection stays with the worker that accepted it
// while the slot moves. UDP has no connection to keep, yet conntrack keeps a
// UDP flow (same addresses and ports) pinned just the same, for as long as
// datagrams keep coming (the entry's timeout, 30s unreplied or 120s once
// replied, restarts with each one). So a client that keeps sending from one
// socket would keep reaching a dead worker's port, or a retired one, and
// never the slot's new worker.
//
// After a rule write that points a slot's UDP port away from a worker port,
// the master deletes the UDP entries whose reply tuple comes from that worker
// port: the next datagram of such a flow finds no entry, traverses nat again
// and is DNATed to the port the slot now has. TCP entries are never matched.
//
// Hazards:
//   - Order: delete only after the rules are written; deleted before, an
//     entry is recreated at once from the old rule.
//   - A datagram the kernel is processing while the entries are dumped may
//     still create an entry from the old rule after the dump: that flow stays
//     pinned until it goes idle. The window is the length of one packet's
//     trip through netfilter.
//   - A retired worker's reply to a datagram it read before the swap leaves
//     after the entry is gone: nothing translates its source port back to the
//     public port, and a client with a connected socket drops it. UDP
//     applications retry; the alternative, leaving the flow on the retired
//     worker, would never move it.
//   - The netlink socket belongs to the namespace of the thread that opens
//     it. The master runs wholly in one network namespace (the one whose nat
//     table it writes), so any thread is the right one.

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// movedFlow names the UDP conntrack entries of one public port that the
// rules used to DNAT to Worker: original destination port Public, reply
// source port Worker.
type movedFlow struct{ Public, Worker uint16 }

// staleFlows matches the conntrack entries the rules no longer want, in
// one dump of the table. It implements netlink.CustomConntrackFilter.
//
//   - udp: flows moved away from a worker port (see above).
//   - tcp: the ports of workers that exited. Such an entry can only
//     misroute: conntrack does not reopen an entry closed by a reset from
//     the server side (a crashed worker's, or the kernel's for its dead
//     port) when the client reuses its source port within the entry's 10s,
//     so the client's new SYN follows the old translation to the dead port
//     and is refused again, long after the slot moved. Deleted, the SYN goes
//     through nat to the slot's new worker. Established connections to a
//     dead worker are dead already; a live worker's are never matched.
type staleFlows struct {
	udp, tcp map[movedFlow]bool
	matched  *[2]uint // UDP and TCP entries matched, for the logs
}

// MatchConntrackFlow matches an entry whose reply comes from a listed
// worker port of its protocol. The public port must match too, so an
// unrelated flow that happens to use the same port number elsewhere (say,
// an outgoing query to a server on that port) is left alone.
func (f staleFlows) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	key := movedFlow{Public: flow.Forward.DstPort, Worker: flow.Reverse.SrcPort}
	i := 0
	switch {
	case flow.Forward.Protocol == unix.IPPROTO_UDP && f.udp[key]:
	case flow.Forward.Protocol == unix.IPPROTO_TCP && f.tcp[key]:
		i = 1
	default:
		return false
	}
	if f.matched != nil {
		f.matched[i]++
	}
	return true
}

func (f staleFlows) String() string {
	parts := make([]string, 0, len(f.udp)+len(f.tcp))
	for m := range f.udp {
		parts = append(parts, strconv.Itoa(int(m.Public))+"/udp→"+strconv.Itoa(int(m.Worker)))
	}
	for m := range f.tcp {
		parts = append(parts, strconv.Itoa(int(m.Public))+"/tcp→"+strconv.Itoa(int(m.Worker)))
	}
	slices.Sort(parts)
	return strings.Join(parts, ",")
}

// conntrackDeleter deletes the entries of family f that filter matches and
// returns how many it deleted. The real one speaks netlink; tests of the
// master's bookkeeping can use a fake.
type conntrackDeleter func(f *family, filter netlink.CustomConntrackFilter) (uint, error)

// deleteConntrack is the deleter masters use.
var deleteConntrack conntrackDeleter = netlinkConntrackDelete

// netlinkConntrackDelete dumps the family's conntrack table and deletes the
// matching entries, through one netlink socket opened in the calling
// thread's (the master's) network namespace.
func netlinkConntrackDelete(f *family, filter netlink.CustomConntrackFilter) (uint, error) {
	h, err := netlink.NewHandle(unix.NETLINK_NETFILTER)
	if err != nil {
		return 0, fmt.Errorf("open netfilter netlink socket: %w", err)
	}
	defer h.Close()
	fam := netlink.InetFamily(unix.AF_INET)
	if f == familyIPv6 {
		fam = netlink.InetFamily(unix.AF_INET6)
	}
	n, err := h.ConntrackDeleteFilters(netlink.ConntrackTable, fam, filter)
	if err != nil {
		return n, fmt.Errorf("delete %s conntrack entries: %w", f.name, err)
	}
	return n, nil
}

// noteMovedUDP records, after a successful rule write from old to now, the
// worker ports that a slot's UDP port no longer points at.
//
// A slot that had no rule has no DNATed entries to move. Its flows reached
// the public port untranslated; where nothing listens there, the kernel
// answers with ICMP port unreachable and (6.18, as tested) drops the
// unreplied entry, so they do not stick either.
func (s *ruleSync) noteMovedUDP(old, now []slotTarget) {
	for slot, t := range old {
		for pub, wport := range t {
			if pub.Proto != UDP {
				continue
			}
			var next uint16
			if slot < len(now) {
				next = now[slot][pub]
			}
			if next != wport {
				s.udpMoved[movedFlow{Public: pub.Public, Worker: wport}] = true
			}
		}
	}
}

// noteAdoptedUDP records the UDP ports of a worker the rules will never
// point at: adopted from an earlier master, whose rules may have pinned
// flows to it, or stopping.
func (s *ruleSync) noteAdoptedUDP(ports slotTarget) {
	for pub, wport := range ports {
		if pub.Proto == UDP {
			s.udpMoved[movedFlow{Public: pub.Public, Worker: wport}] = true
		}
	}
}

// noteStoppingUDP records, once the rules are removed for a graceful stop,
// the UDP flows of every worker (workers, their listeners): told to
// finish, they close their UDP sockets at once. Kept, those entries would
// pin the flows to dead ports across a restart, for as long as the clients
// keep sending; deleted, the flows reach the public port and, once a
// master runs again, its rules.
func (s *ruleSync) noteStoppingUDP(workers []slotTarget) {
	for _, t := range workers {
		s.noteAdoptedUDP(t)
	}
}

// cleanConntrack deletes, in every family served, the conntrack entries of
// the UDP flows whose worker port the installed rules no longer point at,
// and those of exited workers' TCP ports once no route points at them
// (until then new entries would be made to them again). A failure is
// logged, not fatal: those flows stay where they are until their entries
// expire, which is what they would do without this cleanup.
func (s *ruleSync) cleanConntrack() {
	if !s.installed {
		return
	}
	filter := staleFlows{udp: s.udpMoved, tcp: map[movedFlow]bool{}}
	routed := map[movedFlow]bool{}
	for _, t := range s.routed {
		for pub, wport := range t {
			if pub.Proto == TCP {
				routed[movedFlow{Public: pub.Public, Worker: wport}] = true
			}
		}
	}
	for fl := range s.deadTCP {
		if !routed[fl] {
			filter.tcp[fl] = true
			delete(s.deadTCP, fl)
		}
	}
	if len(filter.udp)+len(filter.tcp) == 0 {
		return
	}
	s.udpMoved = map[movedFlow]bool{}
	for _, f := range s.rt.families {
		t0 := time.Now()
		filter.matched = new([2]uint)
		_, err := s.conntrack(f, filter)
		if err != nil {
			s.log.Warn("could not delete the conntrack entries of moved UDP flows or exited workers' TCP ports; they stay until they expire",
				"family", f.name, "flows", filter.String(), "err", err)
			continue
		}
		if len(filter.udp) > 0 {
			s.log.Info("deleted conntrack entries of moved UDP flows",
				"family", f.name, "flows", staleFlows{udp: filter.udp}.String(), "deleted", filter.matched[0], "elapsed", time.Since(t0))
		}
		if filter.matched[1] > 0 {
			s.log.Debug("deleted conntrack entries of exited workers' TCP ports",
				"family", f.name, "ports", staleFlows{tcp: filter.tcp}.String(), "deleted", filter.matched[1])
		}
	}
}

// noConntrack is the bpf backend's conntrackDeleter: without NAT no
// entry routes anything, so none is deleted.
func noConntrack(*family, netlink.CustomConntrackFilter) (uint, error) { return 0, nil }

// noteDeadTCP records the TCP ports of a worker that exited, for
// cleanConntrack.
func (s *ruleSync) noteDeadTCP(ports slotTarget) {
	if s.deadTCP == nil {
		s.deadTCP = map[movedFlow]bool{}
	}
	for pub, wport := range ports {
		if pub.Proto == TCP {
			s.deadTCP[movedFlow{Public: pub.Public, Worker: wport}] = true
		}
	}
}
