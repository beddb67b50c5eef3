//go:build linux

package ipcluster

// The start-up scan for other clusters' routes. Two clusters with different
// Names routing the same public port in one network namespace both install
// a nat rule for it, and the kernel sends each new connection to whichever
// is consulted first: the second cluster silently takes the first one's
// clients. So before the master touches anything it reads every ipcluster
// table and chain in its namespace (either backend, both families) and
// refuses to start where one routes a port it would route, on an address
// that overlaps its own:
//
//	other's rules                      how they are read
//	nf_tables inet ipcluster-<Name>    the keys of its slots4/slots6 maps
//	                                   (protocol and port) and the daddr
//	                                   match of its prerouting rules
//	iptables nat IPC-<Name>            iptables-save / ip6tables-save
//
// The cluster's own Name is never a conflict: that is a crashed
// predecessor's rules, or the master it takes over from.
//
// Nat rules that are not ipcluster's (Docker's published ports, a hand-made
// redirect) are read best-effort: a rule that matches a destination port
// (or range) of ours directly and DNATs or redirects is reported as a
// warning, not refused. Such rules may hold matches the scan does not read
// (input interface, marks, sets, a jump from a chain never reached), and a
// refusal there would stop a start the operator knows is fine, with no way
// to override it.
//
// The check is made once, at start: two masters started at the same
// moment may both pass it before either has written its rules.
//
// The scan costs a few netlink dumps; iptables-save runs only when the
// iptables binaries exist and, for iptables-nft, only when the nf_tables
// table they write (ip nat, ip6 nat) exists.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/ipcluster/ipcluster/internal/procfs"
)

// PortInUseError is another cluster's routes for public ports this cluster
// would route, on an overlapping address. It wraps ErrPortInUse.
type PortInUseError struct {
	// Cluster is the other cluster's Name.
	Cluster string
	// Backend is the backend that wrote the rules found.
	Backend Backend
	// Rules names them: "table inet ipcluster-<Name>", or "nat chain
	// IPC-<Name> of iptables" (and/or ip6tables).
	Rules string
	// Ports are this cluster's public ports that the other already routes.
	Ports []Port
	// Addr is the address the other routes them on; the zero Addr means
	// every local address of Families.
	Addr netip.Addr
	// Families are the address families concerned: "ipv4", "ipv6".
	Families []string
	// Remove is the command that deletes the other cluster's rules, for
	// when its master is gone and they are stale.
	Remove string
	// Self is this cluster's Name.
	Self string
}

func (e *PortInUseError) Error() string {
	ports := make([]string, len(e.Ports))
	for i, p := range e.Ports {
		ports[i] = p.String()
	}
	return fmt.Sprintf("%v: %s on %s is routed by cluster %q (%s %s); starting cluster %q there would take its clients. "+
		"Stop cluster %q, or give this one other Config.Ports or a Config.Addr that does not overlap; "+
		"if the master of %q is gone, remove its stale rules with: %s",
		ErrPortInUse, strings.Join(ports, ", "), e.where(), e.Cluster, e.Backend, e.Rules, e.Self,
		e.Cluster, e.Cluster, e.Remove)
}

func (e *PortInUseError) Unwrap() error { return ErrPortInUse }

func (e *PortInUseError) where() string {
	if e.Addr.IsValid() {
		return e.Addr.String()
	}
	if len(e.Families) == 1 {
		return "every local " + familyTitle(e.Families[0]) + " address"
	}
	return "every local address"
}

func familyTitle(name string) string {
	if name == "ipv6" {
		return "IPv6"
	}
	return "IPv4"
}

// routeClaim is what one cluster's rules route in one family: ports on an
// address (the zero Addr: every local address of the family).
type routeClaim struct {
	cluster string
	backend Backend
	fam     *family
	addr    netip.Addr
	ports   []Port
}

// claims returns what this cluster's rules will route.
func (r *routing) claims() []routeClaim {
	addr := r.addr
	if addr.IsUnspecified() {
		addr = netip.Addr{}
	}
	out := make([]routeClaim, 0, len(r.families))
	for _, f := range r.families {
		out = append(out, routeClaim{cluster: r.name, fam: f, addr: addr, ports: r.ports})
	}
	return out
}

