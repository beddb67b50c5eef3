//go:build linux

package ipcluster

// The nftables rule writer, spoken over netlink with no helper process.
// The cluster owns one inet table, ipcluster-<name>, holding per family
// one map from (client address & slot mask, protocol, public port) to the
// worker port, and a rule per family in a nat prerouting chain (remote
// clients) and a nat output chain (clients on this host):
//
//	table inet ipcluster-chat {
//		map slots4 {
//			type ipv4_addr . inet_proto . inet_service : inet_service
//			elements = { 0.0.0.1 . tcp . 8080 : 40123, ... }
//		}
//		chain prerouting {
//			type nat hook prerouting priority dstnat;
//			meta nfproto ipv4 [ip daddr 198.18.0.1] fib daddr type local
//				dnat ip to ip saddr & 0.0.0.3 . meta l4proto . th dport map @slots4
//		}
//		chain output { type nat hook output priority dstnat; ... the same }
//
//		set workers { type inet_proto . inet_service; elements = { tcp . 40123, ... } }
//		chain input {
//			type filter hook input priority filter;
//			ct state new ct status & dnat == 0 meta mark != 0x69706300
//				meta l4proto . th dport @workers reject
//		}
//	}
//
// The input chain (absent with Config.AllowDirect) refuses new connections
// and UDP flows to a worker's own port that did not come through the
// cluster's routes. A client that could reach a worker port directly would
// bypass its slot; worse, the conntrack entry such a connection leaves
// (120 s in TIME_WAIT) holds the reply tuple a routed connection from the
// same client port needs, so NAT silently rewrites the routed connection's
// client port, which can land on a worker TIME_WAIT socket of another
// connection: a stale ACK, a reset, and a 1-second SYN retransmission.
// Connections made on this host with DialWorker carry WorkerDialMark and
// are let through: health checks must reach a worker itself.
//
// Why a map rather than a rule per slot: a new connection's first packet
// costs one hash lookup whatever the number of slots, where the iptables
// chain is walked rule by rule (512 rules for 256 slots and 2 ports). And
// why netlink: a change is one nf_tables transaction for both families
// (pointing a slot at a new worker deletes and adds that slot's map
// elements), where iptables-nft-restore is a process per family that first
// reads the whole nat table. Every transaction is atomic: a slot never has
// no route, and a crashed master's table is replaced, not patched.
//
// Only a connection's first packet traverses nat; conntrack keeps its
// translation, so rewriting the map never moves an established connection.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// nftKey is one map element's key: a slot's masked source address, the
// protocol and the public port.
type nftKey struct {
	slot  int
	proto byte
	port  uint16
}

// guardKey is one element of the workers set: a worker port.
type guardKey struct {
	proto byte
	port  uint16
}

func (k guardKey) bytes() []byte {
	// As the rule loads it: each part in a whole 32-bit register.
	return append(binary.BigEndian.AppendUint16([]byte{k.proto, 0, 0, 0}, k.port), 0, 0)
}

// nftErr is an NFTablesError about the writer's table.
func (w *nftWriter) nftErr(op, set string, err error) error {
	return &NFTablesError{Op: op, Family: nftFamilyName(w.tbl.Family), Table: w.tbl.Name, Set: set, Err: err}
}

// nftWriter implements ruleBackend with nf_tables over netlink. It is used
// only from the master's state goroutine.
type nftWriter struct {
	r    *routing
	conn *nftables.Conn
	tbl  *nftables.Table
	// installed is the content of every family's map in the kernel: the
	// routes the master believes in. nil until the first install.
	installed map[nftKey]uint16
	// guarded is the content of the workers set: the worker ports
	// refused to direct connections. Unused with Config.AllowDirect.
	guarded map[guardKey]bool
	txns    int // netlink transactions sent, for status and benchmarks
}

// nftNewConn opens the netlink connection the writer uses; tests and
// benchmarks open one inside their namespace instead.
func nftNewConn() (*nftables.Conn, error) {
	c, err := nftables.New(nftables.AsLasting())
	if err != nil {
		return nil, &NFTablesError{Op: "open nf_tables netlink socket", Err: err}
	}
	return c, nil
}

func newNFTWriter(r *routing, conn *nftables.Conn) *nftWriter {
	return &nftWriter{
		r:    r,
		conn: conn,
		tbl:  &nftables.Table{Name: nftTableName(r.name), Family: nftables.TableFamilyINet},
	}
}

