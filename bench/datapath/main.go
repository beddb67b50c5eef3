//go:build linux

// Command datapath measures what routing through the cluster's nat rules
// and through its bpf backend costs on the data path, against a direct
// connection and against a userspace proxy, all with the same server code
// and the same load generator, inside a throwaway pair of network
// namespaces (internal/netlab).
//
// Four paths, to two clusters of the same 2^k workers and server code:
//
//   - direct: each client connects straight to the worker port its slot
//     maps to (read from the master's status) in the nat cluster (started
//     with Config.AllowDirect, since by default it refuses connections to
//     its workers' own ports): the nat path minus the nat;
//   - nat: to the nat cluster's public port, 198.18.0.1:8080, through the
//     library's DNAT rules (-backend);
//   - bpf: to the public port of a second cluster started with
//     Config.Backend "bpf", 198.18.0.1:8082: its workers' sockets form a
//     reuseport group on that port, and an SK_REUSEPORT program picks the
//     slot's socket, with no NAT rule. By default (-bpf-ns own) it runs
//     in a second lab of the same make, since the nat cluster's rules
//     make conntrack track every connection of their namespace; with
//     -bpf-ns shared it runs beside the nat cluster, and its connections
//     are tracked like the direct ones;
//   - haproxy: HAProxy in mode tcp with balance source on 198.18.0.1:8081,
//     the nat cluster's workers as its servers.
//
// Three load modes: keepalive (HTTP/1.1 requests on persistent
// connections), client-close (a connection per request, the client closes
// first) and server-close (a connection per request with Connection:
// close, so the server closes first); each from many client addresses
// (covering every slot) and from a single one. Cells are interleaved in
// rounds (direct, nat, bpf, haproxy, direct, ...) so that drift hits every
// path alike, and the table shows medians over rounds, then the ratios
// side by side (nat/direct, nat/haproxy, bpf/direct, bpf/nat,
// bpf/haproxy). Every cell also counts errors and slow connects (≥900ms:
// a SYN retransmission) and the peak conntrack count in the server
// namespace.
//
// Cells are isolated: conntrack in the server namespace is flushed before
// each, and each path dials from its own quarter of the client's ephemeral
// ports (-split-ports), so no path meets another's TIME_WAIT state.
//
// A trap section (-trap) then shows what happens without that isolation:
// server-close from one address, direct and nat alternating with
// conntrack not flushed, on a fresh cluster per variant: direct allowed
// with nf_conntrack_tcp_be_liberal 0 and 1, then the library's default,
// which refuses direct connections. A nat connection whose reply tuple is
// still held by a direct connection's TIME_WAIT entry gets its client port
// rewritten by NAT, lands on an unrelated TIME_WAIT socket in the worker
// and waits for a 1s SYN retransmission (counted as slow connects;
// port-remapped counts the rewritten entries).
//
// A last part, lookup scaling, starts clusters of 1, 16 and 256 workers
// (-slots) for each backend (-backends: nftables, iptables, bpf) and
// measures the client-close connection rate through the public port
// ("nat"; for bpf the SK_REUSEPORT program) and direct (the workers' own
// ports; for bpf each worker's second socket) from every lab address, and
// through the public port from a few addresses of the first and of the
// last slot only, which isolates the cost of the lookup (for iptables,
// the linear rule walk) from everything else that grows with the workers.
//
// Run as root from the repository root:
//
//	sudo go run ./bench/datapath
//	sudo go run ./bench/datapath -modes server-close -sources single -paths direct,nat -slots none -rounds 3
//	sudo go run ./bench/datapath -server-sysctl net.netfilter.nf_conntrack_tcp_be_liberal=1
//	sudo go run ./bench/datapath -modes client-close -paths nat,bpf -bpf-ns shared -slots none -trap=false
//
// The bench binary is also the cluster under test: started with -serve (by
// the bench itself, inside the server namespace) it runs ipcluster.Run with
// a tiny net/http server on each worker.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ipcluster/ipcluster"
	"github.com/ipcluster/ipcluster/internal/netlab"
)

const (
	natPort     = 8080 // the nat cluster's public port
	haproxyPort = 8081
	bpfPort     = 8082 // the bpf cluster's public port
)