// overlap returns the ports both claims route in the same family on an
// address both match: equal addresses, or either one every address.
func overlap(a, b routeClaim) []Port {
	if a.fam != b.fam {
		return nil
	}
	if a.addr.IsValid() && b.addr.IsValid() && a.addr != b.addr {
		return nil
	}
	var out []Port
	for _, p := range a.ports {
		if slices.Contains(b.ports, p) && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

// conflicts returns one PortInUseError per other cluster and backend whose
// claims overlap own's, in the order found. Claims of own's cluster are
// never conflicts.
func conflicts(own, found []routeClaim) []*PortInUseError {
	var out []*PortInUseError
	for _, o := range found {
		if len(own) > 0 && o.cluster == own[0].cluster {
			continue
		}
		var ports []Port
		for _, c := range own {
			for _, p := range overlap(c, o) {
				if !slices.Contains(ports, p) {
					ports = append(ports, p)
				}
			}
		}
		if len(ports) == 0 {
			continue
		}
		i := slices.IndexFunc(out, func(e *PortInUseError) bool { return e.Cluster == o.cluster && e.Backend == o.backend })
		if i < 0 {
			out = append(out, &PortInUseError{Cluster: o.cluster, Backend: o.backend, Addr: o.addr, Self: own[0].cluster})
			i = len(out) - 1
		}
		e := out[i]
		for _, p := range ports {
			if !slices.Contains(e.Ports, p) {
				e.Ports = append(e.Ports, p)
			}
		}
		if !slices.Contains(e.Families, o.fam.name) {
			e.Families = append(e.Families, o.fam.name)
		}
	}
	return out
}

// foreignRule is a nat rule outside ipcluster that DNATs or redirects a
// destination port (or range) in a family (nil: both).
type foreignRule struct {
	where  string   // "nf_tables table ip nat chain PREROUTING" or "iptables nat chain DOCKER"
	rule   string   // the rule, as far as it can be shown
	fam    *family  // nil: any family
	protos []byte   // IPPROTO_TCP, IPPROTO_UDP; empty: any
	lo, hi uint16   // destination port range
	list   []uint16 // or a list of ports (multiport)
}

// matches returns the ports of own that the rule redirects.
func (fr foreignRule) matches(own []routeClaim) []Port {
	var out []Port
	for _, c := range own {
		if fr.fam != nil && fr.fam != c.fam {
			continue
		}
		for _, p := range c.ports {
			if len(fr.protos) > 0 && !slices.Contains(fr.protos, p.Proto.ipproto()) {
				continue
			}
			in := p.Public >= fr.lo && p.Public <= fr.hi && fr.hi > 0
			if in || slices.Contains(fr.list, p.Public) {
				if !slices.Contains(out, p) {
					out = append(out, p)
				}
			}
		}
	}
	return out
}

// routeScan reads the routes of the namespace's clusters and its other nat
// rules. nft nil skips nf_tables; a family missing from saves skips its
// iptables.
type routeScan struct {
	nft *nftables.Conn
	run ruleRunner
	// saves are the families whose iptables-save exists; nftBased that
	// those binaries are iptables-nft, whose rules live in the nf_tables
	// tables ip nat and ip6 nat.
	saves    map[*family]bool
	nftBased bool
	// maxChains bounds the foreign nf_tables chains read, one netlink
	// dump each.
	maxChains int
}

// scanLimitChains is routeScan.maxChains for the master.
const scanLimitChains = 128

// scanResult is what a scan found.
type scanResult struct {
	claims  []routeClaim
	foreign []foreignRule
	removes map[string]string // cluster + "/" + backend → the command that removes its rules
	skipped []string          // what could not be read, for a warning
	noNFT   error             // nf_tables could not be listed at all
}

// scan reads what clusters and other nat rules route in the families of r.
func (s *routeScan) scan(ctx context.Context, r *routing) *scanResult {
	res := &scanResult{removes: map[string]string{}}
	natTables := map[*family]bool{} // nf_tables "ip nat" / "ip6 nat" exist
	nftOK := false
	if s.nft != nil {
		tables, err := s.nft.ListTables()
		if err != nil {
			// A kernel without nf_tables: no table to find there.
			res.noNFT = err
		} else if err := s.scanNFT(r, tables, res, natTables); err != nil {
			res.skipped = append(res.skipped, "nf_tables: "+err.Error())
		} else {
			nftOK = true
		}
	}
	removes := map[string]map[*family][]string{}
	// The families r routes, then the others, only to complete the remove
	// commands of a cluster found in the first: its rules in a family r
	// does not route take no client of r, but they are as stale.
	order := append(slices.Clone(r.families), slices.DeleteFunc([]*family{familyIPv4, familyIPv6},
		func(f *family) bool { return slices.Contains(r.families, f) })...)
	for _, f := range order {
		routed := slices.Contains(r.families, f)
		if !routed && !slices.ContainsFunc(res.claims, func(c routeClaim) bool { return c.backend == BackendIPTables }) {
			break
		}
		if !s.saves[f] || (s.nftBased && nftOK && !natTables[f]) {
			// iptables-nft writes into nf_tables: no nat table there, no
			// iptables nat rule at all.
			continue
		}
		out, err := s.run.save(ctx, f)
		if err != nil {
			res.skipped = append(res.skipped, fmt.Sprintf("%s -t nat: %v", f.save, err))
			continue
		}
		t, err := parseSave(out)
		if err != nil {
			res.skipped = append(res.skipped, fmt.Sprintf("%s -t nat: %v", f.save, err))
			continue
		}
		if routed {
			s.scanSave(f, t, r.name, res, removes)
			continue
		}
		other := &scanResult{}
		s.scanSave(f, t, r.name, other, removes)
	}
	for k, perFamily := range removes {
		var cmds []string
		for _, f := range []*family{familyIPv4, familyIPv6} {
			cmds = append(cmds, perFamily[f]...)
		}
		res.removes[k] = strings.Join(cmds, "; ")
	}
	return res
}

// scanNFT reads the ipcluster tables' maps and the other tables' nat
// chains, and notes which iptables-nft nat tables exist.
func (s *routeScan) scanNFT(r *routing, tables []*nftables.Table, res *scanResult, natTables map[*family]bool) error {
	var foreign []*nftables.Table
	for _, t := range tables {
		switch {
		case t.Family == nftables.TableFamilyIPv4 && t.Name == "nat":
			natTables[familyIPv4] = true
		case t.Family == nftables.TableFamilyIPv6 && t.Name == "nat":
			natTables[familyIPv6] = true
		}
		name, ours := strings.CutPrefix(t.Name, "ipcluster-")
		switch {
		case ours && t.Family == nftables.TableFamilyINet:
			if name == r.name {
				continue
			}
			claims, err := s.nftClaims(t, name, r)
			if err != nil {
				// Say, deleted since the listing: the others still count.
				res.skipped = append(res.skipped, "nf_tables: "+err.Error())
				continue
			}
			res.claims = append(res.claims, claims...)
			res.removes[name+"/"+string(BackendNFTables)] = "nft delete table inet " + t.Name
		case s.nftBased && s.saves[nftFamily(t.Family)] && t.Name == "nat" &&
			(t.Family == nftables.TableFamilyIPv4 || t.Family == nftables.TableFamilyIPv6):
			// iptables-nft's own table: read through iptables-save,
			// which shows its rules as they were written.
		case t.Family == nftables.TableFamilyINet || (nftFamily(t.Family) != nil && slices.Contains(r.families, nftFamily(t.Family))):
			foreign = append(foreign, t)
		}
	}
	if len(foreign) == 0 {
		return nil
	}
	chains, err := s.nft.ListChains()
	if err != nil {
		return fmt.Errorf("list chains: %w", err)
	}
	// Only tables with a nat base chain can translate; read every chain
	// of those (a regular chain is reached by a jump from the base one).
	natTable := map[string]bool{}
	for _, c := range chains {
		if c.Type == nftables.ChainTypeNAT && c.Hooknum != nil {
			natTable[tableKey(c.Table)] = true
		}
	}
	read := 0
	for _, c := range chains {
		if !natTable[tableKey(c.Table)] || !slices.ContainsFunc(foreign, func(t *nftables.Table) bool { return tableKey(t) == tableKey(c.Table) }) {
			continue
		}
		if read == s.maxChains {
			res.skipped = append(res.skipped, fmt.Sprintf("nf_tables: read only the first %d chains of nat tables", s.maxChains))
			break
		}
		read++
		rules, err := s.nft.GetRules(c.Table, c)
		if err != nil {
			return fmt.Errorf("list rules of chain %s %s %s: %w", nftFamilyName(c.Table.Family), c.Table.Name, c.Name, err)
		}
		for _, rule := range rules {
			if fr, ok := nftForeignRule(rule); ok {
				fr.where = fmt.Sprintf("nf_tables table %s %s chain %s", nftFamilyName(c.Table.Family), c.Table.Name, c.Name)
				fr.rule = fmt.Sprintf("handle %d (see nft -a list chain %s %s %s)", rule.Handle, nftFamilyName(c.Table.Family), c.Table.Name, c.Name)
				res.foreign = append(res.foreign, fr)
			}
		}
	}
	return nil
}

func tableKey(t *nftables.Table) string { return nftFamilyName(t.Family) + " " + t.Name }

func nftFamily(f nftables.TableFamily) *family {
	switch f {
	case nftables.TableFamilyIPv4:
		return familyIPv4
	case nftables.TableFamilyIPv6:
		return familyIPv6
	}
	return nil
}

func nftFamilyName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyIPv4:
		return "ip"
	case nftables.TableFamilyIPv6:
		return "ip6"
	case nftables.TableFamilyINet:
		return "inet"
	case nftables.TableFamilyARP:
		return "arp"
	case nftables.TableFamilyBridge:
		return "bridge"
	case nftables.TableFamilyNetdev:
		return "netdev"
	}
	return "family-" + strconv.Itoa(int(f))
}

