//go:build linux

package ipcluster

// The rule writer. The cluster owns one nat chain per address family, named
// IPC-<name>, jumped to from PREROUTING (remote clients) and OUTPUT (clients
// on this host). The chain holds one DNAT rule per slot and public port:
//
//	-A IPC-chat -s 0.0.0.1/0.0.0.3 -d 198.18.0.1/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination :40123
//
// The source mask is non-contiguous on purpose: it selects the low bits of
// the client address (or of its /64 prefix for IPv6), which spread clients
// evenly where network-prefix bits would not. Only a connection's first
// packet traverses nat; conntrack keeps the translation for the rest, which
// is why rewriting the chain never disturbs an established connection.
//
// Every change is one iptables-restore --noflush transaction per family, so
// there is never a moment where a slot has no rule: a slot swap replaces
// that slot's rules in place (-R); any other change declares the chain,
// which flushes it, and refills it in the same transaction.
//
// github.com/coreos/go-iptables finds the iptables binary and checks it
// runs (findBinaries). It does not do the rest: it runs one iptables command
// per rule, outside any transaction, without a context to bound it or a
// way to start it elsewhere (the tests' namespaces), so the writes, the
// removal (one transaction for the hooks and the chain) and the check
// (one iptables-save per family, where its Exists and List would take a
// process per hook and one for the chain) go through ruleRunner.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"

	goipt "github.com/coreos/go-iptables/iptables"
)

// hookChains are the built-in nat chains the cluster's chain is jumped from.
var hookChains = []string{"PREROUTING", "OUTPUT"}

// hookSpec is the rule, as iptables-save prints it, that jumps from a
// built-in chain to the cluster's chain. addrtype LOCAL keeps forwarded
// traffic that merely passes through this host out of the cluster.
//
// The conntrack match is there for its side effect as much as its test:
// while a rule that uses conntrack exists, the namespace's conntrack hooks
// stay registered. Without any (the cluster's chain emptied, no other nat
// or conntrack rule in the namespace), the kernel stops looking packets up
// in the conntrack table, and every established connection that was
// translated loses its translation: the next packet reaches the public
// port itself and is reset. Measured on Linux 6.18 with iptables-nft: a
// keep-alive connection is reset once the last DNAT rule is gone. The hooks
// live until the cluster's rules are removed, after its last worker exits.
func (r *routing) hookSpec() string {
	return fmt.Sprintf(`-m addrtype --dst-type LOCAL -m conntrack --ctstate NEW -m comment --comment "ipcluster:%s" -j %s`, r.name, r.chain)
}

// slotMatch returns the source match for a slot in a family, or "" when the
// cluster has one worker (every address matches).
func (r *routing) slotMatch(f *family, slot int) string {
	if r.workers == 1 {
		return ""
	}
	return "-s " + r.slotAddr(f, slot).String() + "/" + r.slotAddr(f, r.workers-1).String()
}

// chainRules returns the rules of the cluster's chain for family f, each as
// an iptables-restore line.
func (r *routing) chainRules(f *family, targets []slotTarget) []string {
	var dst string
	if r.addr.IsValid() && !r.addr.IsUnspecified() {
		dst = " -d " + netip.PrefixFrom(r.addr, r.addr.BitLen()).String()
	}
	lines := make([]string, 0, len(targets)*len(r.ports))
	for slot, t := range targets {
		if t == nil {
			continue
		}
		src := r.slotMatch(f, slot)
		if src != "" {
			src = " " + src
		}
		for _, pub := range r.ports {
			wport, ok := t[pub]
			if !ok {
				continue
			}
			lines = append(lines, fmt.Sprintf("-A %s%s%s -p %s -m %s --dport %d -j DNAT --to-destination :%d",
				r.chain, src, dst, pub.Proto, pub.Proto, pub.Public, wport))
		}
	}
	return lines
}

// natTable is the part of an iptables-save dump of the nat table the rule
// writer cares about.
type natTable struct {
	chains map[string]bool     // every chain declared
	rules  map[string][]string // chain → rule specs, without "-A <chain> "
}