// serverAddr is netlab's server address.
var serverAddr = netip.AddrFrom4([4]byte{198, 18, 0, 1})

type path int

const (
	direct path = iota
	nat
	bpfPath
	haproxyPath
)

var pathNames = []string{"direct", "nat", "bpf", "haproxy"}

func (p path) String() string { return pathNames[p] }

// backendNames are the values of Config.Backend the bench knows.
var backendNames = []string{"nftables", "iptables", "bpf"}

type options struct {
	backend      string
	backends     []string
	workers      int
	conc         int
	duration     time.Duration
	rounds       int
	many         int
	modes        []mode
	paths        []path
	sources      []string
	slots        []int
	serverSysctl [][2]string
	markdown     bool
	verbose      bool
	noFlush      bool
	bpfNS        string // "own" or "shared": where the bpf path's cluster runs
	trap         bool
	splitPorts   bool
}

func main() {
	serveRole := flag.Bool("serve", false, "internal: run as the cluster under test (set by the bench itself)")
	name := flag.String("name", "", "internal: cluster name, with -serve")
	runDir := flag.String("rundir", "", "internal: cluster run directory, with -serve")
	allowDirect := flag.Bool("allow-direct", false, "internal: Config.AllowDirect, with -serve")
	publicPort := flag.Uint("port", natPort, "internal: the cluster's public port, with -serve")
	var o options
	flag.StringVar(&o.backend, "backend", "nftables", `rule backend of the nat path's cluster and the trap clusters: nftables or iptables (the library's own choice as root is bpf; the bpf path has a cluster of its own)`)
	backends := flag.String("backends", "nftables,iptables,bpf", "rule backends compared by the lookup-scaling part")
	flag.IntVar(&o.workers, "workers", 4, "workers of the cluster for the path comparison (a power of two)")
	flag.IntVar(&o.conc, "conc", 32, "concurrent load goroutines (connections)")
	flag.DurationVar(&o.duration, "duration", 1500*time.Millisecond, "duration of each cell")
	flag.IntVar(&o.rounds, "rounds", 5, "rounds: every cell runs once per round")
	flag.IntVar(&o.many, "many", 64, "client addresses of the 'many' source set")
	modes := flag.String("modes", "keepalive,client-close,server-close", "load modes to run, or none (lookup scaling only)")
	paths := flag.String("paths", "direct,nat,bpf,haproxy", "paths to measure")
	sources := flag.String("sources", "many,single", "source sets: many, single")
	slots := flag.String("slots", "1,16,256", "slot counts for the lookup-scaling part, or none")
	sysctls := flag.String("server-sysctl", "", "key=value[,key=value] sysctls set in the server namespace before measuring, e.g. net.netfilter.nf_conntrack_tcp_be_liberal=1")
	flag.BoolVar(&o.markdown, "markdown", false, "also print the results as Markdown tables")
	flag.StringVar(&o.bpfNS, "bpf-ns", "own", `where the bpf path's cluster runs: "own" (a second lab of the same make, so that no nat rule keeps conntrack active for it, as on a host with no other cluster) or "shared" (the nat cluster's server namespace, port 8082: its connections are then tracked like direct ones)`)
	flag.BoolVar(&o.noFlush, "no-flush", false, "do not flush conntrack between cells (cells then inherit each other's TIME_WAIT entries)")
	flag.BoolVar(&o.trap, "trap", true, "run the trap section: server-close from one address, direct and nat without flushing conntrack between them: direct allowed with be_liberal 0 and 1, then the default guard")
	flag.BoolVar(&o.splitPorts, "split-ports", true, "give each path its own quarter of the client's ephemeral ports (see portRange)")
	flag.BoolVar(&o.verbose, "v", false, "print every cell as it is measured")
	// By default the load generator gets CPU 0 and the server side the
	// others, as a client on another machine would leave the server its
	// CPUs: sharing them, the generator's own cost dilutes every ratio.
	defClient, defServer := "", ""
	if n := runtime.NumCPU(); n >= 2 {
		defClient, defServer = "0", fmt.Sprintf("1-%d", n-1)
	}
	clientCPUs := flag.String("client-cpus", defClient, `CPU list (as taskset -c takes it) for the bench itself, the load generator; "" for any`)
	flag.StringVar(&serverCPUs, "server-cpus", defServer, `CPU list for the cluster's processes and HAProxy; "" for any`)
	flag.Parse()
	log.SetFlags(0)

	if *clientCPUs != "" && os.Getenv(envPinned) == "" && !*serveRole && !ipcluster.IsWorker() {
		os.Exit(repinned(*clientCPUs))
	}

	if *serveRole || ipcluster.IsWorker() {
		if err := serve(*name, *runDir, o.workers, o.backend, uint16(*publicPort), *allowDirect); err != nil {
			log.Fatalf("datapath -serve: %v", err)
		}
		return
	}
	// The -slots clusters pass their own -workers to -serve; only the
	// bench itself checks its flags.
	var err error
	if o.modes, err = parseList(*modes, modeNames, func(i int) mode { return mode(i) }); err != nil {
		log.Fatalf("-modes: %v", err)
	}
	if o.paths, err = parseList(*paths, pathNames, func(i int) path { return path(i) }); err != nil {
		log.Fatalf("-paths: %v", err)
	}
	if o.sources, err = parseList(*sources, []string{"many", "single"}, func(i int) string { return []string{"many", "single"}[i] }); err != nil {
		log.Fatalf("-sources: %v", err)
	}
	if o.backends, err = parseList(*backends, backendNames, func(i int) string { return backendNames[i] }); err != nil {
		log.Fatalf("-backends: %v", err)
	}
	if o.slots, err = parseSlots(*slots); err != nil {
		log.Fatalf("-slots: %v", err)
	}
	if o.serverSysctl, err = parseSysctls(*sysctls); err != nil {
		log.Fatalf("-server-sysctl: %v", err)
	}
	if o.bpfNS != "own" && o.bpfNS != "shared" {
		log.Fatalf(`-bpf-ns %q: use "own" or "shared"`, o.bpfNS)
	}
	if o.backend == string(ipcluster.BackendBPF) {
		log.Fatalf("-backend bpf: this is the backend of the nat path's cluster and of the trap section, which need NAT rules; use nftables or iptables (the bpf path, -paths bpf, has a cluster of its own, and -backends takes bpf for the lookup scaling)")
	}
	if !isPow2(o.workers) || o.workers > ipcluster.MaxWorkers {
		log.Fatalf("-workers %d: use a power of two from 1 to %d", o.workers, ipcluster.MaxWorkers)
	}
	if o.conc < 1 || o.rounds < 1 || o.duration <= 0 || o.many < o.workers || o.many > 1024 {
		log.Fatalf("need -conc ≥ 1, -rounds ≥ 1, -duration > 0 and -workers ≤ -many ≤ 1024")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	if err := run(ctx, o, os.Args[1:]); err != nil {
		stop()
		log.Fatal(err)
	}
}

// envPinned marks the bench re-executed under taskset for -client-cpus.
const (
	envPinned     = "DATAPATH_PINNED"
	envPinnedCPUs = "DATAPATH_CLIENT_CPUS" // for the output
)

func orAny(cpus string) string {
	if cpus == "" {
		return "any"
	}
	return cpus
}

// repinned runs this same command again under taskset -c cpus, so that
// every thread of the load generator is confined from the start (a Go
// program cannot pin threads it has not created yet), and returns its
// exit status.
func repinned(cpus string) int {
	exe, err := os.Executable()
	if err != nil {
		log.Fatalf("find own executable: %v", err)
	}
	// The flags again, explicitly: in the child runtime.NumCPU counts only
	// its own CPU, so it would compute other defaults.
	args := append(os.Args[1:], "-client-cpus", cpus, "-server-cpus", serverCPUs)
	cmd := exec.Command("taskset", append([]string{"-c", cpus, exe}, args...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), envPinned+"=1", envPinnedCPUs+"="+cpus)
	// ^C reaches the child too (same process group); it cleans up and
	// exits, and so do we.
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		log.Fatalf("run under taskset -c %s: %v", cpus, err)
	}
	return 0
}