// nftClaims reads another cluster's table: the ports in each family's map
// and the address its prerouting rules match, if any.
func (s *routeScan) nftClaims(t *nftables.Table, name string, r *routing) ([]routeClaim, error) {
	sets, err := s.nft.GetSets(t)
	if err != nil {
		return nil, fmt.Errorf("list maps of table inet %s: %w", t.Name, err)
	}
	rules, err := s.nft.GetRules(t, &nftables.Chain{Name: "prerouting", Table: t})
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return nil, fmt.Errorf("list rules of table inet %s: %w", t.Name, err)
	}
	addrs := map[*family]netip.Addr{}
	for _, rule := range rules {
		for i := 0; i+1 < len(rule.Exprs); i++ {
			p, ok1 := rule.Exprs[i].(*expr.Payload)
			c, ok2 := rule.Exprs[i+1].(*expr.Cmp)
			if !ok1 || !ok2 || p.Base != expr.PayloadBaseNetworkHeader || c.Op != expr.CmpOpEq || c.Register != p.DestRegister {
				continue
			}
			if a, ok := netip.AddrFromSlice(c.Data); ok &&
				((p.Offset == 16 && p.Len == 4) || (p.Offset == 24 && p.Len == 16)) {
				f := familyIPv4
				if a.Is6() {
					f = familyIPv6
				}
				addrs[f] = a
			}
		}
	}
	var out []routeClaim
	for _, f := range r.families {
		i := slices.IndexFunc(sets, func(s *nftables.Set) bool { return s.Name == f.mapName() })
		if i < 0 {
			continue
		}
		elems, err := s.nft.GetSetElements(sets[i])
		if err != nil {
			return nil, fmt.Errorf("read map %s of table inet %s: %w", f.mapName(), t.Name, err)
		}
		c := routeClaim{cluster: name, backend: BackendNFTables, fam: f, addr: addrs[f]}
		n := f.bits / 8
		for _, e := range elems {
			if len(e.Key) != n+8 {
				continue
			}
			var p Port
			switch e.Key[n] {
			case unix.IPPROTO_TCP:
				p.Proto = TCP
			case unix.IPPROTO_UDP:
				p.Proto = UDP
			default:
				continue
			}
			p.Public = binary.BigEndian.Uint16(e.Key[n+4:])
			if !slices.Contains(c.ports, p) {
				c.ports = append(c.ports, p)
			}
		}
		out = append(out, c)
	}
	return out, nil
}