// parseSave parses `iptables-save -t nat` output. It is strict about the
// structure it relies on and ignores what it does not need.
func parseSave(out []byte) (*natTable, error) {
	t := &natTable{chains: map[string]bool{}, rules: map[string][]string{}}
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	inNat := false
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		switch {
		case line == "" || line[0] == '#':
		case line[0] == '*':
			inNat = line == "*nat"
		case line == "COMMIT":
			inNat = false
		case !inNat:
		case line[0] == ':':
			name, _, _ := strings.Cut(line[1:], " ")
			if name == "" {
				return nil, fmt.Errorf("iptables-save line %d: chain declaration without a name", n)
			}
			t.chains[name] = true
		case strings.HasPrefix(line, "-A "):
			chain, spec, ok := strings.Cut(line[3:], " ")
			if !ok || chain == "" {
				return nil, fmt.Errorf("iptables-save line %d: rule without a spec: %q", n, line)
			}
			if !t.chains[chain] {
				return nil, fmt.Errorf("iptables-save line %d: rule in undeclared chain %q", n, chain)
			}
			t.rules[chain] = append(t.rules[chain], spec)
		default:
			return nil, fmt.Errorf("iptables-save line %d: unexpected %q", n, line)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read iptables-save output: %w", err)
	}
	return t, nil
}

// jumpsTo reports whether a rule spec's target is chain.
func jumpsTo(spec, chain string) bool {
	return strings.HasSuffix(spec, " -j "+chain) || spec == "-j "+chain
}

// installPayload returns the iptables-restore input that makes the kernel's
// nat table hold exactly the given chain rules and one hook per built-in
// chain, starting from the observed table. A stale chain left by a crashed
// master is flushed by the declaration; stale or duplicate hooks are deleted.
func (r *routing) installPayload(have *natTable, lines []string) string {
	var hooks strings.Builder
	want := r.hookSpec()
	for _, hc := range hookChains {
		kept := false
		for _, spec := range have.rules[hc] {
			if !jumpsTo(spec, r.chain) {
				continue
			}
			if spec == want && !kept {
				kept = true
				continue
			}
			fmt.Fprintf(&hooks, "-D %s %s\n", hc, spec)
		}
		if !kept {
			fmt.Fprintf(&hooks, "-I %s 1 %s\n", hc, want)
		}
	}
	return r.chainPayload(lines, hooks.String())
}

