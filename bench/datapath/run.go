//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/netlab"
)

// cellRow is one cell aggregated over rounds.
type cellRow struct {
	mode      mode
	source    string
	path      path
	rate      float64 // medians over rounds
	p50, p99  time.Duration
	vsDirect  float64 // rate / direct's rate, 0 if direct was not measured
	errs      int     // sums over rounds
	slow      int
	ctPeak    int // max over rounds
	remapped  int // max over rounds
	firstErr  error
	perRound  []float64
	rounds    int
	hasDirect bool
}

type scaleRow struct {
	backend            string
	slots              int
	firstRate          float64 // nat from slot 0's addresses (first rule)
	lastRate           float64 // nat from slot n-1's addresses (last rule)
	natRate, dirRate   float64
	ratio, vsOne       float64
	natErrs, natSlow   int
	dirErrs, dirSlow   int
	natFirst, dirFirst error
	natCT              int // conntrack peak of the public-port cells
}

func aggregate(rs []cellResult) cellRow {
	var row cellRow
	var rates, p50s, p99s []float64
	for _, r := range rs {
		rates = append(rates, r.rate)
		p50s = append(p50s, float64(r.p50))
		p99s = append(p99s, float64(r.p99))
		row.errs += r.errs
		row.slow += r.slow
		row.ctPeak = max(row.ctPeak, r.ctPeak)
		row.remapped = max(row.remapped, r.remapped)
		if row.firstErr == nil {
			row.firstErr = r.firstErr
		}
	}
	row.perRound = slices.Clone(rates)
	row.rate = median(rates)
	row.p50 = time.Duration(median(p50s))
	row.p99 = time.Duration(median(p99s))
	row.rounds = len(rs)
	return row
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// applyServerSysctls sets -server-sysctl once conntrack is active in the
// server namespace (its sysctls appear only then).
func (b *bench) applyServerSysctls() error {
	if b.sysctlsSet {
		return nil
	}
	for _, kv := range b.o.serverSysctl {
		if err := b.lab.Server.Sysctl(kv[0], kv[1]); err != nil {
			return fmt.Errorf("-server-sysctl %s=%s: %w", kv[0], kv[1], err)
		}
	}
	b.sysctlsSet = true
	return nil
}

// cell flushes conntrack and runs one cell.
//
// The bpf path's cells, with -bpf-ns own, run in the bpf lab: its client
// namespace (whose port range was set once, see startBPF) and its server
// namespace's conntrack.
func (b *bench) cell(ctx context.Context, ct *conntrack, m mode, p path, flows []flow, dur time.Duration) (cellResult, error) {
	client := b.lab.Client
	if p == bpfPath && b.bpfLab != nil && b.bpfLab != b.lab {
		client, ct = b.bpfLab.Client, b.bpfCT
	} else if err := b.portRange(p); err != nil {
		return cellResult{}, err
	}
	if !b.o.noFlush {
		if err := ct.flush(); err != nil {
			return cellResult{}, err
		}
	}
	r := runCell(ctx, client, m, flows, b.o.conc, dur, ct)
	if err := ctx.Err(); err != nil {
		return r, fmt.Errorf("interrupted: %w", err)
	}
	var err error
	r.remapped, err = ct.remapped()
	return r, err
}

// portRange gives the client's connections of path p their own share (a
// quarter) of the ephemeral port range (with -split-ports), the whole
// range otherwise.
//
// The worker holds a TIME_WAIT socket for every connection it closed
// first, keyed by the client address and port it saw. The client chooses
// the ISN and timestamp of its next SYN from the 4-tuple it dials, and
// direct (dialing the worker port) and nat (dialing the public port) are
// different 4-tuples reaching the same worker socket. A port that one path
// used and another path reuses within 60s meets a TIME_WAIT whose sequence
// numbers are unrelated, and about half of the time the worker answers the
// SYN with a stale ACK, the client resets, and retries: one path's cells
// would slow the other's. Real clients reach a worker through one path
// only, so each path gets ports of its own.
func (b *bench) portRange(p path) error {
	r := fullRange
	if b.o.splitPorts {
		r = splitRange(int(p), len(pathNames))
	}
	return b.setRange(r)
}

const fullRange = "1024 65535"

// splitRange is share i of n of fullRange: 1024-17151, 17152-33279, ...
func splitRange(i, n int) string {
	const lo, hi = 1024, 65535
	w := (hi - lo + 1) / n
	end := lo + (i+1)*w - 1
	if i == n-1 {
		end = hi
	}
	return fmt.Sprintf("%d %d", lo+i*w, end)
}

func (b *bench) setRange(r string) error {
	if r == b.curRange {
		return nil
	}
	if err := b.lab.Client.Sysctl("net/ipv4/ip_local_port_range", r); err != nil {
		return fmt.Errorf("set the client port range to %s: %w", r, err)
	}
	b.curRange = r
	return nil
}

// comparePaths is the first part: every mode × source set × path, in
// interleaved rounds, against one cluster of -workers workers.
func (b *bench) comparePaths(ctx context.Context) (rows []cellRow, err error) {
	o := b.o
	fmt.Fprintf(os.Stderr, "starting a %d-worker cluster ...\n", o.workers)
	c, err := startCluster(ctx, b.lab, b.exe, b.tmp, o.workers, clusterOpts{backend: o.backend, allowDirect: true})
	defer func() {
		if serr := c.stop(); serr != nil {
			err = errors.Join(err, serr)
		}
	}()
	if err != nil {
		return nil, err
	}
	if err := b.applyServerSysctls(); err != nil {
		return nil, err
	}
	ct, err := openConntrack(b.lab.Server)
	if err != nil {
		return nil, err
	}
	defer ct.close()
	b.ctMax = ct.max
	sources := map[string][]netip.Addr{
		"many":   b.lab.ClientAddrs4[:o.many],
		"single": b.lab.ClientAddrs4[:1],
	}
	if err := b.verify(ctx, c, sources["many"]); err != nil {
		return nil, fmt.Errorf("check that nat and direct reach the same worker: %w", err)
	}
	if slices.Contains(o.paths, bpfPath) {
		stopBPF, err := b.startBPF(ctx)
		defer func() {
			if serr := stopBPF(); serr != nil {
				err = errors.Join(err, serr)
			}
		}()
		if err != nil {
			return nil, err
		}
		sources["bpf many"], sources["bpf single"] = b.bpfLab.ClientAddrs4[:o.many], b.bpfLab.ClientAddrs4[:1]
	}
	if slices.Contains(o.paths, haproxyPath) {
		hp, err := startHAProxy(ctx, b.lab, b.tmp, c.ports)
		defer hp.stop()
		if err != nil {
			return nil, err
		}
	}
	type key struct {
		m   mode
		src string
		p   path
	}
	flows := map[key][]flow{}
	for _, m := range o.modes {
		for _, src := range o.sources {
			for _, p := range o.paths {
				flows[key{m, src, p}] = flowsFor(p, srcsFor(p, src, sources), c.ports)
			}
		}
	}
	// Warm-up, not recorded: first connections fault in code and fill
	// caches in every process on every path.
	for _, p := range o.paths {
		if _, err := b.cell(ctx, ct, keepalive, p, flowsFor(p, srcsFor(p, "many", sources), c.ports), 300*time.Millisecond); err != nil {
			return nil, err
		}
	}
	results := map[key][]cellResult{}
	for r := range o.rounds {
		t0 := time.Now()
		var line []string
		for _, m := range o.modes {
			for _, src := range o.sources {
				for _, p := range o.paths {
					k := key{m, src, p}
					res, err := b.cell(ctx, ct, m, p, flows[k], o.duration)
					if err != nil {
						return nil, err
					}
					results[k] = append(results[k], res)
					if o.verbose {
						fmt.Fprintf(os.Stderr, "  round %d %-12s %-6s %-7s %8.0f/s p50 %s p99 %s errors %d slow %d ct %d\n",
							r+1, m, src, p, res.rate, fmtDur(res.p50), fmtDur(res.p99), res.errs, res.slow, res.ctPeak)
					}
					if res.slow > 0 || res.errs > 0 {
						line = append(line, fmt.Sprintf("%s/%s/%s: %d slow, %d errors", m, src, p, res.slow, res.errs))
					}
				}
			}
		}
		fmt.Fprintf(os.Stderr, "round %d/%d done in %s", r+1, o.rounds, time.Since(t0).Round(100*time.Millisecond))
		if len(line) > 0 {
			fmt.Fprintf(os.Stderr, " (%s)", strings.Join(line, "; "))
		}
		fmt.Fprintln(os.Stderr)
	}
	for _, m := range o.modes {
		for _, src := range o.sources {
			var dirRate float64
			hasDirect := slices.Contains(o.paths, direct)
			if hasDirect {
				dirRate = median(rates(results[key{m, src, direct}]))
			}
			for _, p := range o.paths {
				row := aggregate(results[key{m, src, p}])
				row.mode, row.source, row.path, row.hasDirect = m, src, p, hasDirect
				if hasDirect && dirRate > 0 {
					row.vsDirect = row.rate / dirRate
				}
				rows = append(rows, row)
			}
		}
	}
	return rows, nil
}

// srcsFor is source set src of path p: the bpf path's are the bpf lab's
// addresses (the same addresses, in its own client namespace).
func srcsFor(p path, src string, sources map[string][]netip.Addr) []netip.Addr {
	if p == bpfPath {
		return sources["bpf "+src]
	}
	return sources[src]
}

// startBPF starts the bpf path's cluster: the same size and server code as
// the nat cluster, with Config.Backend "bpf" and its own public port, so
// that its workers' sockets form a reuseport group on 198.18.0.1:8082,
// steered by the SK_REUSEPORT program. With -bpf-ns own it runs in a
// second lab of the same make (a client and a server namespace, the same
// addresses and sysctls), since the nat cluster's rules keep conntrack
// active in theirs; with shared, in the nat cluster's server namespace.
// The returned stop stops it and removes the second lab.
func (b *bench) startBPF(ctx context.Context) (stop func() error, err error) {
	o := b.o
	var bc *cluster
	stop = func() error {
		var errs []error
		if serr := bc.stop(); serr != nil {
			errs = append(errs, serr)
		}
		b.bpfCT.close()
		b.bpfCT = nil
		if b.bpfLab != nil && b.bpfLab != b.lab {
			if cerr := b.bpfLab.Close(); cerr != nil {
				errs = append(errs, fmt.Errorf("remove the bpf lab: %w", cerr))
			}
		}
		b.bpfLab = nil
		return errors.Join(errs...)
	}
	b.bpfLab = b.lab
	if o.bpfNS == "own" {
		fmt.Fprintf(os.Stderr, "creating the bpf path's lab ...\n")
		lab, err := netlab.New(netlab.Options{Clients: o.many})
		if err != nil {
			return stop, fmt.Errorf("create the bpf path's lab: %w", err)
		}
		b.bpfLab = lab
		for _, ns := range []*netlab.NS{lab.Client, lab.Server} {
			for _, kv := range labSysctls {
				if err := ns.Sysctl(kv[0], kv[1]); err != nil {
					return stop, fmt.Errorf("set %s=%s in %s: %w", kv[0], kv[1], ns.Name, err)
				}
			}
		}
		for _, kv := range o.serverSysctl {
			if err := lab.Server.Sysctl(kv[0], kv[1]); err != nil {
				return stop, fmt.Errorf("-server-sysctl %s=%s in the bpf lab: %w", kv[0], kv[1], err)
			}
		}
		// The same share of the client's ports as in the shared layout,
		// so that every path dials from as many ports.
		r := fullRange
		if o.splitPorts {
			r = splitRange(int(bpfPath), len(pathNames))
		}
		if err := lab.Client.Sysctl("net/ipv4/ip_local_port_range", r); err != nil {
			return stop, fmt.Errorf("set the bpf lab's client port range to %s: %w", r, err)
		}
	}
	fmt.Fprintf(os.Stderr, "starting a %d-worker bpf cluster (-bpf-ns %s) ...\n", o.workers, o.bpfNS)
	bc, err = startCluster(ctx, b.bpfLab, b.exe, b.tmp, o.workers, clusterOpts{backend: string(ipcluster.BackendBPF), port: bpfPort, kind: "bpf"})
	if err != nil {
		return stop, err
	}
	if b.bpfCT, err = openConntrack(b.bpfLab.Server); err != nil {
		return stop, err
	}
	if err := b.verify(ctx, bc, b.bpfLab.ClientAddrs4[:o.many]); err != nil {
		return stop, fmt.Errorf("check that the bpf cluster's public port and its workers' own ports reach the same worker: %w", err)
	}
	return stop, nil
}

func rates(rs []cellResult) []float64 {
	var v []float64
	for _, r := range rs {
		v = append(v, r.rate)
	}
	return v
}

// lookupScaling is the second part: for each slot count a cluster of that
// many workers, client-close from every lab address through nat and
// direct, interleaved in rounds.
func (b *bench) lookupScaling(ctx context.Context) ([]scaleRow, error) {
	srcs := b.lab.ClientAddrs4 // the same addresses for every slot count
	var all []scaleRow
	for _, backend := range b.o.backends {
		var rows []scaleRow
		for _, n := range b.o.slots {
			row, err := b.scaleOne(ctx, n, srcs, backend)
			if err != nil {
				return nil, err
			}
			rows = append(rows, row)
		}
		for i := range rows {
			if rows[0].slots == 1 && rows[0].natRate > 0 {
				rows[i].vsOne = rows[i].natRate / rows[0].natRate
			}
		}
		all = append(all, rows...)
	}
	return all, nil
}

func (b *bench) scaleOne(ctx context.Context, n int, srcs []netip.Addr, backend string) (row scaleRow, err error) {
	fmt.Fprintf(os.Stderr, "lookup scaling: starting a %d-worker cluster (%s) ...\n", n, backend)
	t0 := time.Now()
	c, err := startCluster(ctx, b.lab, b.exe, b.tmp, n, clusterOpts{backend: backend, allowDirect: true})
	defer func() {
		if serr := c.stop(); serr != nil {
			err = errors.Join(err, serr)
		}
	}()
	if err != nil {
		return row, err
	}
	fmt.Fprintf(os.Stderr, "  ready in %s\n", time.Since(t0).Round(100*time.Millisecond))
	if err := b.applyServerSysctls(); err != nil {
		return row, err
	}
	ct, err := openConntrack(b.lab.Server)
	if err != nil {
		return row, err
	}
	defer ct.close()
	b.ctMax = ct.max
	if err := b.verify(ctx, c, srcs); err != nil {
		return row, fmt.Errorf("check that nat and direct reach the same worker: %w", err)
	}
	paths := []path{direct, nat}
	results := map[path][]cellResult{}
	if _, err := b.cell(ctx, ct, clientClose, nat, flowsFor(nat, srcs, c.ports), 300*time.Millisecond); err != nil {
		return row, err
	}
	// The walk itself, apart from everything else that grows with the
	// worker count: nat from a few addresses of slot 0 (the chain's first
	// rule) against as many of slot n-1 (its last), one worker each.
	first, last := slotAddrs(srcs, n, 0, edgeAddrs), slotAddrs(srcs, n, n-1, edgeAddrs)
	var firstRes, lastRes []cellResult
	for range b.o.rounds {
		for _, p := range paths {
			res, err := b.cell(ctx, ct, clientClose, p, flowsFor(p, srcs, c.ports), b.o.duration)
			if err != nil {
				return row, err
			}
			results[p] = append(results[p], res)
		}
		if n == 1 {
			continue
		}
		for _, e := range []struct {
			addrs []netip.Addr
			res   *[]cellResult
		}{{first, &firstRes}, {last, &lastRes}} {
			res, err := b.cell(ctx, ct, clientClose, nat, flowsFor(nat, e.addrs, c.ports), b.o.duration)
			if err != nil {
				return row, err
			}
			*e.res = append(*e.res, res)
		}
	}
	natRow, dirRow := aggregate(results[nat]), aggregate(results[direct])
	row.firstRate, row.lastRate = median(rates(firstRes)), median(rates(lastRes))
	row = scaleRow{
		backend:   backend,
		firstRate: row.firstRate, lastRate: row.lastRate,
		slots: n, natRate: natRow.rate, dirRate: dirRow.rate,
		natErrs: natRow.errs, natSlow: natRow.slow, dirErrs: dirRow.errs, dirSlow: dirRow.slow,
		natFirst: natRow.firstErr, dirFirst: dirRow.firstErr, natCT: natRow.ctPeak,
	}
	if row.dirRate > 0 {
		row.ratio = row.natRate / row.dirRate
	}
	return row, nil
}

// edgeAddrs is how many addresses of one slot the first/last-rule cells use.
const edgeAddrs = 4

// slotAddrs returns up to k addresses of srcs that map to slot.
func slotAddrs(srcs []netip.Addr, n, slot, k int) []netip.Addr {
	var out []netip.Addr
	for _, a := range srcs {
		if slotOf(a, n) == slot && len(out) < k {
			out = append(out, a)
		}
	}
	return out
}

func fmtDur(d time.Duration) string {
	switch {
	case d == 0:
		return "-"
	case d < 10*time.Millisecond:
		return fmt.Sprintf("%.0fµs", float64(d)/1e3)
	default:
		return fmt.Sprintf("%.1fms", float64(d)/1e6)
	}
}

func fmtRate(r float64) string {
	if r == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f conn/s", r)
}

func fmtRatio(r float64, ok bool) string {
	if !ok || r == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", r)
}

// printResults prints the tables, as aligned text or as Markdown.
func printResults(w io.Writer, o options, facts []string, rows []cellRow, trap []trapRow, scale []scaleRow, md bool) {
	if md {
		fmt.Fprintln(w, "\n<!-- bench/datapath -->")
		for _, f := range facts {
			fmt.Fprintf(w, "- %s\n", f)
		}
		fmt.Fprintln(w)
	} else {
		fmt.Fprintln(w)
		for _, f := range facts {
			fmt.Fprintln(w, f)
		}
		fmt.Fprintln(w)
	}
	unit := func(m mode) string {
		if m == keepalive {
			return "req/s"
		}
		return "conn/s"
	}
	if len(rows) > 0 {
		fmt.Fprintf(w, "Paths: medians of %d rounds; rate per cell, latency of a request (keepalive) or connect+request+response; errors and slow connects (≥900ms) summed over rounds; conntrack peak = max entries seen; port-remapped = max conntrack entries after a cell whose client port NAT rewrote.\n\n", o.rounds)
		hdr := []string{"mode", "sources", "path", "rate", "vs direct", "p50", "p99", "errors", "slow connects", "conntrack peak", "port-remapped"}
		var lines [][]string
		for _, r := range rows {
			lines = append(lines, []string{
				r.mode.String(), r.source, r.path.String(),
				fmt.Sprintf("%.0f %s", r.rate, unit(r.mode)), fmtRatio(r.vsDirect, r.hasDirect),
				fmtDur(r.p50), fmtDur(r.p99),
				fmt.Sprint(r.errs), fmt.Sprint(r.slow), fmt.Sprint(r.ctPeak), fmt.Sprint(r.remapped),
			})
		}
		table(w, hdr, lines, md)
		if rl := ratioLines(rows); len(rl) > 0 {
			fmt.Fprintf(w, "\nRatios of the median rates above, side by side (a/b = path a's rate over path b's; - where a path was not measured).\n\n")
			rh := []string{"mode", "sources"}
			for _, rp := range ratioPairs {
				rh = append(rh, rp[0].String()+"/"+rp[1].String())
			}
			table(w, rh, rl, md)
		}
		var errLines []string
		for _, r := range rows {
			if r.firstErr != nil {
				errLines = append(errLines, fmt.Sprintf("%s/%s/%s first error: %v", r.mode, r.source, r.path, r.firstErr))
			}
		}
		if len(errLines) > 0 {
			fmt.Fprintln(w)
			for _, l := range errLines {
				fmt.Fprintln(w, l)
			}
		}
		fmt.Fprintln(w)
	}
	if len(trap) > 0 {
		fmt.Fprintf(w, "Trap: server-close from one address, direct and nat cells alternating with conntrack NOT flushed between them, each variant on a fresh cluster (medians of %d rounds; with direct refused, the direct column counts refusals as errors; slow/errors summed; port-remapped = most conntrack entries seen after a cell whose client port NAT rewrote).\n\n", o.rounds)
		hdr := []string{"variant", "direct", "nat", "nat/direct", "slow d/n", "errors d/n", "conntrack peak", "port-remapped entries"}
		var lines [][]string
		for _, t := range trap {
			lines = append(lines, []string{
				t.variant, fmt.Sprintf("%.0f conn/s", t.dirRate), fmt.Sprintf("%.0f conn/s", t.natRate),
				fmtRatio(t.natRate/max(t.dirRate, 1), t.dirRate > 0),
				fmt.Sprintf("%d/%d", t.dirSlow, t.natSlow), fmt.Sprintf("%d/%d", t.dirErrs, t.natErrs), fmt.Sprint(t.ctPeak), fmt.Sprint(t.remapped),
			})
		}
		table(w, hdr, lines, md)
		fmt.Fprintln(w)
	}
	if len(scale) > 0 {
		fmt.Fprintf(w, "Lookup scaling: client-close from %d addresses, medians of %d rounds; nat = through the cluster's public port (for bpf: the SK_REUSEPORT program, no NAT), direct = the workers' own ports (for bpf: each worker's second socket); nat/1-slot = nat rate relative to the 1-slot nat rate; nat first/last rule = nat from %d addresses of slot 0 / slot n-1 only (one worker), which isolates the rule walk; nat conntrack peak = max entries seen during the public-port cells.\n\n", nClients(o), o.rounds, edgeAddrs)
		hdr := []string{"backend", "slots", "nat lookup", "direct", "nat", "nat/direct", "nat/1-slot", "nat first rule", "nat last rule", "last/first", "errors d/n", "slow d/n", "nat conntrack peak"}
		var lines [][]string
		for _, s := range scale {
			lookup := fmt.Sprintf("walk ≤%d rules", s.slots) // one rule per slot and public port
			switch s.backend {
			case "nftables":
				lookup = "1 map lookup"
			case "bpf":
				lookup = "1 sockarray lookup"
			}
			lines = append(lines, []string{
				s.backend, fmt.Sprint(s.slots), lookup,
				fmt.Sprintf("%.0f conn/s", s.dirRate), fmt.Sprintf("%.0f conn/s", s.natRate),
				fmtRatio(s.ratio, true), fmtRatio(s.vsOne, s.vsOne > 0),
				fmtRate(s.firstRate), fmtRate(s.lastRate), fmtRatio(s.lastRate/max(s.firstRate, 1), s.firstRate > 0),
				fmt.Sprintf("%d/%d", s.dirErrs, s.natErrs), fmt.Sprintf("%d/%d", s.dirSlow, s.natSlow), fmt.Sprint(s.natCT),
			})
		}
		table(w, hdr, lines, md)
		for _, s := range scale {
			for _, e := range []error{s.dirFirst, s.natFirst} {
				if e != nil {
					fmt.Fprintf(w, "%s, %d slots first error: %v\n", s.backend, s.slots, e)
				}
			}
		}
		fmt.Fprintln(w)
	}
}

// ratioPairs are the columns of the ratio table.
var ratioPairs = [][2]path{{nat, direct}, {nat, haproxyPath}, {bpfPath, direct}, {bpfPath, nat}, {bpfPath, haproxyPath}}

// ratioLines is the ratio table: a line per mode and source set.
func ratioLines(rows []cellRow) [][]string {
	type ms struct {
		m   mode
		src string
	}
	var order []ms
	rate := map[ms]map[path]float64{}
	for _, r := range rows {
		k := ms{r.mode, r.source}
		if rate[k] == nil {
			rate[k] = map[path]float64{}
			order = append(order, k)
		}
		rate[k][r.path] = r.rate
	}
	var lines [][]string
	for _, k := range order {
		l := []string{k.m.String(), k.src}
		for _, rp := range ratioPairs {
			a, b := rate[k][rp[0]], rate[k][rp[1]]
			l = append(l, fmtRatio(a/max(b, 1), a > 0 && b > 0))
		}
		lines = append(lines, l)
	}
	return lines
}

func table(w io.Writer, hdr []string, lines [][]string, md bool) {
	if md {
		fmt.Fprintf(w, "| %s |\n", strings.Join(hdr, " | "))
		fmt.Fprintf(w, "|%s\n", strings.Repeat("---|", len(hdr)))
		for _, l := range lines {
			fmt.Fprintf(w, "| %s |\n", strings.Join(l, " | "))
		}
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(hdr, "\t"))
	for _, l := range lines {
		fmt.Fprintln(tw, strings.Join(l, "\t"))
	}
	tw.Flush()
}

// trapRow is one variant of the trap section.
type trapRow struct {
	variant          string // direct allowed or guarded, and be_liberal
	dirRate, natRate float64
	dirSlow, natSlow int
	dirErrs, natErrs int
	ctPeak           int
	remapped         int // max over rounds, after a nat cell
}

const liberalSysctl = "net/netfilter/nf_conntrack_tcp_be_liberal"

// trapSection reproduces the single-source server-close trap: server-close
// from one address, direct and nat cells alternating as in the main part,
// but conntrack is flushed only once, before the first cell, so the nat
// cells meet the TIME_WAIT entries of the direct cells (and the other way
// round). Run with direct connections allowed (Config.AllowDirect) once
// with the namespace's nf_conntrack_tcp_be_liberal and once with 1 (unless
// it is 1 already), then with the library's default, which refuses direct
// connections to worker ports; the setting is restored afterwards.
// Each variant gets a fresh cluster, so the worker ports are new and the
// previous variant's TIME_WAIT sockets cannot reach it; the client uses its
// whole port range for both paths, as the original measurement did.
//
// The mechanism, as conntrack -E and tcpdump in the lab show it: a nat SYN
// from c:p, DNATed to the worker port w, has the reply tuple w→c:p, which
// the TIME_WAIT entry of an earlier direct connection c:p→w still holds.
// NAT resolves the clash by rewriting the client's source port to a
// random free one, c:p'. The worker's own TIME_WAIT socket for c:p' (from
// some earlier connection of another client 4-tuple, hence with unrelated
// ISN and timestamp) rejects the SYN with an ACK, the client resets, and
// the retried SYN is remapped again: the connect ends up waiting for the
// 1s SYN retransmission.
func (b *bench) trapSection(ctx context.Context) ([]trapRow, error) {
	if err := b.setRange(fullRange); err != nil {
		return nil, err
	}
	orig, err := readSysctl(b.lab.Server, liberalSysctl)
	if err != nil {
		return nil, err
	}
	// Direct connections allowed (Config.AllowDirect), with strict and
	// with liberal TCP window tracking; then the library's default, which
	// refuses them (the direct cells then count refusals as errors).
	variants := []trapVariant{{allowDirect: true, liberal: orig}}
	if orig != "1" {
		variants = append(variants, trapVariant{allowDirect: true, liberal: "1"})
	}
	variants = append(variants, trapVariant{allowDirect: false, liberal: orig})
	defer func() {
		_ = b.lab.Server.Sysctl(liberalSysctl, orig)
	}()
	var rows []trapRow
	for _, v := range variants {
		row, err := b.trapVariant(ctx, v)
		if err != nil {
			return nil, err
		}
		rows = append(rows, row)
	}
	return rows, nil
}

// trapVariant is one configuration of the trap section.
type trapVariant struct {
	allowDirect bool   // Config.AllowDirect
	liberal     string // nf_conntrack_tcp_be_liberal
}

func (v trapVariant) String() string {
	if v.allowDirect {
		return "direct allowed, be_liberal=" + v.liberal
	}
	return "direct refused (default), be_liberal=" + v.liberal
}

func (b *bench) trapVariant(ctx context.Context, tv trapVariant) (row trapRow, err error) {
	v := tv.liberal
	fmt.Fprintf(os.Stderr, "trap section, %s: starting a %d-worker cluster ...\n", tv, b.o.workers)
	c, err := startCluster(ctx, b.lab, b.exe, b.tmp, b.o.workers, clusterOpts{backend: b.o.backend, allowDirect: tv.allowDirect})
	defer func() {
		if serr := c.stop(); serr != nil {
			err = errors.Join(err, serr)
		}
	}()
	if err != nil {
		return row, err
	}
	if err := b.applyServerSysctls(); err != nil {
		return row, err
	}
	if err := b.lab.Server.Sysctl(liberalSysctl, v); err != nil {
		return row, fmt.Errorf("set %s=%s: %w", liberalSysctl, v, err)
	}
	ct, err := openConntrack(b.lab.Server)
	if err != nil {
		return row, err
	}
	defer ct.close()
	b.ctMax = ct.max
	single := b.lab.ClientAddrs4[:1]
	if err := ct.flush(); err != nil {
		return row, err
	}
	{
		res := map[path][]cellResult{}
		remapped := 0
		for r := range b.o.rounds {
			for _, p := range []path{direct, nat} {
				cr := runCell(ctx, b.lab.Client, serverClose, flowsFor(p, single, c.ports), b.o.conc, b.o.duration, ct)
				if err := ctx.Err(); err != nil {
					return row, fmt.Errorf("interrupted: %w", err)
				}
				res[p] = append(res[p], cr)
				rm, err := ct.remapped()
				if err != nil {
					return row, err
				}
				remapped = max(remapped, rm)
				if b.o.verbose {
					fmt.Fprintf(os.Stderr, "  trap %s round %d %-6s %8.0f/s errors %d slow %d ct %d remapped %d\n", tv, r+1, p, cr.rate, cr.errs, cr.slow, cr.ctPeak, rm)
				}
			}
		}
		d, n := aggregate(res[direct]), aggregate(res[nat])
		row = trapRow{variant: tv.String(), dirRate: d.rate, natRate: n.rate,
			dirSlow: d.slow, natSlow: n.slow, dirErrs: d.errs, natErrs: n.errs, ctPeak: max(d.ctPeak, n.ctPeak), remapped: remapped}
		fmt.Fprintf(os.Stderr, "  direct %.0f/s (%d slow), nat %.0f/s (%d slow)\n", d.rate, d.slow, n.rate, n.slow)
	}
	return row, nil
}

// readSysctl reads a network sysctl of ns (see conntrack for why it is
// opened inside the namespace).
func readSysctl(ns *netlab.NS, name string) (string, error) {
	var v string
	err := ns.Do(func() error {
		b, err := os.ReadFile("/proc/sys/" + name)
		v = strings.TrimSpace(string(b))
		return err
	})
	if err != nil {
		return "", fmt.Errorf("read %s in %s: %w", name, ns.Name, err)
	}
	return v, nil
}