// nftForeignRule reports whether a rule matches a destination port (or
// range) directly and DNATs or redirects, and with what.
func nftForeignRule(rule *nftables.Rule) (foreignRule, bool) {
	var fr foreignRule
	const (
		loadDport = iota + 1
		loadProto
		loadNFProto
	)
	loaded := map[uint32]int{} // register → what it holds
	found, action := false, false
	for _, e := range rule.Exprs {
		switch e := e.(type) {
		case *expr.Payload:
			switch {
			case e.Base == expr.PayloadBaseTransportHeader && e.Offset == 2 && e.Len == 2:
				loaded[e.DestRegister] = loadDport
			case e.Base == expr.PayloadBaseNetworkHeader && e.Len == 1 && (e.Offset == 9 || e.Offset == 6):
				loaded[e.DestRegister] = loadProto // ip protocol, ip6 nexthdr
			default:
				delete(loaded, e.DestRegister)
			}
		case *expr.Meta:
			switch e.Key {
			case expr.MetaKeyL4PROTO:
				loaded[e.Register] = loadProto
			case expr.MetaKeyNFPROTO:
				loaded[e.Register] = loadNFProto
			default:
				delete(loaded, e.Register)
			}
		case *expr.Cmp:
			if loaded[e.Register] == loadDport {
				if len(e.Data) != 2 {
					return fr, false
				}
				// nft compiles "dport 9000-9100" to two comparisons.
				p := binary.BigEndian.Uint16(e.Data)
				if !found {
					fr.lo, fr.hi, found = 0, 65535, true
				}
				switch e.Op {
				case expr.CmpOpEq:
					fr.lo, fr.hi = max(fr.lo, p), min(fr.hi, p)
				case expr.CmpOpGte:
					fr.lo = max(fr.lo, p)
				case expr.CmpOpGt:
					fr.lo = max(fr.lo, p+1)
				case expr.CmpOpLte:
					fr.hi = min(fr.hi, p)
				case expr.CmpOpLt:
					fr.hi = min(fr.hi, p-1)
				default:
					return fr, false // a negated port match: not read
				}
				continue
			}
			if e.Op != expr.CmpOpEq {
				continue
			}
			switch loaded[e.Register] {
			case loadProto:
				if len(e.Data) == 1 {
					fr.protos = append(fr.protos, e.Data[0])
				}
			case loadNFProto:
				if len(e.Data) == 1 {
					switch e.Data[0] {
					case unix.NFPROTO_IPV4:
						fr.fam = familyIPv4
					case unix.NFPROTO_IPV6:
						fr.fam = familyIPv6
					}
				}
			}
		case *expr.Range:
			if loaded[e.Register] == loadDport {
				if e.Op != expr.CmpOpEq || len(e.FromData) != 2 || len(e.ToData) != 2 {
					return fr, false
				}
				fr.lo, fr.hi, found = binary.BigEndian.Uint16(e.FromData), binary.BigEndian.Uint16(e.ToData), true
			}
		case *expr.NAT:
			action = action || e.Type == expr.NATTypeDestNAT
		case *expr.Redir:
			action = true
		case *expr.Target:
			action = action || e.Name == "DNAT" || e.Name == "REDIRECT"
		}
	}
	if fr.fam == nil {
		fr.fam = nftFamily(rule.Table.Family)
	}
	return fr, found && action && fr.lo <= fr.hi
}