func nftTableName(cluster string) string { return "ipcluster-" + cluster }

// nftProbe reports whether the kernel can hold the cluster's table in the
// caller's network namespace, the test for choosing the backend: it sends
// a transaction that creates the whole table under another name and
// deletes it again, so the kernel checks (and loads the modules of) every
// expression the real table uses, and nothing is left behind.
func nftProbe(conn *nftables.Conn, r *routing) error {
	w := newNFTWriter(r, conn)
	w.tbl.Name = "ipcluster-probe-" + r.name
	if err := w.queueTable(nil, nil); err != nil {
		return err
	}
	conn.DelTable(w.tbl)
	if err := conn.Flush(); err != nil {
		return w.nftErr("create and delete a test", "", err)
	}
	return nil
}

// ipproto is the IP protocol number, as meta l4proto loads it.
func (p Protocol) ipproto() byte {
	if p == UDP {
		return unix.IPPROTO_UDP
	}
	return unix.IPPROTO_TCP
}

func (f *family) nfproto() byte {
	if f.bits == 32 {
		return unix.NFPROTO_IPV4
	}
	return unix.NFPROTO_IPV6
}

func (f *family) mapName() string {
	if f.bits == 32 {
		return "slots4"
	}
	return "slots6"
}

func (w *nftWriter) set(f *family) *nftables.Set {
	addrType := nftables.TypeIPAddr
	if f.bits == 128 {
		addrType = nftables.TypeIP6Addr
	}
	return &nftables.Set{
		Table:    w.tbl,
		Name:     f.mapName(),
		IsMap:    true,
		KeyType:  nftables.MustConcatSetType(addrType, nftables.TypeInetProto, nftables.TypeInetService),
		DataType: nftables.TypeInetService,
	}
}

// slotMask is the source mask of family f as bytes: the slot bits (none for
// one worker: every address is slot 0).
func (r *routing) slotMask(f *family) []byte {
	return r.slotAddr(f, r.workers-1).AsSlice()
}

// keyBytes encodes k the way the rule builds its lookup key: each part of a
// concatenation fills whole 32-bit registers, zero-padded.
func (w *nftWriter) keyBytes(f *family, k nftKey) []byte {
	addr := w.r.slotAddr(f, k.slot).AsSlice()
	b := make([]byte, 0, len(addr)+8)
	b = append(b, addr...)
	b = append(b, k.proto, 0, 0, 0)
	b = binary.BigEndian.AppendUint16(b, k.port)
	return append(b, 0, 0)
}

// want returns the map content that routes each slot to its target.
func (w *nftWriter) want(targets []slotTarget) map[nftKey]uint16 {
	m := map[nftKey]uint16{}
	for slot, t := range targets {
		for _, pub := range w.r.ports {
			if wport, ok := t[pub]; ok {
				m[nftKey{slot: slot, proto: pub.Proto.ipproto(), port: pub.Public}] = wport
			}
		}
	}
	return m
}

func (w *nftWriter) elems(f *family, m map[nftKey]uint16, keys []nftKey) []nftables.SetElement {
	out := make([]nftables.SetElement, 0, len(keys))
	for _, k := range keys {
		out = append(out, nftables.SetElement{Key: w.keyBytes(f, k), Val: binaryutil.BigEndian.PutUint16(m[k])})
	}
	return out
}