// nClients is the lab's client address count: -many, or for the lookup
// scaling edgeAddrs per slot of the largest cluster, up to netlab's 1024.
func nClients(o options) int {
	n := o.many
	for _, s := range o.slots {
		n = max(n, min(1024, s*edgeAddrs))
	}
	return n
}

func isPow2(n int) bool { return n > 0 && n&(n-1) == 0 }

func parseList[T any](s string, names []string, mk func(int) T) ([]T, error) {
	var out []T
	if s == "" || s == "none" {
		return nil, nil
	}
	for _, f := range strings.Split(s, ",") {
		i := slices.Index(names, strings.TrimSpace(f))
		if i < 0 {
			return nil, fmt.Errorf("%q is not one of %s", f, strings.Join(names, ", "))
		}
		out = append(out, mk(i))
	}
	return out, nil
}

func parseSlots(s string) ([]int, error) {
	if s == "" || s == "none" {
		return nil, nil
	}
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || !isPow2(n) || n > ipcluster.MaxWorkers {
			return nil, fmt.Errorf("%q: use powers of two from 1 to %d", f, ipcluster.MaxWorkers)
		}
		out = append(out, n)
	}
	return out, nil
}

// parseSysctls takes net.a.b=v or net/a/b=v.
func parseSysctls(s string) ([][2]string, error) {
	if s == "" {
		return nil, nil
	}
	var out [][2]string
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("%q: want key=value", kv)
		}
		if !strings.Contains(k, "/") {
			k = strings.ReplaceAll(k, ".", "/")
		}
		out = append(out, [2]string{k, v})
	}
	return out, nil
}