// scanSave reads family f's nat table dump: the IPC-* chains of clusters
// other than self as claims, and other chains' DNAT and REDIRECT rules with
// a destination port.
func (s *routeScan) scanSave(f *family, t *natTable, self string, res *scanResult, removes map[string]map[*family][]string) {
	for _, chain := range slices.Sorted(maps.Keys(t.chains)) {
		name, ours := strings.CutPrefix(chain, "IPC-")
		if ours {
			c := routeClaim{cluster: name, backend: BackendIPTables, fam: f}
			for _, spec := range t.rules[chain] {
				ri := parseRuleSpec(spec)
				if ri.target != "DNAT" || ri.negated || len(ri.protos) != 1 || ri.hi == 0 || ri.lo != ri.hi {
					continue
				}
				if ri.dst.IsValid() {
					c.addr = ri.dst
				}
				p := Port{Public: ri.lo}
				if ri.protos[0] == unix.IPPROTO_UDP {
					p.Proto = UDP
				}
				if !slices.Contains(c.ports, p) {
					c.ports = append(c.ports, p)
				}
			}
			if name == "" || name == self {
				continue
			}
			res.claims = append(res.claims, c)
			key := name + "/" + string(BackendIPTables)
			var cmds []string
			for _, hc := range hookChains {
				for _, spec := range t.rules[hc] {
					if jumpsTo(spec, chain) {
						cmds = append(cmds, fmt.Sprintf("%s -t nat -D %s %s", f.cmd, hc, spec))
					}
				}
			}
			cmds = append(cmds, fmt.Sprintf("%s -t nat -F %s", f.cmd, chain), fmt.Sprintf("%s -t nat -X %s", f.cmd, chain))
			if removes[key] == nil {
				removes[key] = map[*family][]string{}
			}
			removes[key][f] = cmds
			continue
		}
		for _, spec := range t.rules[chain] {
			ri := parseRuleSpec(spec)
			if (ri.target != "DNAT" && ri.target != "REDIRECT") || ri.negated || (ri.hi == 0 && len(ri.list) == 0) {
				continue
			}
			res.foreign = append(res.foreign, foreignRule{
				where:  fmt.Sprintf("%s nat chain %s", f.cmd, chain),
				rule:   "-A " + chain + " " + spec,
				fam:    f,
				protos: ri.protos,
				lo:     ri.lo, hi: ri.hi, list: ri.list,
			})
		}
	}
}