// rule returns the expressions of family f's rule: build the key from the
// packet, look it up in the map, and DNAT to the port found, keeping the
// destination address (like iptables' DNAT --to-destination :port).
func (w *nftWriter) rule(f *family, chain *nftables.Chain, set *nftables.Set) *nftables.Rule {
	// Registers: a concatenation starts at the first 32-bit register and
	// each part takes whole registers, matching keyBytes.
	const keyReg = 8 // NFT_REG32_00
	addrLen := uint32(f.bits / 8)
	saddrOff, daddrOff := uint32(12), uint32(16)
	if f.bits == 128 {
		saddrOff, daddrOff = 8, 24
	}
	protoReg := keyReg + addrLen/4
	ex := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{f.nfproto()}},
	}
	if w.r.addr.IsValid() && !w.r.addr.IsUnspecified() {
		ex = append(ex,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: daddrOff, Len: addrLen},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: w.r.addr.AsSlice()})
	}
	ex = append(ex,
		&expr.Payload{DestRegister: keyReg, Base: expr.PayloadBaseNetworkHeader, Offset: saddrOff, Len: addrLen},
		&expr.Bitwise{SourceRegister: keyReg, DestRegister: keyReg, Len: addrLen,
			Mask: w.r.slotMask(f), Xor: make([]byte, addrLen)},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: protoReg},
		&expr.Payload{DestRegister: protoReg + 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Lookup{SourceRegister: keyReg, DestRegister: 1, IsDestRegSet: true, SetName: set.Name, SetID: set.ID},
		// Only traffic to a local address, as the iptables backend's
		// addrtype match: forwarded traffic passing through is not ours.
		// After the lookup, so other traffic pays no FIB lookup.
		&expr.Fib{Register: 2, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 2, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: uint32(f.nfproto()), RegProtoMin: 1, RegProtoMax: 1, Specified: true},
	)
	return &nftables.Rule{Table: w.tbl, Chain: chain, Exprs: ex}
}

// apply makes the kernel's maps route each slot to its target: the first
// call replaces whatever table a crashed master left with a complete new
// one; later calls send only the elements that changed. One transaction.
func (w *nftWriter) apply(ctx context.Context, targets, workers []slotTarget) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	want := w.want(targets)
	guard := w.wantGuard(workers)
	if w.installed == nil {
		return w.install(want, guard)
	}
	changed, err := w.queueGuard(guard)
	if err != nil {
		return err
	}
	// The keys are the same in every family's map: diff once.
	have := w.installed
	var del, add []nftKey
	for k, v := range have {
		if nv, ok := want[k]; !ok || nv != v {
			del = append(del, k)
		}
	}
	for k, v := range want {
		if ov, ok := have[k]; !ok || ov != v {
			add = append(add, k)
		}
	}
	if len(del)+len(add) > 0 {
		changed = true
		for _, f := range w.r.families {
			// Deleting and re-adding a key in one transaction swaps it
			// atomically: no packet sees the map without it.
			if err := w.queueElems(w.set(f), w.elems(f, have, del), w.elems(f, want, add)); err != nil {
				return err
			}
		}
	}
	if !changed {
		return nil
	}
	return w.commit("update routes in", want, guard)
}

// queueElems queues the deletion of del and the addition of add to set.
func (w *nftWriter) queueElems(set *nftables.Set, del, add []nftables.SetElement) error {
	if len(del) > 0 {
		if err := w.conn.SetDeleteElements(set, del); err != nil {
			return w.nftErr("update", set.Name, err)
		}
	}
	if len(add) > 0 {
		if err := w.conn.SetAddElements(set, add); err != nil {
			return w.nftErr("update", set.Name, err)
		}
	}
	return nil
}

// commit sends the queued transaction and, once the kernel has taken it,
// records want and guard as what the kernel holds.
func (w *nftWriter) commit(what string, want map[nftKey]uint16, guard map[guardKey]bool) error {
	w.txns++
	if err := w.conn.Flush(); err != nil {
		return w.nftErr(what, "", err)
	}
	w.installed, w.guarded = want, guard
	return nil
}

// wantGuard returns the workers set's content for the given workers' port
// maps, or nil when direct connections are allowed.
func (w *nftWriter) wantGuard(workers []slotTarget) map[guardKey]bool {
	if !w.r.guard {
		return nil
	}
	m := map[guardKey]bool{}
	for _, t := range workers {
		for pub, wport := range t {
			m[guardKey{proto: pub.Proto.ipproto(), port: wport}] = true
		}
	}
	return m
}

// queueGuard queues the changes that make the workers set hold want, and
// reports whether there were any.
func (w *nftWriter) queueGuard(want map[guardKey]bool) (bool, error) {
	if !w.r.guard {
		return false, nil
	}
	var del, add []nftables.SetElement
	for k := range w.guarded {
		if !want[k] {
			del = append(del, nftables.SetElement{Key: k.bytes()})
		}
	}
	for k := range want {
		if !w.guarded[k] {
			add = append(add, nftables.SetElement{Key: k.bytes()})
		}
	}
	if err := w.queueElems(w.guardSet(), del, add); err != nil {
		return false, err
	}
	return len(del)+len(add) > 0, nil
}