// labSysctls are set in both namespaces, for every path alike.
//
//   - A wide ephemeral port range and tcp_tw_reuse=1 (the default, 2,
//     reuses TIME_WAIT ports for loopback only): a client that closes
//     first keeps each port in TIME_WAIT for 60s, and ~10k connections/s
//     from one address would otherwise exhaust the default 28k ports in
//     seconds. The server namespace needs them too: HAProxy's connections
//     to the workers all come from 198.18.0.1.
var labSysctls = [][2]string{
	{"net/ipv4/ip_local_port_range", fullRange},
	{"net/ipv4/tcp_tw_reuse", "1"},
}

// bench is the state of one run: everything cleanup has to undo.
type bench struct {
	o   options
	lab *netlab.Lab
	exe string
	tmp string

	// The bpf path's side: with -bpf-ns own a second lab and its
	// conntrack; with shared, lab itself.
	bpfLab *netlab.Lab
	bpfCT  *conntrack

	ctMax      int       // nf_conntrack_max in the server namespace
	trap       []trapRow // the trap section's results
	sysctlsSet bool      // -server-sysctl applied
	curRange   string    // the client namespace's ip_local_port_range
}

func run(ctx context.Context, o options, args []string) (err error) {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	tmp, err := os.MkdirTemp("", "ipcluster-datapath-")
	if err != nil {
		return fmt.Errorf("create temp dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	lab, err := netlab.New(netlab.Options{Clients: nClients(o)})
	if err != nil {
		return fmt.Errorf("create lab: %w", err)
	}
	defer func() {
		if cerr := lab.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("remove lab: %w", cerr))
		}
	}()
	for _, ns := range []*netlab.NS{lab.Client, lab.Server} {
		for _, kv := range labSysctls {
			if err := ns.Sysctl(kv[0], kv[1]); err != nil {
				return fmt.Errorf("set %s=%s in %s: %w", kv[0], kv[1], ns.Name, err)
			}
		}
	}
	b := &bench{o: o, lab: lab, exe: exe, tmp: tmp, curRange: labSysctls[0][1]}
	facts := machineFacts(o, args)

	var rows []cellRow
	if len(o.modes) > 0 && len(o.paths) > 0 && len(o.sources) > 0 {
		rows, err = b.comparePaths(ctx)
		if err != nil {
			return err
		}
	}
	if o.trap {
		if b.trap, err = b.trapSection(ctx); err != nil {
			return err
		}
	}
	var scale []scaleRow
	if len(o.slots) > 0 {
		scale, err = b.lookupScaling(ctx)
		if err != nil {
			return err
		}
	}
	if b.ctMax > 0 {
		facts = append(facts, fmt.Sprintf("nf_conntrack_max %d (server namespace)", b.ctMax))
	}
	printResults(os.Stdout, o, facts, rows, b.trap, scale, false)
	if o.markdown {
		printResults(os.Stdout, o, facts, rows, b.trap, scale, true)
	}
	return nil
}

