//go:build linux

package ipcluster

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"
)

var (
	v4a  = netip.MustParseAddr("198.18.0.1")
	v4b  = netip.MustParseAddr("198.18.0.2")
	v6a  = netip.MustParseAddr("fd00::1")
	p80  = Port{Public: 8080}
	p443 = Port{Public: 8443}
	u80  = Port{Public: 8080, Proto: UDP}
)

// claimsOf is what a cluster with this Addr and these Ports claims.
func claimsOf(t *testing.T, name string, addr netip.Addr, ports ...Port) []routeClaim {
	t.Helper()
	r := testRouting(t, Config{Name: name, Workers: 2, Addr: addr, Ports: ports})
	return r.claims()
}

func TestOverlap(t *testing.T) {
	for _, tc := range []struct {
		what       string
		own, other []routeClaim
		want       []Port
	}{
		{"same port, both every address", claimsOf(t, "b", netip.Addr{}, p80), claimsOf(t, "a", netip.Addr{}, p80), []Port{p80}},
		{"same port, same address", claimsOf(t, "b", v4a, p80, p443), claimsOf(t, "a", v4a, p443), []Port{p443}},
		{"other on every address", claimsOf(t, "b", v4a, p80), claimsOf(t, "a", netip.Addr{}, p80), []Port{p80}},
		{"own on every address", claimsOf(t, "b", netip.Addr{}, p80), claimsOf(t, "a", v6a, p80), []Port{p80}},
		{"own on every IPv4 address", claimsOf(t, "b", netip.IPv4Unspecified(), p80), claimsOf(t, "a", v4a, p80), []Port{p80}},
		{"different ports", claimsOf(t, "b", v4a, p443), claimsOf(t, "a", v4a, p80), nil},
		{"same number, other protocol", claimsOf(t, "b", netip.Addr{}, u80), claimsOf(t, "a", netip.Addr{}, p80), nil},
		{"different addresses", claimsOf(t, "b", v4b, p80), claimsOf(t, "a", v4a, p80), nil},
		{"disjoint families", claimsOf(t, "b", v6a, p80), claimsOf(t, "a", v4a, p80), nil},
		{"every IPv6 address against IPv4", claimsOf(t, "b", netip.IPv6Unspecified(), p80), claimsOf(t, "a", netip.IPv4Unspecified(), p80), nil},
		{"same name never conflicts", claimsOf(t, "a", netip.Addr{}, p80), claimsOf(t, "a", netip.Addr{}, p80), nil},
	} {
		t.Run(tc.what, func(t *testing.T) {
			errs := conflicts(tc.own, tc.other)
			var got []Port
			for _, e := range errs {
				got = append(got, e.Ports...)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("conflicting ports %v, want %v", got, tc.want)
			}
			if len(errs) > 1 {
				t.Errorf("%d errors for one other cluster, want one", len(errs))
			}
		})
	}
}