func (w *nftWriter) guardSet() *nftables.Set {
	return &nftables.Set{
		Table:   w.tbl,
		Name:    "workers",
		KeyType: nftables.MustConcatSetType(nftables.TypeInetProto, nftables.TypeInetService),
	}
}

// ipsDstNAT is the conntrack status bit of a destination-NATed connection
// (IPS_DST_NAT in linux/netfilter/nf_conntrack_common.h).
const ipsDstNAT = 1 << 5

// guardRules refuse a new connection (TCP: a reset) or UDP flow (ICMP port
// unreachable) to a worker port unless the cluster's routes translated it.
// Established connections, and a worker's own outgoing ones, are never
// new here.
func (w *nftWriter) guardRules(chain *nftables.Chain, set *nftables.Set) []*nftables.Rule {
	const keyReg = 8 // NFT_REG32_00, as in rule
	var rules []*nftables.Rule
	for _, proto := range []Protocol{TCP, UDP} {
		reject := &expr.Reject{Type: unix.NFT_REJECT_TCP_RST}
		if proto == UDP {
			reject = &expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_PORT_UNREACH}
		}
		rules = append(rules, &nftables.Rule{Table: w.tbl, Chain: chain, Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto.ipproto()}},
			&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
				Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitNEW), Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
			&expr.Ct{Key: expr.CtKeySTATUS, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
				Mask: binaryutil.NativeEndian.PutUint32(ipsDstNAT), Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: make([]byte, 4)},
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(WorkerDialMark)},
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: keyReg},
			&expr.Payload{DestRegister: keyReg + 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Lookup{SourceRegister: keyReg, SetName: set.Name, SetID: set.ID},
			reject,
		}})
	}
	return rules
}

func (w *nftWriter) install(want map[nftKey]uint16, guard map[guardKey]bool) error {
	exists, err := w.exists()
	if err != nil {
		return err
	}
	if exists {
		// A crashed master's table: replaced in the same transaction, so
		// its routes stay in force until the new ones are.
		w.conn.DelTable(w.tbl)
	}
	if err := w.queueTable(want, guard); err != nil {
		return err
	}
	return w.commit("install", want, guard)
}

// queueTable queues the creation of the whole table, routing as want says
// and guarding the worker ports in guard.
func (w *nftWriter) queueTable(want map[nftKey]uint16, guard map[guardKey]bool) error {
	w.conn.AddTable(w.tbl)
	chains := []*nftables.Chain{
		w.conn.AddChain(&nftables.Chain{Name: "prerouting", Table: w.tbl, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest}),
		w.conn.AddChain(&nftables.Chain{Name: "output", Table: w.tbl, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest}),
	}
	keys := slices.Collect(maps.Keys(want))
	for _, f := range w.r.families {
		set := w.set(f)
		if err := w.conn.AddSet(set, w.elems(f, want, keys)); err != nil {
			return w.nftErr("install "+f.name+" map", set.Name, err)
		}
		for _, c := range chains {
			w.conn.AddRule(w.rule(f, c, set))
		}
	}
	if !w.r.guard {
		return nil
	}
	set := w.guardSet()
	elems := make([]nftables.SetElement, 0, len(guard))
	for k := range guard {
		elems = append(elems, nftables.SetElement{Key: k.bytes()})
	}
	if err := w.conn.AddSet(set, elems); err != nil {
		return w.nftErr("install set", set.Name, err)
	}
	input := w.conn.AddChain(&nftables.Chain{Name: "input", Table: w.tbl, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter})
	for _, r := range w.guardRules(input, set) {
		w.conn.AddRule(r)
	}
	return nil
}

func (w *nftWriter) exists() (bool, error) {
	tables, err := w.conn.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, w.nftErr("list tables to find", "", err)
	}
	return slices.ContainsFunc(tables, func(t *nftables.Table) bool { return t.Name == w.tbl.Name }), nil
}

// remove deletes the cluster's table, and with it every route. It is
// idempotent.
func (w *nftWriter) remove(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	exists, err := w.exists()
	if err != nil {
		return err
	}
	if exists {
		w.conn.DelTable(w.tbl)
		w.txns++
		if err := w.conn.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
			return w.nftErr("delete", "", err)
		}
	}
	w.installed, w.guarded = nil, nil
	return nil
}