// ruleInfo is what parseRuleSpec reads from an iptables-save rule.
type ruleInfo struct {
	dst     netip.Addr // -d, a single address
	protos  []byte
	lo, hi  uint16   // --dport N or N:M
	list    []uint16 // --dports a,b,c (multiport; ranges go to lo, hi)
	target  string   // -j
	negated bool     // a port or protocol match is negated
}

// parseRuleSpec reads the destination, protocol, destination port and
// target of a rule as iptables-save prints it.
func parseRuleSpec(spec string) ruleInfo {
	var ri ruleInfo
	words := splitWords(spec)
	for i := 0; i < len(words); i++ {
		w := words[i]
		neg := i > 0 && words[i-1] == "!"
		next := ""
		if i+1 < len(words) {
			next = words[i+1]
		}
		switch w {
		case "-d", "--destination":
			if p, err := netip.ParsePrefix(next); err == nil && p.IsSingleIP() && !neg {
				ri.dst = p.Addr()
			}
		case "-p", "--protocol":
			ri.negated = ri.negated || neg
			switch next {
			case "tcp":
				ri.protos = append(ri.protos, unix.IPPROTO_TCP)
			case "udp":
				ri.protos = append(ri.protos, unix.IPPROTO_UDP)
			}
		case "--dport", "--destination-port", "--dports", "--destination-ports":
			ri.negated = ri.negated || neg
			for _, part := range strings.Split(next, ",") {
				lo, hi, isRange := strings.Cut(part, ":")
				a, err1 := strconv.ParseUint(lo, 10, 16)
				b, err2 := strconv.ParseUint(hi, 10, 16)
				switch {
				case err1 != nil:
				case !isRange && (w == "--dport" || w == "--destination-port"):
					ri.lo, ri.hi = uint16(a), uint16(a)
				case !isRange:
					ri.list = append(ri.list, uint16(a))
				case err2 == nil:
					ri.lo, ri.hi = uint16(a), uint16(b)
				}
			}
		case "-j", "--jump":
			ri.target = next
		}
	}
	return ri
}

// splitWords splits a rule spec at spaces, keeping a double-quoted
// argument (a comment) whole.
func splitWords(s string) []string {
	var words []string
	var cur strings.Builder
	quoted, in := false, false
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case ch == '\\' && quoted && i+1 < len(s):
			i++
			cur.WriteByte(s[i])
		case ch == '"':
			quoted, in = !quoted, true
		case ch == ' ' && !quoted:
			if in {
				words = append(words, cur.String())
				cur.Reset()
				in = false
			}
		default:
			cur.WriteByte(ch)
			in = true
		}
	}
	if in {
		words = append(words, cur.String())
	}
	return words
}