// machineFacts describes the machine and the run, for the output.
func machineFacts(o options, args []string) []string {
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	online, _ := os.ReadFile("/sys/devices/system/cpu/online")
	ipt, err := exec.Command("iptables", "--version").Output()
	if err != nil {
		ipt = []byte("unknown: " + err.Error())
	}
	hap, err := exec.Command("haproxy", "-v").Output()
	if err != nil {
		hap = []byte("unknown: " + err.Error())
	}
	hapFirst, _, _ := strings.Cut(string(hap), "\n")
	return []string{
		fmt.Sprintf("kernel %s, CPUs online %s, %s", strings.TrimSpace(string(kernel)), strings.TrimSpace(string(online)), runtime.Version()),
		fmt.Sprintf("CPUs: load generator %s, cluster and haproxy %s", orAny(os.Getenv(envPinnedCPUs)), orAny(serverCPUs)),
		strings.TrimSpace(string(ipt)) + "; " + strings.TrimSpace(hapFirst),
		"flags: " + strings.Join(args, " "),
		fmt.Sprintf("workers %d, conc %d, duration %s per cell, rounds %d, many = %d addresses", o.workers, o.conc, o.duration, o.rounds, o.many),
		"bpf path: " + bpfNSFact[o.bpfNS],
		"haproxy: " + haproxySettings,
		fmt.Sprintf("lab sysctls (both namespaces): %s; server: %s", fmtSysctls(labSysctls), fmtSysctls(o.serverSysctl)),
	}
}

var bpfNSFact = map[string]string{
	"own":    "its cluster in a second lab of the same make (-bpf-ns own): no nat rule in its namespace, so conntrack tracks none of its connections",
	"shared": "its cluster in the nat cluster's server namespace on port 8082 (-bpf-ns shared): the nat rules keep conntrack active there, so its connections are tracked too",
}

func fmtSysctls(kvs [][2]string) string {
	if len(kvs) == 0 {
		return "none"
	}
	var s []string
	for _, kv := range kvs {
		s = append(s, strings.ReplaceAll(kv[0], "/", ".")+"="+kv[1])
	}
	return strings.Join(s, " ")
}

// slotOf is the slot of an IPv4 client address: its low bits (the
// library's default IPv4SlotPrefix of 32).
func slotOf(a netip.Addr, workers int) int {
	b := a.As4()
	return int(uint32(b[0])<<24|uint32(b[1])<<16|uint32(b[2])<<8|uint32(b[3])) & (workers - 1)
}

// flows builds the connections of one path from srcs.
func flowsFor(p path, srcs []netip.Addr, ports []uint16) []flow {
	out := make([]flow, len(srcs))
	for i, a := range srcs {
		var port uint16
		switch p {
		case direct:
			port = ports[slotOf(a, len(ports))]
		case nat:
			port = natPort
		case bpfPath:
			port = bpfPort
		case haproxyPath:
			port = haproxyPort
		}
		out[i] = flow{
			src: net.TCPAddrFromAddrPort(netip.AddrPortFrom(a, 0)),
			dst: netip.AddrPortFrom(serverAddr, port).String(),
		}
	}
	return out
}

// verify checks, once per slot, that c's public port reaches the worker
// whose own port (the direct path's) serves that slot's addresses.
func (b *bench) verify(ctx context.Context, c *cluster, srcs []netip.Addr) error {
	done := map[int]bool{}
	for _, a := range srcs {
		s := slotOf(a, c.workers)
		if done[s] {
			continue
		}
		done[s] = true
		want := fmt.Sprintf("ok slot=%d\n", s)
		for _, port := range []uint16{c.public, c.ports[s]} {
			got, err := probe(ctx, c.lab, a, netip.AddrPortFrom(serverAddr, port))
			if err != nil {
				return fmt.Errorf("probe %s → port %d: %w", a, port, err)
			}
			if got != want {
				return fmt.Errorf("probe %s → port %d: answered %q, want %q", a, port, got, want)
			}
		}
	}
	return nil
}