// rulesText renders each family's map as nft would list its elements, in
// slot order, for status output.
func (w *nftWriter) rulesText() map[string]string {
	if w.installed == nil {
		return nil
	}
	keys := slices.SortedFunc(maps.Keys(w.installed), func(a, b nftKey) int {
		if a.slot != b.slot {
			return a.slot - b.slot
		}
		if a.proto != b.proto {
			return int(a.proto) - int(b.proto)
		}
		return int(a.port) - int(b.port)
	})
	m := make(map[string]string, len(w.r.families))
	for _, f := range w.r.families {
		lines := make([]string, 0, len(keys))
		for _, k := range keys {
			lines = append(lines, w.elemText(f, k, w.installed[k]))
		}
		m[f.name] = strings.Join(lines, "\n")
	}
	return m
}

func (w *nftWriter) elemText(f *family, k nftKey, wport uint16) string {
	key := w.keyBytes(f, k)
	addr, _ := netip.AddrFromSlice(key[:f.bits/8])
	proto := "tcp"
	if k.proto == unix.IPPROTO_UDP {
		proto = "udp"
	}
	return fmt.Sprintf("%s . %s . %d : %d", addr, proto, k.port, wport)
}

func (w *nftWriter) changes() int { return w.txns }

// invalidate makes the next apply install the table anew, replacing the
// old one in the same transaction.
func (w *nftWriter) invalidate() { w.installed, w.guarded = nil, nil }

// routes reads each family's map. No table means no routes.
func (w *nftWriter) routes(ctx context.Context) ([]slotTarget, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if exists, err := w.exists(); err != nil || !exists {
		return make([]slotTarget, w.r.workers), err
	}
	perFamily := make([][]slotTarget, 0, len(w.r.families))
	for _, f := range w.r.families {
		elems, err := w.conn.GetSetElements(w.set(f))
		if err != nil {
			return nil, w.nftErr("read "+f.name+" map", w.set(f).Name, err)
		}
		have := make(map[string][]byte, len(elems))
		for _, e := range elems {
			have[string(e.Key)] = e.Val
		}
		got := make([]slotTarget, w.r.workers)
		for slot := range got {
			for _, pub := range w.r.ports {
				v := have[string(w.keyBytes(f, nftKey{slot: slot, proto: pub.Proto.ipproto(), port: pub.Public}))]
				if len(v) < 2 {
					continue
				}
				if got[slot] == nil {
					got[slot] = slotTarget{}
				}
				got[slot][pub] = binary.BigEndian.Uint16(v)
			}
		}
		perFamily = append(perFamily, got)
	}
	return agreeingRoutes(perFamily, w.r), nil
}

// check compares the kernel's table with the writer's belief: that the
// table exists and each map holds exactly the routes installed. An
// operator's `nft flush ruleset` (which nftables.service runs on every
// reload) deletes every table, ours included; without this check new
// connections would find no route until the master's next change.
func (w *nftWriter) check(ctx context.Context) error {
	if w.installed == nil {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	exists, err := w.exists()
	if err != nil {
		return err
	}
	if !exists {
		w.installed, w.guarded = nil, nil
		return fmt.Errorf("%w: table inet %s is gone (deleted by `nft flush ruleset` or `nft delete table`?)", ErrRulesLost, w.tbl.Name)
	}
	for _, f := range w.r.families {
		elems, err := w.conn.GetSetElements(w.set(f))
		if err != nil {
			return w.nftErr("read "+f.name+" map", w.set(f).Name, err)
		}
		have := make(map[string]string, len(elems))
		for _, e := range elems {
			have[string(e.Key)] = string(e.Val)
		}
		for k, v := range w.installed {
			if have[string(w.keyBytes(f, k))] != string(binary.BigEndian.AppendUint16(nil, v)) {
				w.installed, w.guarded = nil, nil
				return fmt.Errorf("%w: %s map of table inet %s lost or changed the route %s", ErrRulesLost, f.name, w.tbl.Name, w.elemText(f, k, v))
			}
		}
		if len(have) != len(w.installed) {
			w.installed, w.guarded = nil, nil
			return fmt.Errorf("%w: %s map of table inet %s holds %d routes, not the %d written", ErrRulesLost, f.name, w.tbl.Name, len(have), len(w.installed))
		}
	}
	return nil
}