// checkRoutesFree is the master's start-up check: it fails, wrapping
// ErrPortInUse, when another cluster's rules in this network namespace
// route a port of r on an overlapping address, and warns of other nat
// rules that redirect one. A part of the scan that fails (say, a broken
// iptables-save) is a warning: the scan protects, it must not stop a
// start by itself.
func checkRoutesFree(ctx context.Context, r *routing, log *slog.Logger) error {
	start := time.Now()
	s := &routeScan{run: execRunner{}, maxChains: scanLimitChains}
	s.saves, s.nftBased = findSaves()
	if conn, err := nftables.New(nftables.AsLasting()); err == nil {
		s.nft = conn
		defer func() { _ = conn.CloseLasting() }()
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	res := s.scan(ctx, r)
	err := res.check(r, log)
	log.Debug("scanned the namespace for other clusters' routes", "took", time.Since(start), "clusters", len(res.claims), "foreign", len(res.foreign))
	return err
}

// findSaves returns the families whose iptables-save is on PATH, and
// whether they are iptables-nft (xtables-nft-multi; legacy is
// xtables-legacy-multi), found without running them.
func findSaves() (map[*family]bool, bool) {
	saves, nftBased := map[*family]bool{}, false
	for _, f := range []*family{familyIPv4, familyIPv6} {
		path, err := exec.LookPath(f.save)
		if err != nil {
			continue
		}
		saves[f] = true
		if real, err := filepath.EvalSymlinks(path); err == nil && strings.Contains(filepath.Base(real), "nft") {
			nftBased = true
		}
	}
	return saves, nftBased
}

// check turns a scan's findings into the error and warnings.
func (res *scanResult) check(r *routing, log *slog.Logger) error {
	if res.noNFT != nil {
		log.Info("nf_tables unreadable; checked only iptables for other clusters on this cluster's ports", "cluster", r.name, "err", res.noNFT)
	}
	for _, what := range res.skipped {
		log.Warn("could not read every nat rule when checking for other clusters on this cluster's ports", "cluster", r.name, "skipped", what)
	}
	own := r.claims()
	for _, fr := range res.foreign {
		if ports := fr.matches(own); len(ports) > 0 {
			log.Warn("a nat rule outside ipcluster already redirects a public port of this cluster; "+
				"new connections it matches will not reach the workers if it is consulted first",
				"cluster", r.name, "ports", portList(ports), "rules", fr.where, "rule", fr.rule)
		}
	}
	var errs []error
	for _, e := range conflicts(own, res.claims) {
		e.Rules = ruleName(e)
		e.Remove = res.removes[e.Cluster+"/"+string(e.Backend)]
		errs = append(errs, e)
	}
	return errors.Join(errs...)
}

func ruleName(e *PortInUseError) string {
	if e.Backend == BackendNFTables {
		return "table inet " + nftTableName(e.Cluster)
	}
	var cmds []string
	for _, f := range []*family{familyIPv4, familyIPv6} {
		if slices.Contains(e.Families, f.name) {
			cmds = append(cmds, f.cmd)
		}
	}
	return "nat chain IPC-" + e.Cluster + " of " + strings.Join(cmds, " and ")
}

func portList(ports []Port) string {
	s := make([]string, len(ports))
	for i, p := range ports {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

// checkPortsUnbound is the bpf backend's check before anything is bound:
// its sockets bind the public ports themselves, so a socket already bound
// to one (another server, or another cluster's bpf workers) on an address
// this cluster serves is a conflict. SO_REUSEPORT would even let a socket
// of the same user join that other group, and this cluster's program
// would then steer the other's clients. Not made when this cluster's own
// sockets may be the ones bound: a takeover, or a previous master's routes
// in the run directory.
func checkPortsUnbound(cfg *Config, rt *routing) error {
	tables := map[Protocol][]string{TCP: {"tcp", "tcp6"}, UDP: {"udp", "udp6"}}
	state := map[Protocol]string{TCP: "0A", UDP: "07"}
	for _, p := range rt.ports {
		for _, table := range tables[p.Proto] {
			socks, err := procfs.BoundSockets(table, state[p.Proto])
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			if err != nil {
				return fmt.Errorf("check that public port %s is free: %w", p, err)
			}
			for _, b := range socks {
				if b.Port != p.Public || cfg.Addr.IsValid() && !b.Addr.IsUnspecified() && b.Addr.Unmap() != cfg.Addr {
					continue
				}
				where := "every local address"
				if !b.Addr.IsUnspecified() {
					where = b.Addr.String()
				}
				ss := "ss -ltnp"
				if p.Proto == UDP {
					ss = "ss -lunp"
				}
				return fmt.Errorf("%w: %s is already bound in this network namespace (on %s), and the bpf backend binds the public port itself: "+
					"another server, or another cluster's bpf workers, listens there; find it with %s 'sport = :%d', stop it, "+
					"or give this cluster other Config.Ports or a Config.Addr it does not use",
					ErrPortInUse, p, where, ss, p.Public)
			}
		}
	}
	return nil
}