// chainPayload declares the cluster's chain, which flushes it, refills it
// with lines and applies extra (hook fixes), all in one transaction.
func (r *routing) chainPayload(lines []string, extra string) string {
	var b strings.Builder
	b.Grow(64*(len(lines)+3) + len(extra))
	fmt.Fprintf(&b, "*nat\n:%s - [0:0]\n", r.chain)
	for _, l := range lines {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	b.WriteString(extra)
	b.WriteString("COMMIT\n")
	return b.String()
}

// replacePayload rewrites, in place, only the rules that differ between two
// chain contents of the same length: a slot swap touches a slot's few rules,
// not the whole chain, so its cost does not grow with the number of slots.
// It is still one transaction. It returns "" if the lengths differ (a slot
// gained or lost its rules, shifting positions): rewrite the chain then.
func (r *routing) replacePayload(old, lines []string) string {
	if len(old) != len(lines) {
		return ""
	}
	var b strings.Builder
	b.WriteString("*nat\n")
	prefix := "-A " + r.chain + " "
	for i, l := range lines {
		if l != old[i] {
			fmt.Fprintf(&b, "-R %s %d %s\n", r.chain, i+1, strings.TrimPrefix(l, prefix))
		}
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// removePayload deletes every hook to the cluster's chain and the chain
// itself, or returns "" when there is nothing to remove.
func (r *routing) removePayload(have *natTable) string {
	var b strings.Builder
	for _, hc := range hookChains {
		for _, spec := range have.rules[hc] {
			if jumpsTo(spec, r.chain) {
				fmt.Fprintf(&b, "-D %s %s\n", hc, spec)
			}
		}
	}
	if have.chains[r.chain] {
		// Declaring the chain flushes it, so -X finds it empty.
		fmt.Fprintf(&b, ":%s - [0:0]\n-X %s\n", r.chain, r.chain)
	}
	if b.Len() == 0 {
		return ""
	}
	return "*nat\n" + b.String() + "COMMIT\n"
}

// ruleRunner runs the iptables-save and iptables-restore of a family. The
// real one execs the binaries; tests of the writer's logic use a fake.
type ruleRunner interface {
	save(ctx context.Context, f *family) ([]byte, error)
	restore(ctx context.Context, f *family, payload string) error
}

// RuleError is a failed iptables command. It keeps the command's exit
// status and standard error, which name the offending line.
type RuleError struct {
	Cmd        string // e.g. "iptables-restore --noflush --wait"
	ExitStatus int    // -1 if the command did not run
	Stderr     string
	Err        error
}

func (e *RuleError) Error() string {
	msg := strings.TrimSpace(e.Stderr)
	if msg == "" {
		msg = e.Err.Error()
	}
	return fmt.Sprintf("%s (exit status %d): %s", e.Cmd, e.ExitStatus, msg)
}

func (e *RuleError) Unwrap() error { return e.Err }

// execRunner runs the real binaries.
type execRunner struct {
	// start starts a command; nil means cmd.Start. Tests and benchmarks
	// set it to start the command inside their network namespace.
	start func(*exec.Cmd) error
}

func (e execRunner) save(ctx context.Context, f *family) ([]byte, error) {
	var out bytes.Buffer
	err := e.run(ctx, exec.CommandContext(ctx, f.save, "-t", "nat"), nil, &out)
	return out.Bytes(), err
}

func (e execRunner) restore(ctx context.Context, f *family, payload string) error {
	// --wait: with the legacy backend another program may hold the xtables
	// lock for a moment; waiting beats failing a slot swap.
	return e.run(ctx, exec.CommandContext(ctx, f.restore, "--noflush", "--wait"), strings.NewReader(payload), nil)
}

func (e execRunner) run(ctx context.Context, cmd *exec.Cmd, stdin *strings.Reader, stdout *bytes.Buffer) error {
	var stderr bytes.Buffer
	// Assign only non-nil values: a nil *T in the interface field would
	// look like a real reader or writer to os/exec.
	if stdin != nil {
		cmd.Stdin = stdin
	}
	if stdout != nil {
		cmd.Stdout = stdout
	}
	cmd.Stderr = &stderr
	cmd.WaitDelay = time.Second
	var err error
	if e.start != nil {
		if err = e.start(cmd); err == nil {
			err = cmd.Wait()
		}
	} else {
		err = cmd.Run()
	}
	if err == nil {
		return nil
	}
	re := &RuleError{Cmd: strings.Join(cmd.Args, " "), ExitStatus: -1, Stderr: stderr.String(), Err: err}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		re.ExitStatus = ee.ExitCode()
	}
	if ctx.Err() != nil {
		re.Err = fmt.Errorf("%w (%w)", err, ctx.Err())
	}
	return re
}

// ruleWriter keeps the kernel's rules equal to the master's view. It is used
// only from the master's state goroutine.
type ruleWriter struct {
	r      *routing
	run    ruleRunner
	hooked map[*family]bool
	// installed is, per family, the chain content the kernel holds: the
	// rules the master believes in.
	installed map[*family][]string
	// Counters for status and benchmarks.
	restores, saves int
}

func newRuleWriter(r *routing, run ruleRunner) *ruleWriter {
	return &ruleWriter{r: r, run: run, hooked: map[*family]bool{}, installed: map[*family][]string{}}
}

// apply makes every family's chain route each slot to its target. The first
// call per family reconciles with what the kernel holds (a crashed
// master's chain, duplicate hooks); later calls rewrite only the chain, and
// only when it changes. One iptables-restore per family that changes.
func (w *ruleWriter) apply(ctx context.Context, targets, _ []slotTarget) error {
	for _, f := range w.r.families {
		lines := w.r.chainRules(f, targets)
		if w.hooked[f] {
			if slices.Equal(lines, w.installed[f]) {
				continue
			}
			payload := w.r.replacePayload(w.installed[f], lines)
			if payload == "" {
				payload = w.r.chainPayload(lines, "")
			}
			w.restores++
			if err := w.run.restore(ctx, f, payload); err != nil {
				return fmt.Errorf("rewrite %s chain %s: %w", f.name, w.r.chain, err)
			}
		} else {
			have, err := w.read(ctx, f)
			if err != nil {
				return err
			}
			w.restores++
			if err := w.run.restore(ctx, f, w.r.installPayload(have, lines)); err != nil {
				return fmt.Errorf("install %s chain %s and its hooks: %w", f.name, w.r.chain, err)
			}
			w.hooked[f] = true
		}
		w.installed[f] = lines
	}
	return nil
}

// remove deletes the hooks and chains of every family. It is idempotent:
// what is already gone is skipped. It tries every family even if one fails.
func (w *ruleWriter) remove(ctx context.Context) error {
	var errs []error
	for _, f := range w.r.families {
		have, err := w.read(ctx, f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if p := w.r.removePayload(have); p != "" {
			w.restores++
			if err := w.run.restore(ctx, f, p); err != nil {
				errs = append(errs, fmt.Errorf("remove %s chain %s and its hooks: %w", f.name, w.r.chain, err))
				continue
			}
		}
		delete(w.hooked, f)
		delete(w.installed, f)
	}
	return errors.Join(errs...)
}

func (w *ruleWriter) read(ctx context.Context, f *family) (*natTable, error) {
	w.saves++
	out, err := w.run.save(ctx, f)
	if err != nil {
		return nil, fmt.Errorf("read %s nat table: %w", f.name, err)
	}
	t, err := parseSave(out)
	if err != nil {
		return nil, fmt.Errorf("read %s nat table: %w", f.name, err)
	}
	return t, nil
}

func (w *ruleWriter) changes() int { return w.restores + w.saves }

// checkTimeout bounds one check: every family's iptables-save.
const checkTimeout = 10 * time.Second

// check reads each installed family's nat table back, one iptables-save
// per family, and compares it with what apply wrote: the chain declared
// and holding exactly the installed rules, and the hook apply wrote in
// each built-in chain. A firewall reload (`iptables -t nat -F`, a restore
// of a saved ruleset without the cluster's chain) or an operator's edit
// would otherwise leave new connections unrouted, or routed to a port the
// master did not choose, until the master's next change. A family found
// changed is reconciled whole by the next apply.
func (w *ruleWriter) check(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	for _, f := range w.r.families {
		if !w.hooked[f] {
			continue
		}
		have, err := w.read(ctx, f)
		if err != nil {
			return err
		}
		if lost := w.r.drift(have, w.installed[f]); lost != "" {
			delete(w.hooked, f)
			return fmt.Errorf("%w: %s nat table: %s", ErrRulesLost, f.name, lost)
		}
	}
	return nil
}

// drift says how a parsed nat table differs from what apply wrote (the
// chain's lines, and a hook in each built-in chain), or "" if it does not.
func (r *routing) drift(have *natTable, lines []string) string {
	if !have.chains[r.chain] {
		return fmt.Sprintf("chain %s is gone (deleted by a firewall reload or `iptables -t nat -X`?)", r.chain)
	}
	want := r.hookSpec()
	for _, hc := range hookChains {
		if !slices.Contains(have.rules[hc], want) {
			return fmt.Sprintf("the hook from %s to chain %s is gone", hc, r.chain)
		}
	}
	got := have.rules[r.chain]
	if len(got) != len(lines) {
		return fmt.Sprintf("chain %s holds %d rules, not the %d written (flushed by `iptables -t nat -F`?)", r.chain, len(got), len(lines))
	}
	prefix := "-A " + r.chain + " "
	for i, l := range lines {
		if got[i] != strings.TrimPrefix(l, prefix) {
			return fmt.Sprintf("rule %d of chain %s is %q, not the %q written", i+1, r.chain, got[i], l)
		}
	}
	return ""
}

// routes parses the cluster's chain of each family as iptables-save prints
// it, which is exactly as chainRules writes it.
func (w *ruleWriter) routes(ctx context.Context) ([]slotTarget, error) {
	perFamily := make([][]slotTarget, 0, len(w.r.families))
	for _, f := range w.r.families {
		have, err := w.read(ctx, f)
		if err != nil {
			return nil, err
		}
		perFamily = append(perFamily, w.r.routesIn(f, have))
	}
	return agreeingRoutes(perFamily, w.r), nil
}

// routesIn reads each slot's target from the cluster's chain of family f in
// a parsed dump. A rule it does not recognise as one chainRules writes is
// ignored, so a slot without a recognisable rule for every port has an
// incomplete target (agreeingRoutes drops those).
func (r *routing) routesIn(f *family, have *natTable) []slotTarget {
	// The rule of each slot and port, with the worker port left off.
	zero := make([]slotTarget, r.workers)
	for slot := range zero {
		zero[slot] = slotTarget{}
		for _, pub := range r.ports {
			zero[slot][pub] = 0
		}
	}
	got := make([]slotTarget, r.workers)
	for i, line := range r.chainRules(f, zero) {
		slot, pub := i/len(r.ports), r.ports[i%len(r.ports)]
		prefix := strings.TrimPrefix(strings.TrimSuffix(line, "0"), "-A "+r.chain+" ")
		for _, spec := range have.rules[r.chain] {
			rest, ok := strings.CutPrefix(spec, prefix)
			if !ok {
				continue
			}
			if port, err := strconv.ParseUint(rest, 10, 16); err == nil && port > 0 {
				if got[slot] == nil {
					got[slot] = slotTarget{}
				}
				got[slot][pub] = uint16(port)
				// The kernel's walk of the chain ends at the first
				// match (a DNAT): a later duplicate routes nothing.
				break
			}
		}
	}
	return got
}

// invalidate makes the next apply reconcile each family from scratch: one
// iptables-restore that rewrites the whole chain.
func (w *ruleWriter) invalidate() { clear(w.hooked) }

// rulesText renders the installed chain of each family for status output.
func (w *ruleWriter) rulesText() map[string]string {
	m := make(map[string]string, len(w.installed))
	for f, lines := range w.installed {
		m[f.name] = strings.Join(lines, "\n")
	}
	return m
}

// findBinaries finds the iptables binaries each family needs. go-iptables
// finds iptables (ip6tables) on PATH and runs `iptables --version`, so a
// binary that is there but does not run is refused too; iptables-restore
// and iptables-save, which go-iptables does not run, are looked up on
// PATH as the writer execs them.
func findBinaries(r *routing) error {
	var errs []error
	for _, f := range r.families {
		fix := "install the iptables package (apt-get install iptables)"
		if f == familyIPv6 {
			fix += ", or set Config.Addr to an IPv4 address to serve IPv4 only"
		}
		proto := goipt.ProtocolIPv4
		if f == familyIPv6 {
			proto = goipt.ProtocolIPv6
		}
		// Timeout is the xtables lock wait of go-iptables' own commands;
		// New runs only `iptables --version`, which takes no lock.
		_, err := goipt.New(goipt.IPFamily(proto), goipt.Timeout(int(checkTimeout/time.Second)))
		var ee *exec.Error
		switch {
		case errors.As(err, &ee):
			errs = append(errs, fmt.Errorf("%w: %s not found on PATH (%v); %s", ErrMissingBinary, f.cmd, err, fix))
		case err != nil:
			errs = append(errs, fmt.Errorf("%w: %s does not run (%v); %s", ErrMissingBinary, f.cmd, err, fix))
		}
		for _, bin := range []string{f.restore, f.save} {
			if _, err := exec.LookPath(bin); err != nil {
				errs = append(errs, fmt.Errorf("%w: %s not found on PATH (%v); %s", ErrMissingBinary, bin, err, fix))
			}
		}
	}
	return errors.Join(errs...)
}