func TestPortInUseErrorText(t *testing.T) {
	other := claimsOf(t, "first", netip.Addr{}, p80)
	for i := range other {
		other[i].backend = BackendNFTables
	}
	res := &scanResult{claims: other, removes: map[string]string{"first/nftables": "nft delete table inet ipcluster-first"}}
	err := res.check(testRouting(t, Config{Name: "second", Workers: 2, Ports: []Port{p80, p443}}), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if !errors.Is(err, ErrPortInUse) {
		t.Fatalf("got %v, want ErrPortInUse", err)
	}
	var pe *PortInUseError
	if !errors.As(err, &pe) || pe.Cluster != "first" || pe.Backend != BackendNFTables || !slices.Equal(pe.Ports, []Port{p80}) ||
		!slices.Equal(pe.Families, []string{"ipv4", "ipv6"}) {
		t.Fatalf("error %#v", pe)
	}
	want := `ipcluster: public port already routed by another cluster: 8080/tcp on every local address is routed by cluster "first" ` +
		`(nftables table inet ipcluster-first); starting cluster "second" there would take its clients. ` +
		`Stop cluster "first", or give this one other Config.Ports or a Config.Addr that does not overlap; ` +
		`if the master of "first" is gone, remove its stale rules with: nft delete table inet ipcluster-first`
	if err.Error() != want {
		t.Errorf("error text:\n%s\nwant:\n%s", err, want)
	}
}

func TestParseRuleSpec(t *testing.T) {
	for _, tc := range []struct {
		spec string
		want ruleInfo
	}{
		{"-s 0.0.0.1/0.0.0.3 -d 198.18.0.1/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination :40000",
			ruleInfo{dst: v4a, protos: []byte{6}, lo: 8080, hi: 8080, target: "DNAT"}},
		{`! -i docker0 -p udp -m udp --dport 53 -m comment --comment "a -j DNAT b" -j REDIRECT --to-ports 5353`,
			ruleInfo{protos: []byte{17}, lo: 53, hi: 53, target: "REDIRECT"}},
		{"-p tcp -m tcp --dport 8000:8100 -j DNAT --to-destination 10.0.0.1",
			ruleInfo{protos: []byte{6}, lo: 8000, hi: 8100, target: "DNAT"}},
		{"-p tcp -m multiport --dports 80,8080,9000:9010 -j DNAT --to-destination :1",
			ruleInfo{protos: []byte{6}, list: []uint16{80, 8080}, lo: 9000, hi: 9010, target: "DNAT"}},
		{"-p tcp -m tcp ! --dport 8080 -j REDIRECT", ruleInfo{protos: []byte{6}, lo: 8080, hi: 8080, target: "REDIRECT", negated: true}},
	} {
		got := parseRuleSpec(tc.spec)
		if got.dst != tc.want.dst || !slices.Equal(got.protos, tc.want.protos) || got.lo != tc.want.lo || got.hi != tc.want.hi ||
			!slices.Equal(got.list, tc.want.list) || got.target != tc.want.target || got.negated != tc.want.negated {
			t.Errorf("parseRuleSpec(%q) = %+v, want %+v", tc.spec, got, tc.want)
		}
	}
}

func TestForeignRuleMatches(t *testing.T) {
	own := claimsOf(t, "c", v4a, p80, u80, p443)
	for _, tc := range []struct {
		what string
		fr   foreignRule
		want []Port
	}{
		{"tcp 8080", foreignRule{fam: familyIPv4, protos: []byte{6}, lo: 8080, hi: 8080}, []Port{p80}},
		{"any protocol", foreignRule{lo: 8080, hi: 8080}, []Port{p80, u80}},
		{"range", foreignRule{protos: []byte{6}, lo: 8000, hi: 9000}, []Port{p80, p443}},
		{"list", foreignRule{list: []uint16{8443}}, []Port{p443}},
		{"other family", foreignRule{fam: familyIPv6, lo: 8080, hi: 8080}, nil},
		{"other port", foreignRule{lo: 9090, hi: 9090}, nil},
	} {
		if got := tc.fr.matches(own); !slices.Equal(got, tc.want) {
			t.Errorf("%s: matches %v, want %v", tc.what, got, tc.want)
		}
	}
}

// The scanner reads, in a namespace, another cluster's nftables table and
// iptables chains (as their writers make them) and another program's nat
// rules, and says which of a new cluster's ports they take. It prints what
// one scan costs.
func TestRouteScanFindsOtherRules(t *testing.T) {
	lab, conn := nftLab(t, 4)
	ctx := context.Background()
	run := execRunner{start: lab.Server.Start}
	sh := func(args ...string) {
		t.Helper()
		cmd := exec.Command(args[0], args[1:]...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := lab.Server.Start(cmd); err != nil {
			t.Fatal(err)
		}
		if err := cmd.Wait(); err != nil {
			t.Fatalf("%v: %v: %s", args, err, out.String())
		}
	}
	if _, err := exec.LookPath("iptables-save"); err != nil {
		t.Skip("iptables binaries not installed")
	}

	scanner := &routeScan{nft: conn, run: run, maxChains: scanLimitChains}
	scanner.saves, scanner.nftBased = findSaves()
	newCluster := testRouting(t, Config{Name: "new", Workers: 2, Ports: []Port{p80}})
	timeScan := func(what string) {
		t.Helper()
		const runs = 20
		start := time.Now()
		for range runs {
			if res := scanner.scan(ctx, newCluster); len(res.skipped) > 0 {
				t.Errorf("skipped: %v", res.skipped)
			}
		}
		t.Logf("one scan, %s (iptables-nft=%v): %v", what, scanner.nftBased, time.Since(start)/runs)
	}
	timeScan("empty namespace")

	targets := func(ports ...Port) []slotTarget {
		ts := make([]slotTarget, 2)
		for s := range ts {
			ts[s] = slotTarget{}
			for i, p := range ports {
				ts[s][p] = uint16(40000 + 10*s + i)
			}
		}
		return ts
	}
	// Cluster "nft" on every address, 8080/tcp and 53/udp.
	nr := testRouting(t, Config{Name: "nft", Workers: 2, Ports: []Port{p80, {Public: 53, Proto: UDP}}})
	nw := newNFTWriter(nr, conn)
	if err := nw.apply(ctx, targets(nr.ports...), targets(nr.ports...)); err != nil {
		t.Fatal(err)
	}
	timeScan("one other nftables cluster")
	// Cluster "ipt" on 198.18.0.1 only, 8443/tcp.
	ir := testRouting(t, Config{Name: "ipt", Workers: 2, Addr: lab.ServerAddr4, Ports: []Port{p443}})
	iw := newRuleWriter(ir, run)
	if err := iw.apply(ctx, targets(ir.ports...), nil); err != nil {
		t.Fatal(err)
	}
	// Cluster "iptall" on every address, 8443/tcp.
	i6r := testRouting(t, Config{Name: "iptall", Workers: 2, Ports: []Port{p443}})
	if err := newRuleWriter(i6r, run).apply(ctx, targets(i6r.ports...), nil); err != nil {
		t.Fatal(err)
	}
	// Another program's redirects: iptables (IPv4) and nft (IPv6).
	sh("iptables", "-t", "nat", "-N", "DOCKER")
	sh("iptables", "-t", "nat", "-A", "PREROUTING", "-j", "DOCKER")
	sh("iptables", "-t", "nat", "-A", "DOCKER", "!", "-i", "docker0", "-p", "tcp", "--dport", "9000", "-j", "DNAT", "--to-destination", "198.18.0.1:80")
	sh("nft", "add table ip6 fw; add chain ip6 fw pre { type nat hook prerouting priority dstnat; }; "+
		"add rule ip6 fw pre tcp dport 9000-9100 redirect to :1; add rule ip6 fw pre udp dport 9050 counter")

	timeScan("3 other clusters (1 nftables, 2 iptables) and 2 other nat rules")
	for _, tc := range []struct {
		what     string
		addr     netip.Addr
		ports    []Port
		clusters []string // conflicting, in order
		foreign  int      // foreign rules matched
	}{
		{"8080/tcp on every address", netip.Addr{}, []Port{p80}, []string{"nft"}, 0},
		{"53/udp on fd00::1", lab.ServerAddr6, []Port{{Public: 53, Proto: UDP}}, []string{"nft"}, 0},
		{"53/tcp", netip.Addr{}, []Port{{Public: 53}}, nil, 0},
		{"8443/tcp on every address", netip.Addr{}, []Port{p443}, []string{"ipt", "iptall"}, 0},
		{"8443/tcp on 198.18.0.1", lab.ServerAddr4, []Port{p443}, []string{"ipt", "iptall"}, 0},
		{"8443/tcp on 198.18.0.2", v4b, []Port{p443}, []string{"iptall"}, 0},
		{"8443/udp", netip.Addr{}, []Port{{Public: 8443, Proto: UDP}}, nil, 0},
		{"9000/tcp", netip.Addr{}, []Port{{Public: 9000}}, nil, 2},
		{"9050/udp", netip.Addr{}, []Port{{Public: 9050, Proto: UDP}}, nil, 0},
		{"9050/tcp on fd00::1", lab.ServerAddr6, []Port{{Public: 9050}}, nil, 1},
	} {
		r := testRouting(t, Config{Name: "new", Workers: 2, Addr: tc.addr, Ports: tc.ports})
		res := scanner.scan(ctx, r)
		var got []string
		for _, e := range conflicts(r.claims(), res.claims) {
			got = append(got, e.Cluster)
		}
		if !slices.Equal(got, tc.clusters) {
			t.Errorf("%s: conflicts with %v, want %v", tc.what, got, tc.clusters)
		}
		n := 0
		for _, fr := range res.foreign {
			if len(fr.matches(r.claims())) > 0 {
				n++
			}
		}
		if n != tc.foreign {
			t.Errorf("%s: %d foreign rules match, want %d (%+v)", tc.what, n, tc.foreign, res.foreign)
		}
		var log bytes.Buffer
		err := res.check(r, slog.New(slog.NewTextHandler(&log, nil)))
		if (err != nil) != (len(tc.clusters) > 0) {
			t.Errorf("%s: check: %v", tc.what, err)
		}
		if tc.foreign > 0 && !strings.Contains(log.String(), "a nat rule outside ipcluster") {
			t.Errorf("%s: no warning logged:\n%s", tc.what, log.String())
		}
		// A cluster serving one family is told how to remove the
		// other's chains of both.
		if rm := res.removes["iptall/iptables"]; len(tc.clusters) > 0 && tc.clusters[len(tc.clusters)-1] == "iptall" &&
			(!strings.Contains(rm, "iptables -t nat -X IPC-iptall") || !strings.Contains(rm, "ip6tables -t nat -X IPC-iptall")) {
			t.Errorf("%s: remove command %q does not remove both families' chains", tc.what, rm)
		}
	}
	// The remove commands given in the errors do remove the rules.
	r := testRouting(t, Config{Name: "new", Workers: 2, Ports: []Port{p80, p443}})
	res := scanner.scan(ctx, r)
	errs := conflicts(r.claims(), res.claims)
	if len(errs) != 3 {
		t.Fatalf("%d conflicts, want 3", len(errs))
	}
	for _, e := range errs {
		for _, cmd := range strings.Split(res.removes[e.Cluster+"/"+string(e.Backend)], "; ") {
			sh("sh", "-c", cmd)
		}
	}
	res = scanner.scan(ctx, r)
	if errs := conflicts(r.claims(), res.claims); len(errs) != 0 {
		t.Errorf("after the remove commands: %v", errs)
	}
	for _, v6 := range []bool{false, true} {
		f := familyIPv4
		if v6 {
			f = familyIPv6
		}
		out, err := run.save(ctx, f)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(out, []byte("IPC-")) {
			t.Errorf("%s rules left after the remove commands:\n%s", f.name, out)
		}
	}
}
